"""Group state rules (client/group_state.py; docs/groups.md section 1): one test per rule."""

from __future__ import annotations

import itertools
import os

import pytest

from cipherpost.client.group_state import (
    ChangeDoesNotFollow,
    GroupChangeRefused,
    GroupState,
    apply_change,
    merge_logs,
    replay,
    sign_change,
)
from cipherpost.crypto.identity import IdentityKeyPair

KEYS = {n: IdentityKeyPair.generate() for n in ("alice", "bob", "carol", "dave", "erin")}


def _member(name: str) -> list[object]:
    return [name, KEYS[name].public.encode()]


def _create(admins: list[str] | None = None) -> tuple[list, GroupState]:  # type: ignore[type-arg]
    gid = os.urandom(32)
    change = sign_change(KEYS["alice"], "alice", None, gid, "create",
                         ["team", [_member("alice"), _member("bob"), _member("carol")], admins or ["alice"]])
    return [change], apply_change(None, change)


def test_create_then_add_remove_leave() -> None:
    log, s1 = _create()
    c2 = sign_change(KEYS["alice"], "alice", s1, s1.group_id, "add", [_member("dave")])
    s2 = apply_change(s1, c2)
    s3 = apply_change(s2, c3 := sign_change(KEYS["alice"], "alice", s2, s2.group_id, "remove", ["carol"]))
    s4 = apply_change(s3, c4 := sign_change(KEYS["bob"], "bob", s3, s3.group_id, "leave", []))
    assert sorted(s4.members) == ["alice", "dave"] and s4.version == 4 and s4.admins == {"alice"}
    assert replay([*log, c2, c3, c4]).hash() == s4.hash()


def test_change_signed_by_non_admin_is_refused() -> None:
    _, s1 = _create()
    forged = sign_change(KEYS["bob"], "bob", s1, s1.group_id, "add", [_member("erin")])
    with pytest.raises(GroupChangeRefused, match="not an admin"):
        apply_change(s1, forged)


def test_change_claiming_an_admin_but_signed_by_another_key_is_refused() -> None:
    _, s1 = _create()
    forged = sign_change(KEYS["erin"], "alice", s1, s1.group_id, "add", [_member("erin")])
    with pytest.raises(GroupChangeRefused, match="does not verify"):
        apply_change(s1, forged)


def test_tampered_change_is_refused_and_state_unchanged() -> None:
    _, s1 = _create()
    before = s1.hash()
    good = sign_change(KEYS["alice"], "alice", s1, s1.group_id, "add", [_member("dave")])
    tampered = type(good)(good.group_id, good.version, good.base_hash, good.op, [_member("erin")],
                          good.signer, good.signature)
    with pytest.raises(GroupChangeRefused):
        apply_change(s1, tampered)
    assert s1.hash() == before and "erin" not in s1.members


def test_change_with_wrong_base_is_refused() -> None:
    _, s1 = _create()
    s2 = apply_change(s1, sign_change(KEYS["alice"], "alice", s1, s1.group_id, "add", [_member("dave")]))
    stale = sign_change(KEYS["alice"], "alice", s1, s1.group_id, "remove", ["bob"])   # names version 1
    with pytest.raises(ChangeDoesNotFollow):
        apply_change(s2, stale)


def test_change_for_another_group_is_refused() -> None:
    _, s1 = _create()
    _, other = _create()
    with pytest.raises(GroupChangeRefused):
        apply_change(other, sign_change(KEYS["alice"], "alice", s1, s1.group_id, "remove", ["bob"]))


def test_last_admin_leaving_hands_the_role_to_the_first_remaining_name() -> None:
    _, s1 = _create()
    s2 = apply_change(s1, sign_change(KEYS["alice"], "alice", s1, s1.group_id, "leave", []))
    assert s2.admins == {"bob"}


def test_admin_cannot_remove_the_last_admin_leaving_members() -> None:
    _, s1 = _create()
    with pytest.raises(GroupChangeRefused, match="without an admin"):
        apply_change(s1, sign_change(KEYS["alice"], "alice", s1, s1.group_id, "remove", ["alice"]))


def test_concurrent_changes_converge_whatever_the_order() -> None:
    log, s1 = _create(admins=["alice", "bob"])
    by_alice = sign_change(KEYS["alice"], "alice", s1, s1.group_id, "add", [_member("dave")])
    by_bob = sign_change(KEYS["bob"], "bob", s1, s1.group_id, "remove", ["carol"])
    s_a = apply_change(s1, by_alice)
    later_on_a = sign_change(KEYS["alice"], "alice", s_a, s1.group_id, "add", [_member("erin")])
    branches = [[*log, by_alice, later_on_a], [*log, by_bob]]
    results = set()
    for first, second in itertools.permutations(branches):
        merged = merge_logs(first, second)
        results.add(replay(merged).hash())
    assert len(results) == 1   # every member ends on the same state
    winner = min(by_alice, by_bob, key=lambda c: c.digest())
    assert merge_logs(*branches)[1].digest() == winner.digest()


def test_missed_change_is_merged_from_a_log() -> None:
    log, s1 = _create()
    c2 = sign_change(KEYS["alice"], "alice", s1, s1.group_id, "add", [_member("dave")])
    s2 = apply_change(s1, c2)
    c3 = sign_change(KEYS["alice"], "alice", s2, s2.group_id, "remove", ["carol"])
    with pytest.raises(ChangeDoesNotFollow):   # carol's peer bob missed c2: c3 alone does not apply
        apply_change(s1, c3)
    merged = merge_logs(log, [*log, c2, c3])
    assert replay(merged).hash() == apply_change(s2, c3).hash()


def test_log_with_a_forged_step_stops_there() -> None:
    log, s1 = _create()
    forged = sign_change(KEYS["bob"], "bob", s1, s1.group_id, "add", [_member("erin")])
    assert [c.digest() for c in merge_logs(log, [*log, forged])] == [c.digest() for c in log]
