"""The journal file's format, written and read in process."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from ipam_da_consul.cni.helper import journal as jr

TOKEN = "journal-secret-0123456789abcdef"


NET = "testnet"


def test_journal_file_format_and_supersede(tmp_path: Path) -> None:
    """The journal alone (no Consul): atomic 0600 files in a 0700 folder, one per attachment,
    and a successful ADD of a journaled attachment drops its entry."""
    journal = jr.Journal(tmp_path / "state")
    stdin = json.dumps({"name": NET, "ipam": {"consul_token": TOKEN}}).encode()
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "x", "CNI_IFNAME": "eth0"}
    assert journal.record(stdin, env) and journal.record(stdin, env)
    assert len(journal) == 1
    [entry] = journal.entries()
    assert (entry.network, entry.container, entry.ifname, entry.stdin) == (NET, "x", "eth0", stdin)
    assert stat.S_IMODE(entry.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(entry.path.parent.stat().st_mode) == 0o700
    assert not list(entry.path.parent.glob(".*"))  # no temporary file left behind
    # A replay's own failure is never journaled again.
    assert not journal.record(stdin, {**env, jr.REPLAY_MARK: "1", "CNI_CONTAINERID": "y"})
    # A failed ADD keeps the entry; a successful one drops it.
    add = {**env, "CNI_COMMAND": "ADD"}
    with journal.call(stdin, add) as done:
        done(11)
    assert len(journal) == 1
    with journal.call(stdin, add) as done:
        done(0)
    assert len(journal) == 0
    # A folder others can read is refused: entries hold tokens.
    loose = tmp_path / "loose" / jr.JOURNAL_FOLDER
    loose.mkdir(parents=True, mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(OSError, match="0700"):
        jr.Journal(loose.parent)
