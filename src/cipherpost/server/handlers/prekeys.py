"""``upload_prekeys`` and ``fetch_bundle``: what an account publishes, and who may spend it.

Uploads: the account's upload budget (in keys) is spent first, then key ids and pool sizes are
checked, all before the first signature is verified: re-uploading the same keys in a loop costs
the relay one limiter hit per frame once over budget, not 150 signature checks and an fsynced
write (issue 9).

Fetches: each one spends one of the target's one-time prekeys. Per requester and per (requester,
target) limits refuse; the per-target limit, over all requesters together, does not: beyond it the
bundle carries the last-resort KEM prekey and no one-time X25519 prekey, which still starts a
session (PQXDH section 3.3: the one-time prekeys are optional), so a first contact is never
refused, however many throwaway accounts drain the pool. Limiter keys are made only for targets
that exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...crypto.errors import CryptoError
from ...crypto.prekeys import KemPrekey, OneTimePrekey, SignedPrekey
from ...protocol import errors as E
from ...protocol.errors import ProtocolError
from ...protocol.frames import Bundle, FetchBundle, Ok, PrekeyCounts, PrekeysLow, UploadPrekeys, encode_frame
from ...protocol.usernames import require_normalized
from ...store.base import NoPrekeys, PoolCounts, PrekeyPoolFull, UnknownAccount
from ..limits import pair_key, retry_text
from . import accounts

if TYPE_CHECKING:
    from ..connection import Connection


async def upload_prekeys(conn: Connection, frame: UploadPrekeys) -> None:
    assert conn.username is not None
    username = conn.username
    cfg = conn.config
    server = conn.server
    # 1. The account's upload budget, in keys (signature checks and bytes written), spent before
    # anything else: a refused upload costs a limiter hit, not even decoding.
    cost = max(1, len(frame.one_time) + len(frame.kem_one_time) + (frame.signed_prekey is not None)
               + (frame.kem_last_resort is not None))
    decision = await server.limiters.prekey_uploads.hit(username, cost)
    if not decision.allowed:
        raise ProtocolError(E.RATE_LIMITED, f"too many prekeys uploaded by this account "
                            f"({cfg.prekey_uploads_per_account_per_hour} per hour); {retry_text(decision)}")
    # 2. Cheap checks: key ids (decoding reads them; no signature yet) and pool sizes.
    try:
        signed = None if frame.signed_prekey is None else SignedPrekey.decode(frame.signed_prekey)
        one_time = [OneTimePrekey.decode(b) for b in frame.one_time]
        kem = [KemPrekey.decode(b) for b in frame.kem_one_time]
        last_resort = None if frame.kem_last_resort is None else KemPrekey.decode(frame.kem_last_resort)
    except CryptoError as exc:
        raise ProtocolError(E.BAD_PREKEY, f"undecodable prekey ({exc})") from None
    if any(k.last_resort for k in kem):
        raise ProtocolError(E.BAD_PREKEY, "kem_one_time holds a key marked last_resort")
    if last_resort is not None and not last_resort.last_resort:
        raise ProtocolError(E.BAD_PREKEY, "kem_last_resort holds a key not marked last_resort")
    for name, keys in (("one_time", one_time), ("kem_one_time", kem)):
        if len({k.key_id for k in keys}) != len(keys):
            raise ProtocolError(E.BAD_PREKEY, f"{name} repeats a key id")
    have = PoolCounts(0, 0) if frame.replace else await server.store.prekey_counts(username)
    max_pool = cfg.max_prekey_pool
    if have.one_time + len(one_time) > max_pool or have.kem + len(kem) > max_pool:
        raise ProtocolError(E.BAD_PREKEY, f"a one-time prekey pool would exceed {max_pool} keys "
                                          f"(holds {have.one_time} X25519 and {have.kem} ML-KEM)")
    # 3. PQXDH section 3.2: prekeys are signed by the identity; refuse any that is not.
    identity = await server.identity_of(username)
    assert identity is not None
    try:
        for key in [signed, last_resort, *kem]:
            if key is not None:
                key.verify(identity)
    except CryptoError:
        raise ProtocolError(E.BAD_SIGNATURE, "a prekey signature does not verify against the account "
                                             "identity") from None
    try:
        counts = await server.store.put_prekeys(
            username, signed_prekey=frame.signed_prekey,
            one_time=[(k.key_id, b) for k, b in zip(one_time, frame.one_time, strict=True)],
            kem_one_time=[(k.key_id, b) for k, b in zip(kem, frame.kem_one_time, strict=True)],
            kem_last_resort=frame.kem_last_resort, max_pool=max_pool, replace_pools=frame.replace)
    except PrekeyPoolFull as exc:
        raise ProtocolError(E.BAD_PREKEY, str(exc)) from None
    conn.push_frame(encode_frame(Ok(rid=frame.rid, prekeys=PrekeyCounts(counts.one_time, counts.kem))))


async def fetch_bundle(conn: Connection, frame: FetchBundle) -> None:
    assert conn.username is not None
    requester = conn.username
    target = require_normalized(frame.username)
    server = conn.server
    cfg = conn.config
    limits = server.limiters
    if await server.identity_of(target) is None:  # before any limiter: no key for a made-up name
        raise await accounts.not_active(conn, target)  # unknown, suspended or deleted
    pair = pair_key(requester, target)
    decision = await limits.fetch_pair.peek(pair)
    if not decision.allowed:
        raise ProtocolError(E.RATE_LIMITED, f"too many prekey bundle fetches for {target!r} "
                            f"({cfg.bundle_fetches_per_target_per_hour} per hour); {retry_text(decision)}")
    # Group setup and rotation spend their own budget, so a 1000-member group does not use up the
    # budget for new contacts (or stall on it); the per-pair and per-target bounds apply to both.
    budget = cfg.group_bundle_fetches_per_hour if frame.group else cfg.bundle_fetches_per_hour
    decision = await (limits.group_fetch if frame.group else limits.fetch).hit(requester)
    if not decision.allowed:
        what = "group " if frame.group else ""
        raise ProtocolError(E.RATE_LIMITED, f"too many {what}prekey bundle fetches from this account "
                            f"({budget} per hour); {retry_text(decision)}")
    await limits.fetch_pair.hit(pair)
    one_time = (await limits.one_time_target.hit(target)).allowed
    try:
        parts = await server.store.take_bundle(target, one_time=one_time)
    except UnknownAccount:
        raise await accounts.not_active(conn, target) from None
    except NoPrekeys:
        raise ProtocolError(E.NO_PREKEYS, f"{target!r} has not published prekeys yet") from None
    server.metrics.bundles_served += 1
    if not one_time:
        server.metrics.bundles_last_resort += 1
    conn.push_frame(encode_frame(Bundle(
        rid=frame.rid, username=target, identity=parts.identity, signed_prekey=parts.signed_prekey,
        kem_prekey=parts.kem_prekey, one_time_prekey=parts.one_time_prekey)))
    left = parts.remaining
    threshold = cfg.prekeys_low_threshold
    if one_time and (left.one_time < threshold or left.kem < threshold):
        server.notify(target, encode_frame(PrekeysLow(one_time=left.one_time, kem=left.kem)))
