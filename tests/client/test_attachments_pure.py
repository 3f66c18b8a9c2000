"""The pure parts of client/attachments.py: size classes, the offer's strict parsing, hidden key."""

from __future__ import annotations

import os

import pytest

from cipherpost.client.attachments import (
    ENCRYPTED_CHUNK_SIZE,
    FileOffer,
    blob_size,
    ciphertext_len,
    padme,
    read_content,
    relay_chunk_len,
    relay_chunks,
    safe_name,
)
from cipherpost.client.errors import ClientError
from cipherpost.crypto.stream import ciphertext_size


def offer() -> FileOffer:
    return FileOffer(os.urandom(16), os.urandom(32), os.urandom(16), 1234, os.urandom(32), "a.txt",
                     "text/plain")


@pytest.mark.parametrize("n", [0, 1, 2, 9, 100, 65_535, 65_536, 65_537, 10**6, 100 * 2**20 + 7, 2**30 + 3])
def test_padme_pads_at_most_12_percent_and_hides_low_bits(n: int) -> None:
    padded = padme(n)
    assert n <= padded <= n * 1.12 + 1
    if n > 1000:
        assert padme(n + 1) == padded or padme(n + 1) > padded   # monotone
        assert len({padme(n + k) for k in range(64)}) <= 2       # nearby sizes share a class


@pytest.mark.parametrize("size", [0, 1, 65_536, 65_537, 5 * 65_536 + 123])
def test_the_blob_holds_the_stream_chunks_then_padding(size: int) -> None:
    assert ciphertext_len(size) == ciphertext_size(size) - 16   # the nonce travels in the message
    total = sum(relay_chunk_len(size, i) for i in range(relay_chunks(size)))
    assert total == blob_size(size) >= ciphertext_len(size)
    assert all(relay_chunk_len(size, i) == ENCRYPTED_CHUNK_SIZE for i in range(relay_chunks(size) - 1))


def test_an_offer_round_trips_and_malformed_ones_are_refused() -> None:
    o = offer()
    assert FileOffer.from_map(o.to_map()) == o
    assert read_content("file", o.to_map()) == (o.describe(), {"file": o.to_map()})
    for key, bad in [("blob", b"x"), ("key", os.urandom(16)), ("nonce", b""), ("size", -1), ("size", "1"),
                     ("sha256", b"short"), ("name", 7), ("type", "x" * 300)]:
        with pytest.raises(ClientError):
            FileOffer.from_map({**o.to_map(), key: bad})
    with pytest.raises(ClientError):
        read_content("video", {})


def test_the_key_never_shows_in_a_repr() -> None:
    o = offer()
    assert o.key.hex() not in repr(o) and "hidden" in repr(o)


def test_names_are_tamed() -> None:
    assert safe_name("report.pdf") == "report.pdf"
    assert safe_name(".hidden") == "hidden"
    assert safe_name("a/b/../c.txt") == "c.txt"
    assert "\n" not in safe_name("two\nlines.txt") and "\u202e" not in safe_name("gpj.\u202eexe")
