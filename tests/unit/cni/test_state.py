"""The host's state folder (cni/state.py) in process: who may steer it, entries as locks and
ledgers, pending marks, fence sessions; and the helper's replay loop (cni/helper/journal.py)
over it with a stand-in for the work."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from ipam_da_consul.allocator.ledger import Claim
from ipam_da_consul.cni import state as st
from ipam_da_consul.cni.helper.journal import GIVE_UP_AFTER, Replayer

from tests.support.memkv import MemKV

TOKEN = "state-secret-0123456789abcdef"
NET = "testnet"
ATT = (NET, "ctr", "eth0")


def folder(tmp_path: Path) -> st.StateDir:
    return st.StateDir(str(tmp_path / "state"))


def test_the_folder_is_made_private_and_entries_are_0600(tmp_path: Path) -> None:
    state = folder(tmp_path)
    with state.entry(ATT, time.monotonic() + 1) as entry:
        entry.remember(json.dumps({"ipam": {"consul_token": TOKEN}}).encode(), {"A": "b"})
        entry.save([Claim("ipam/p/10.0.0.1", b'{"target": "ctr"}', None, "c1", "sent")])
    path = tmp_path / "state" / "attachments" / f"{st.entry_name(ATT)}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for sub in ("", "attachments", "pending", "sessions"):
        assert stat.S_IMODE((tmp_path / "state" / sub).stat().st_mode) == 0o700
    assert state.pending() == [st.entry_name(ATT)]  # a claim in flight is work left


def test_a_folder_others_can_read_or_steer_is_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(st.StateError, match="0700"):
        st.StateDir(str(loose))
    # An ancestor anyone may write to (without the sticky bit) could swap the folder.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(st.StateError, match="writable by others"):
        st.StateDir(str(shared / "state"))
    # Sticky, as /tmp is: others cannot rename what is ours in it.
    shared.chmod(0o1777)
    st.StateDir(str(shared / "state")).close()


def test_an_ancestor_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(st.StateError, match="uid 65534"):
        st.StateDir(str(theirs / "state"))


def test_an_entry_planted_as_a_symlink_or_with_another_mode_is_refused(tmp_path: Path) -> None:
    state = folder(tmp_path)
    name = f"{st.entry_name(ATT)}.json"
    target = tmp_path / "elsewhere"
    target.write_text("x")
    os.symlink(target, tmp_path / "state" / "attachments" / name)
    with pytest.raises(OSError):
        state.entry(ATT, time.monotonic() + 1)
    (tmp_path / "state" / "attachments" / name).unlink()
    plain = tmp_path / "state" / "attachments" / name
    plain.write_text("")
    plain.chmod(0o644)
    with pytest.raises(st.StateError, match="0644"):
        state.entry(ATT, time.monotonic() + 1)


def test_an_entry_is_a_lock_held_for_the_call(tmp_path: Path) -> None:
    state = folder(tmp_path)
    first = state.entry(ATT, time.monotonic() + 1)
    first.save([Claim("k", b"v", None, "c1", "held")])
    assert state.try_entry(st.entry_name(ATT)) is None
    with pytest.raises(st.StateError, match="stayed locked"):
        state.entry(ATT, time.monotonic() + 0.2)
    got: list[st.Entry] = []
    waiter = threading.Thread(target=lambda: got.append(state.entry(ATT, time.monotonic() + 5)))
    waiter.start()
    time.sleep(0.1)
    first.close()
    waiter.join()
    assert [c.key for c in got[0].claims()] == ["k"]
    got[0].close()


def test_an_entry_removed_by_the_holder_is_not_reused_by_a_waiter(tmp_path: Path) -> None:
    """The holder deletes the attachment's entry while another call waits on its lock: the
    waiter must work on a fresh entry, not the unlinked file."""
    state = folder(tmp_path)
    first = state.entry(ATT, time.monotonic() + 1)
    first.save([Claim("k", b"v", None, "c1", "held")])
    got: list[st.Entry] = []
    waiter = threading.Thread(target=lambda: got.append(state.entry(ATT, time.monotonic() + 5)))
    waiter.start()
    time.sleep(0.1)
    first.done()
    first.close()
    waiter.join()
    entry = got[0]
    assert entry.claims() == [] and os.fstat(entry.fd).st_nlink == 1
    entry.save([Claim("k2", b"v", None, "c2", "held")])
    entry.close()
    with state.entry(ATT, time.monotonic() + 1) as again:
        assert [c.key for c in again.claims()] == ["k2"]


def test_an_empty_entry_leaves_no_file_and_a_settled_one_no_mark(tmp_path: Path) -> None:
    state = folder(tmp_path)
    state.entry(ATT, time.monotonic() + 1).close()
    assert state.names() == []
    with state.entry(ATT, time.monotonic() + 1) as entry:
        entry.save([Claim("k", b"v", None, "c1", "held")])
    assert state.names() == [st.entry_name(ATT)] and state.pending() == []


def test_a_torn_rewrite_reads_its_first_line(tmp_path: Path) -> None:
    state = folder(tmp_path)
    with state.entry(ATT, time.monotonic() + 1) as entry:
        entry.save([Claim("a-long-key-name-" * 8, b"v", None, "c1", "held")])
        entry.save([Claim("k", b"v", None, "c1", "doubt")])
        # As if killed between the rewrite and the truncate: the old tail stays after the line.
        os.pwrite(entry.fd, b"\n" + b"x" * 300, os.fstat(entry.fd).st_size - 1)
    with state.entry(ATT, time.monotonic() + 1) as entry:
        assert [(c.key, c.state) for c in entry.claims()] == [("k", "doubt")]


def test_an_unreadable_entry_is_kept_for_an_operator(tmp_path: Path) -> None:
    state = folder(tmp_path)
    path = tmp_path / "state" / "attachments" / f"{st.entry_name(ATT)}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'{"v": 99}\n')
    os.close(fd)
    with state.entry(ATT, time.monotonic() + 1) as entry:
        assert entry.unreadable and "unknown entry version" in entry.unreadable
        with pytest.raises(st.StateError):
            entry.save([])
    assert path.read_bytes() == b'{"v": 99}\n'


def test_an_entry_round_trips_through_its_schema_and_a_bad_claim_makes_it_unreadable(
    tmp_path: Path,
) -> None:
    state = folder(tmp_path)
    path = tmp_path / "state" / "attachments" / f"{st.entry_name(ATT)}.json"
    claims = [
        Claim("k1", b"\xff not UTF-8", None, "c1", "doubt", True),
        Claim("k2", b"v", b"old", "c1", "held", False, "ipam/.fences/n/t/eth0", 7),
    ]
    with state.entry(ATT, time.monotonic() + 1) as entry:
        entry.remember(b'{"name": "n"}', {"CNI_COMMAND": "ADD"})
        entry.save(claims)
    written = json.loads(path.read_bytes())
    assert list(written) == ["v", "network", "container", "ifname", "claims", "context",
                             "deleting", "attempts"]
    with state.entry(ATT, time.monotonic() + 1) as entry:
        assert entry.claims() == claims and entry.unreadable is None
        assert entry.context == st.Call(b'{"name": "n"}', {"CNI_COMMAND": "ADD"})
        entry.save([])
    written["claims"][0]["state"] = "won"  # no such state: nothing to guess
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, json.dumps(written).encode())
    os.close(fd)
    with state.entry(ATT, time.monotonic() + 1) as entry:
        assert entry.unreadable is not None and "state" in entry.unreadable


def test_a_del_taken_over_is_fsynced_and_marked(tmp_path: Path) -> None:
    state = folder(tmp_path)
    with state.entry(ATT, time.monotonic() + 1) as entry:
        entry.journal_del(b'{"name": "testnet"}', {"CNI_COMMAND": "DEL"})
    assert state.pending() == [st.entry_name(ATT)]
    with state.entry(ATT, time.monotonic() + 1) as entry:
        assert entry.deleting is not None and entry.deleting.stdin == b'{"name": "testnet"}'


def test_fence_sessions_are_shared_for_a_period_and_replaced_when_refused(tmp_path: Path) -> None:
    state = folder(tmp_path)
    kv = MemKV()
    one = state.sessions("reach-a", "fences", 4200)
    two = state.sessions("reach-a", "fences", 4200)
    other = state.sessions("reach-b", "fences", 4200)
    s1 = one.get(kv)
    assert s1 is not None and two.get(kv) == s1  # another call (process) shares it
    assert other.get(kv) != s1  # another token or Consul: its own
    two.failed(s1)
    s2 = one.get(kv)
    assert s2 not in (None, s1)
    for file in (tmp_path / "state" / "sessions").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600


def test_a_session_is_replaced_after_its_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = folder(tmp_path)
    kv = MemKV()
    sessions = state.sessions("reach", "fences", 4200)
    s1 = sessions.get(kv)
    later = time.clock_gettime(time.CLOCK_BOOTTIME) + st.SESSION_PERIOD + 1
    monkeypatch.setattr(st.time, "clock_gettime", lambda clock: later)
    assert sessions.get(kv) not in (None, s1)


def test_without_session_rights_fences_go_without_a_session(tmp_path: Path) -> None:
    from ipam_da_consul.allocator.store import StoreError

    class NoSessions(MemKV):
        def create_session(self, name: str, ttl: float) -> str:
            raise StoreError("HTTP 403 Permission denied", 403)

    sessions = folder(tmp_path).sessions("reach", "fences", 4200)
    assert sessions.get(NoSessions()) is None


def test_the_replay_loop_backs_off_and_gives_up_with_every_name(tmp_path: Path) -> None:
    state = folder(tmp_path)
    with state.entry(ATT, time.monotonic() + 1) as entry:
        entry.journal_del(b"{}", {})
    tries: list[int] = []

    def fail(entry: st.Entry) -> int:
        tries.append(entry.attempts)
        return 11

    replayer = Replayer(state, fail)
    assert replayer.pass_once() == pytest.approx(0.5)
    assert replayer.pass_once() is not None and len(tries) == 1  # not due yet
    with state.entry(ATT, time.monotonic() + 1) as entry:
        entry.attempts = GIVE_UP_AFTER - 1
        entry.write()
    replayer.next_try.clear()
    replayer.pass_once()
    replayer.next_try.clear()
    replayer.pass_once()
    assert len(tries) == 2  # given up on: kept, never tried on its own again
    assert state.pending() == [st.entry_name(ATT)]
    # Counted once, for the helper's stats and metrics.
    assert replayer.counts() == {"journal_replayed": 0, "journal_voided": 0, "journal_expired": 1}


def test_the_replay_loop_drops_what_is_done(tmp_path: Path) -> None:
    state = folder(tmp_path)
    with state.entry(ATT, time.monotonic() + 1) as entry:
        entry.journal_del(b"{}", {})

    def finish(entry: st.Entry) -> int:
        entry.deleting = None
        entry.write()
        return 0

    replayer = Replayer(state, finish)
    assert replayer.pass_once() is None
    assert state.pending() == [] and state.names() == []
    assert replayer.counts() == {"journal_replayed": 1, "journal_voided": 0, "journal_expired": 0}


def test_a_del_that_can_never_succeed_is_counted_as_given_up(tmp_path: Path) -> None:
    state = folder(tmp_path)
    with state.entry(ATT, time.monotonic() + 1) as entry:
        entry.journal_del(b"{}", {})

    def invalid(entry: st.Entry) -> int:
        entry.deleting = None  # what cni/replay.py does with a config error (7)
        entry.write()
        return 7

    replayer = Replayer(state, invalid)
    assert replayer.pass_once() is None
    assert replayer.counts()["journal_expired"] == 1


def test_dels_taken_over_are_counted_once_per_entry(tmp_path: Path) -> None:
    state = folder(tmp_path)
    for _ in range(2):  # the runtime retries the same DEL: one entry
        with state.entry(ATT, time.monotonic() + 1) as entry:
            entry.journal_del(b"{}", {})
    with state.entry((NET, "ctr2", "eth0"), time.monotonic() + 1) as entry:
        entry.journal_del(b"{}", {})
    assert state.taken_over == 2


def test_missing_folders_above_it_are_made_private(tmp_path: Path) -> None:
    st.StateDir(str(tmp_path / "a" / "b" / "state")).close()
    for folder in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_the_helpers_stats_carry_the_journal_counts(tmp_path: Path) -> None:
    from ipam_da_consul.cni.helper.caches import PoolCaches

    caches = PoolCaches(1.0, make_kv=lambda settings: MemKV())  # type: ignore[arg-type,return-value]
    assert not any(k.startswith("journal_") for k in caches.counts())  # no state folder
    caches.state = folder(tmp_path)
    caches.replayer = Replayer(caches.state, lambda entry: 11)
    with caches.state.entry(ATT, time.monotonic() + 1) as entry:
        entry.journal_del(b"{}", {})
    counts = caches.counts()
    assert {k: v for k, v in counts.items() if k.startswith("journal_")} == {
        "journal_taken_over": 1,
        "journal_pending": 1,
        "journal_replayed": 0,
        "journal_voided": 0,
        "journal_expired": 0,
    }


def test_notes_are_read_through_their_schema_and_a_bad_one_is_no_note(tmp_path: Path) -> None:
    state = folder(tmp_path)
    hints = st.NoteHints(state, "scope")
    hints.remember_hint("blue", "10.0.21.7")
    assert hints.hint("blue") == "10.0.21.7"
    assert st.NoteHints(state, "other scope").hint("blue") is None
    state.observe("reconcile blue", 42)
    seen = state.observed("reconcile blue")
    assert seen is not None and seen[0] == 42 and 0 <= seen[1] < 60
    notes = tmp_path / "state" / "notes"
    bad: list[tuple[str, dict[str, object]]] = [
        ("stripe-hint scope blue", {"address": "not an address"}),
        ("reconcile blue", {"index": "42", "boot": "b", "since": 0.0}),
    ]
    for key, body in bad:
        (notes / st._note_name(key)).write_text(json.dumps({**body, "key": key}))
    assert hints.hint("blue") is None
    assert state.observed("reconcile blue") is None
    hints.remember_hint("blue", None)
    assert not (notes / st._note_name("stripe-hint scope blue")).exists()
