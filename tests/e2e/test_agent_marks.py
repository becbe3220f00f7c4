"""The harness's "nothing written to KV" mark (tests/support/agent.py KVMark): a session of an
earlier test ending meanwhile is no write; any write, or a session end after one, is."""

from __future__ import annotations

from tests.support.agent import ConsulAgent


def _session_holding(consul: ConsulAgent, key: str) -> str:
    r = consul.http.put(
        f"{consul.url}/v1/session/create",
        json={"TTL": "10s", "Behavior": "delete", "LockDelay": "0s"},
        timeout=10,
    )
    r.raise_for_status()
    session = r.json()["ID"]
    took = consul.http.put(
        f"{consul.url}/v1/kv/{key}", params={"acquire": session}, data=b"{}", timeout=10
    )
    assert took.json() is True
    return str(session)


def _end(consul: ConsulAgent, session: str) -> None:
    consul.http.put(f"{consul.url}/v1/session/destroy/{session}", timeout=10).raise_for_status()


def test_a_session_ending_is_no_write_and_a_write_is_one(consul: ConsulAgent) -> None:
    first = _session_holding(consul, "marks/cooling-1")
    before = consul.kv_index()
    _end(consul, first)
    assert consul.get("marks/cooling-1") is None
    assert consul.kv_index() == before  # only a session ended

    before = consul.kv_index()
    consul.put("marks/written", {"target": "x"})
    assert consul.kv_index() != before

    second = _session_holding(consul, "marks/cooling-2")
    before = consul.kv_index()
    consul.put("marks/written", {"target": "y"})
    _end(consul, second)  # the last move is a session's, but a key was written before it
    assert consul.kv_index() != before
