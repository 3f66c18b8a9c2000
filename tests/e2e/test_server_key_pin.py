"""Clients pin the relay's public key (SPKI), not its certificate: a renewal with the same key (a public
CA's every 90 days) keeps working, a new key is refused, and a profile pinned to a certificate by
earlier code keeps working and moves to the key pin (crypto/pins.py)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.client.client import Client
from cipherpost.server.tls import certificate_der, ensure_self_signed


def _renew(cert_path: Path, key_path: Path, out: Path, days_later: int) -> Path:
    """A new certificate for the same key (new serial and validity), as a CA renewal with the key kept."""
    old = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days_later - 1)
    builder = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer)
               .public_key(old.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=90)))
    for ext in old.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    out.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))  # type: ignore[arg-type]
    return out


def _serve(relay: RelayProcess, cert: Path, key: Path) -> None:
    relay.start(extra=["--tls-cert", str(cert), "--tls-key", str(key)])


def test_renewed_certificate_with_the_same_key_keeps_working_and_a_new_key_is_refused(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path / "tls", "127.0.0.1")
    relay = RelayProcess(tmp_path / "data")
    _serve(relay, cert, key)
    try:
        alice, bob = User("alice", tmp_path / "alice"), User("bob", tmp_path / "bob")
        for user in (alice, bob):  # pinned from the fingerprint the relay printed (its certificate's)
            user.ok("init", user.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
        alice.ok("send", "bob", "before the renewal")
        assert any("TLS public key fingerprint: SHA256:" in line for line in relay.output)
    finally:
        relay.stop()
    renewed = _renew(cert, key, tmp_path / "renewed.pem", days_later=60)
    assert certificate_der(renewed) != certificate_der(cert)  # another certificate ...
    _serve(relay, renewed, key)  # ... for the same key
    try:
        assert [m["text"] for m in bob.recv()] == ["before the renewal"]
        alice.ok("send", "bob", "after the renewal")
        assert [m["text"] for m in bob.recv()] == ["after the renewal"]
    finally:
        relay.stop()
    other_cert, other_key = ensure_self_signed(tmp_path / "other", "127.0.0.1")  # a new key
    _serve(relay, other_cert, other_key)
    try:
        refused = alice.run("send", "bob", "to an impostor?")
        assert refused.returncode == 1 and "changed to one with another key" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        relay.stop()


def test_a_profile_pinned_to_a_certificate_keeps_working_and_moves_to_the_key(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path / "tls", "127.0.0.1")
    relay = RelayProcess(tmp_path / "data")
    _serve(relay, cert, key)
    carol, dave = User("carol", tmp_path / "carol"), User("dave", tmp_path / "dave")
    try:
        for user in (carol, dave):
            user.ok("init", user.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)

        async def pin_certificate() -> None:  # what profiles made before key pins hold
            client = Client.open(tmp_path / "carol", "carol", PASSPHRASE)
            try:
                with client.db.transaction():
                    pin = hashlib.sha256(certificate_der(cert)).digest()
                    client.db.set_secret_meta("server_fingerprint", pin)
            finally:
                await client.close()
        asyncio.run(pin_certificate())
        carol.ok("send", "dave", "from an old profile")  # the certificate pin still matches
    finally:
        relay.stop()
    _serve(relay, _renew(cert, key, tmp_path / "renewed.pem", days_later=80), key)
    try:
        carol.ok("send", "dave", "after the renewal")  # the pin moved to the key on the last connect
        assert [m["text"] for m in dave.recv()] == ["from an old profile", "after the renewal"]
    finally:
        relay.stop()
