"""A randomized soak against a real Consul: workers run real plugin processes doing ADD,
repeated ADD, DEL and repeated DEL on a pool smaller than the number of containers.

As runtimes guarantee, one container never has two operations at once: each worker owns its
containers. Bounded in time and count, seeded so a failing sequence can be replayed."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import requests

from tests.support.util_procs import Call, Done, run_many, run_one

SEED = int(os.environ.get("SOAK_SEED", "20240611"))
SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))
MAX_CALLS = 600
WORKERS = 8
CONTAINERS_PER_WORKER = 2  # 16 containers
# 10.8.0.10 .. 10.8.0.15: 6 addresses for 16 containers, so "pool full" happens often.
RANGES = [{"subnet": "10.8.0.0/24", "rangeStart": "10.8.0.10", "rangeEnd": "10.8.0.15",
           "gateway": "10.8.0.1"}]
ADDRESSES = {f"10.8.0.{i}" for i in range(10, 16)}


@dataclass
class Worker:
    index: int
    containers: list[str]
    rng: random.Random
    # container -> address after its last successful call (None: last success was DEL/none).
    state: dict[str, str | None] = field(default_factory=dict)
    log: list[Done] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def holdings(url: str, pool: str) -> dict[str, str]:
    """target -> ip, read straight from Consul (a plain request: threads share no session)."""
    import base64
    import json

    folder = f"ipam/{pool}/"
    r = requests.get(f"{url}/v1/kv/{folder}", params={"recurse": "true"}, timeout=10)
    r.raise_for_status()
    out: dict[str, str] = {}
    for e in r.json():
        if e["Key"] == folder:
            continue
        target = json.loads(base64.b64decode(e["Value"]))["target"]
        if target in out:
            out[target] += "," + e["Key"][len(folder):]  # shows up as a mismatch below
        else:
            out[target] = e["Key"][len(folder):]
    return out


def soak(worker: Worker, conf: dict, url: str, pool: str, until: float,
         budget: threading.Semaphore) -> None:
    last: tuple[str, str] | None = None
    while time.monotonic() < until and budget.acquire(blocking=False):
        if last is not None and worker.rng.random() < 0.3:
            container, command = last  # a runtime retrying the same call
        else:
            container = worker.rng.choice(worker.containers)
            command = worker.rng.choice(["ADD", "ADD", "DEL"])
        last = (container, command)
        done = run_one(Call(command, container, conf))
        worker.log.append(done)
        before = worker.state.get(container)
        if command == "ADD" and done.rc == 0:
            if before is not None and done.address != before:
                worker.problems.append(f"repeated ADD moved {container}: {before} -> {done!r}")
            worker.state[container] = done.address
        elif command == "ADD":
            # Only a container holding nothing can be refused, and only for a full pool.
            if done.rc != 122 or before is not None or done.json.get("code") != 122:
                worker.problems.append(f"unexpected ADD failure (held {before}): {done!r}")
        elif done.rc == 0 and done.stdout == "":
            worker.state[container] = None
        else:
            worker.problems.append(f"DEL failed: {done!r}")
        # This worker alone touches this container, so KV must agree right now.
        held = holdings(url, pool).get(container)
        if held != worker.state.get(container):
            worker.problems.append(
                f"after {command} {container}: KV has {held}, expected "
                f"{worker.state.get(container)} ({done!r})"
            )


@pytest.mark.slow
def test_randomized_soak(consul, make_pool, conf_for):
    pool = make_pool(RANGES)
    # A generous budget: this is about correctness under interleaving, not speed.
    conf = conf_for(pool, timeout=60)
    workers = [
        Worker(w, [f"soak-{w}-{k}" for k in range(CONTAINERS_PER_WORKER)],
               random.Random(f"{SEED}-{w}"))
        for w in range(WORKERS)
    ]
    budget = threading.Semaphore(MAX_CALLS)
    until = time.monotonic() + SECONDS
    threads = [
        threading.Thread(target=soak, args=(w, conf, consul.url, pool, until, budget))
        for w in workers
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 120)
        assert not t.is_alive(), "a soak worker hung"
    took = time.monotonic() - started

    calls = [d for w in workers for d in w.log]
    problems = [p for w in workers for p in w.problems]
    kinds = Counter((d.call.command, d.rc) for d in calls)
    print(f"\n[soak] seed {SEED}: {len(calls)} calls in {took:.1f}s: {dict(kinds)}")
    assert problems == [], "\n".join(problems[:10])
    assert len(calls) >= 40, kinds  # enough interleaving to mean something
    assert kinds[("ADD", 0)] and kinds[("ADD", 122)] and kinds[("DEL", 0)], kinds

    # The invariant: no address held twice, and the keys are exactly the containers whose
    # last successful call was ADD, each at the address that call printed.
    expected = {c: ip for w in workers for c, ip in w.state.items() if ip is not None}
    held = consul.allocations(pool)
    assert [t for t, n in Counter(held.values()).items() if n > 1] == [], held
    assert {target: ip for ip, target in held.items()} == expected
    assert set(held) <= ADDRESSES

    dels = run_many(Call("DEL", c, conf) for w in workers for c in w.containers)
    assert [d for d in dels if d.rc != 0] == []
    assert consul.tree(f"ipam/{pool}/") == {f"ipam/{pool}/": b""}
