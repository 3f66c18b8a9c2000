"""Errors of the client layer. Each message is one clear line meant for the person at the keyboard."""

from __future__ import annotations

import unicodedata

MAX_SERVER_TEXT = 300


def _from_server(text: str) -> str:
    """Relay-supplied text made safe to print: control, format and line-separator characters (an
    escape sequence, a bidi override) become visible escapes; the length is bounded."""
    out = [ch.encode("unicode_escape").decode("ascii")
           if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch
           for ch in text[:MAX_SERVER_TEXT]]
    return "".join(out) + ("..." if len(text) > MAX_SERVER_TEXT else "")


class ClientError(Exception):
    """Base class of every error the Client API raises on purpose."""


class ProfileError(ClientError):
    """The local profile is missing, locked by another process, or damaged."""


class WrongPassphraseError(ProfileError):
    """The passphrase does not open this profile's key store (or the file was modified)."""


class ProfileLocked(ProfileError):
    """Another cipherpost process has this profile open."""


class ServerError(ClientError):
    """The relay answered with an error frame."""

    def __init__(self, code: str, message: str):
        code, message = _from_server(code), _from_server(message)   # the relay may be hostile
        super().__init__(f"server refused ({code}): {message}")
        self.code = code
        self.server_message = message


class ConnectionFailed(ClientError):
    """The relay could not be reached or the connection broke."""


class BadReply(ConnectionFailed):
    """The relay answered a request with a frame that does not answer it or cannot be decoded."""


class ServerPinMismatch(ClientError):
    """The relay's TLS certificate is not the one pinned for this profile."""


class IdentityChanged(ClientError):
    """A contact's identity key differs from the pinned one; sending is blocked until accepted."""

    def __init__(self, name: str, verified: bool, old_safety: str, new_safety: str):
        level = "VERIFIED contact" if verified else "contact"
        super().__init__(
            f"the identity key of {level} '{name}' has CHANGED. Messages to them are blocked until "
            f"you check the new safety number with them and run `cipherpost verify {name}`. "
            f"old safety number: {old_safety}  new safety number: {new_safety}"
        )
        self.name = name
        self.verified = verified


class ContactBlocked(ClientError):
    """Sending to this contact is blocked until a verification succeeds."""


class UnknownContact(ClientError):
    """No such contact in the profile (and none on the server, where that was asked)."""


class VerificationError(ClientError):
    """A verification did not succeed (wrong password or substituted key: deliberately not said which)."""


class StaleProfile(ClientError):
    """This copy of the profile is older than one that logged in since (docs/accounts.md)."""


class RecoveryFailed(ClientError):
    """The relay refused the recovery code, or limited the attempts."""
