"""client/plaintext.py: the message payload, its one size limit and its checks (pure functions)."""

from __future__ import annotations

import pytest

from cipherpost.client.plaintext import (
    ENVELOPE_OVERHEAD,
    MAX_TEXT_BYTES,
    PAD_BLOCK,
    EmptyMessage,
    InvalidPayload,
    MessageTooLong,
    build_text_payload,
    check_text,
    pad,
    parse_text_payload,
    text_limit,
    unpad,
)
from cipherpost.crypto.encoding import pack, unpack
from cipherpost.protocol.frames import DEFAULT_MAX_BODY

LONGEST_NAME = "x" * 32


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 16 * 1024, MAX_TEXT_BYTES])
def test_texts_of_every_boundary_size_round_trip(size: int) -> None:
    text = "y" * size
    payload = build_text_payload(text, 1_700_000_000_000, "alice", "bob")
    assert len(payload) % PAD_BLOCK == 0
    assert parse_text_payload(payload, sender="alice", me="bob") == (text, 1_700_000_000_000)


def test_the_longest_text_fits_the_default_body_limit_with_the_initial_message() -> None:
    payload = build_text_payload("z" * MAX_TEXT_BYTES, (1 << 53) - 1, LONGEST_NAME, LONGEST_NAME)
    assert len(payload) + ENVELOPE_OVERHEAD <= DEFAULT_MAX_BODY


def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    check_text("é" * (MAX_TEXT_BYTES // 2))
    with pytest.raises(MessageTooLong, match=f"at most {MAX_TEXT_BYTES} bytes"):
        check_text("é" * (MAX_TEXT_BYTES // 2 + 1))


@pytest.mark.parametrize("text", ["", " ", "\n", " \t\n\r ", "\u3000"])
def test_empty_or_whitespace_only_text_is_refused(text: str) -> None:
    with pytest.raises(EmptyMessage, match="empty or only whitespace"):
        build_text_payload(text, 0, "alice", "bob")


def test_one_byte_over_the_limit_is_refused_naming_the_limit() -> None:
    with pytest.raises(MessageTooLong, match=f"{MAX_TEXT_BYTES + 1} bytes; at most {MAX_TEXT_BYTES}"):
        check_text("a" * (MAX_TEXT_BYTES + 1))


def test_a_relay_with_a_smaller_body_limit_lowers_the_limit_and_it_still_fits() -> None:
    for max_body in (4096, 8000, 20_000, 60_000):
        limit = text_limit(max_body)
        assert limit < MAX_TEXT_BYTES
        payload = build_text_payload("q" * limit, (1 << 53) - 1, LONGEST_NAME, LONGEST_NAME, max_body)
        assert len(payload) + ENVELOPE_OVERHEAD <= max_body
        with pytest.raises(MessageTooLong, match="on this relay"):
            check_text("q" * (limit + 1), max_body)
    assert text_limit(None) == text_limit(DEFAULT_MAX_BODY) == text_limit(1 << 20) == MAX_TEXT_BYTES


def test_payload_written_by_someone_else_is_refused() -> None:
    payload = build_text_payload("hi", 5, "mallory", "bob")
    with pytest.raises(InvalidPayload, match="written by 'mallory'"):
        parse_text_payload(payload, sender="alice", me="bob")
    with pytest.raises(InvalidPayload, match="for 'bob'"):
        parse_text_payload(payload, sender="mallory", me="carol")


@pytest.mark.parametrize("body", [
    pad(pack([1, "file", "x", 5, "alice", "bob"])),
    pad(pack([1, "text", b"bytes", 5, "alice", "bob"])),
    pad(pack([1, "text", "x", -1, "alice", "bob"])),
    pad(pack([1, "text", "x", True, "alice", "bob"])),
    pad(pack([2, "text", "x", 5, "alice", "bob"])),
    pad(pack([1, "text", "x", 5, "alice"])),
    pad(b"\xc1"),
    pack([1, "text", "x", 5, "alice", "bob"]),   # not padded
    b"",
])
def test_malformed_payloads_are_refused_with_one_error_type(body: bytes) -> None:
    with pytest.raises(InvalidPayload):
        parse_text_payload(body, sender="alice", me="bob")


def test_pad_round_trips_and_hides_the_length_within_a_block() -> None:
    for n in range(0, 400):
        data = b"\x01" * n
        assert unpad(pad(data)) == data
        assert len(pad(data)) == (n // PAD_BLOCK + 1) * PAD_BLOCK


def test_decoder_accepts_long_strings_up_to_its_size_bound() -> None:
    # The bug of issue 8 item 1: a fixed 4,096-byte string cap in the shared decoder.
    long = "s" * 70_000
    assert unpack(pack([long]), what="t") == [long]
    from cipherpost.crypto.errors import EncodingError
    with pytest.raises(EncodingError, match="too large"):
        unpack(pack([long]), what="t", max_size=60_000)
