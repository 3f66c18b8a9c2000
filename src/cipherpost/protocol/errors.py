"""Typed protocol errors: every failure the relay reports carries one of the codes of docs/wire.md."""

from __future__ import annotations

from typing import Final

PROTOCOL_VERSION: Final = 1

BAD_FRAME: Final = "bad_frame"
UNSUPPORTED_VERSION: Final = "unsupported_version"
UNKNOWN_TYPE: Final = "unknown_type"
TOO_LARGE: Final = "too_large"
NOT_AUTHENTICATED: Final = "not_authenticated"
AUTH_FAILED: Final = "auth_failed"
ALREADY_AUTHENTICATED: Final = "already_authenticated"
INVALID_USERNAME: Final = "invalid_username"
USERNAME_TAKEN: Final = "username_taken"
REGISTRATION_CLOSED: Final = "registration_closed"
BAD_INVITE: Final = "bad_invite"
UNKNOWN_USER: Final = "unknown_user"
NO_PREKEYS: Final = "no_prekeys"
BAD_SIGNATURE: Final = "bad_signature"
BAD_PREKEY: Final = "bad_prekey"
MAILBOX_FULL: Final = "mailbox_full"
RATE_LIMITED: Final = "rate_limited"
INTERNAL: Final = "internal"
# Mailbox caps, quotas and account states (issue 9, docs/contracts.md sections 1.1 and 5):
SENDER_CAP: Final = "sender_cap"  # this sender's share of the recipient's queue is used up
QUOTA_EXCEEDED: Final = "quota_exceeded"  # the recipient's byte quota, or the relay's disk budget
SUSPENDED: Final = "suspended"  # the recipient's account is suspended or deleted
BLOCKED: Final = "blocked"  # reserved: never sent to the sender of a blocked message (it reads accepted)
STALE_PROFILE: Final = "stale_profile"
NAME_RESERVED: Final = "name_reserved"
NAME_CONFUSABLE: Final = "name_confusable"
BAD_RECOVERY: Final = "bad_recovery"
NOT_FOUND: Final = "not_found"  # cap blobs: no such blob, or not the caller's to read (the same reply)

ERROR_CODES: Final = frozenset({
    BAD_FRAME, UNSUPPORTED_VERSION, UNKNOWN_TYPE, TOO_LARGE, NOT_AUTHENTICATED, AUTH_FAILED,
    ALREADY_AUTHENTICATED, INVALID_USERNAME, USERNAME_TAKEN, REGISTRATION_CLOSED, BAD_INVITE,
    UNKNOWN_USER, NO_PREKEYS, BAD_SIGNATURE, BAD_PREKEY, MAILBOX_FULL, RATE_LIMITED, INTERNAL,
    SENDER_CAP, QUOTA_EXCEEDED, SUSPENDED, BLOCKED, STALE_PROFILE, NAME_RESERVED, NAME_CONFUSABLE,
    BAD_RECOVERY, NOT_FOUND,
})


class ProtocolError(Exception):
    """A request or frame was refused. ``code`` is one of :data:`ERROR_CODES`.

    ``rid`` is the request id when it could be read from the offending frame, so the error reply
    can be matched to the request. Messages describe the problem, never secret values or bodies.
    """

    def __init__(self, code: str, message: str, *, rid: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.rid = rid
