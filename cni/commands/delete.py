"""DEL: raise the attachment's fence, then release every key of it.

The fence goes up first (connected -> fenced), so a write of this attachment still in flight
(a failed ADD's, whose reply was lost) can no longer apply; the linearizable reads after it see
any that did. The keys released: every key of the attachment in each pool's folder, and every
key its ledger names (cni/state.py), whichever pool it is in. Each is deleted only in the exact
version read: a version written after the fence belongs to a newer ADD.

When no Consul server can be reached, the helper takes the DEL over: it records it in the
attachment's entry (durably), answers success, and finishes it once Consul answers. Until then
the keys stay, so nobody else can be given the addresses; the runtime, told the DEL is done,
tears the interface down. The attachment's next call finishes the DEL before anything else.
"""

from __future__ import annotations

from loguru import logger

from ...allocator.errors import InvalidPool, PoolMissing, WriteConflict
from ...allocator.pool import Held
from .. import config
from ..errors import CNIError, Code
from .base import PoolCommand

# Set on the environment of a DEL the helper (or a later call) finishes from an entry: its own
# failure must not be taken over again.
REPLAY_MARK = "IPAM_DA_CONSUL_REPLAY"


class Del(PoolCommand):
    name = "DEL"
    keeps_ledger = True
    held: list[Held]  # this pool's keys of ours, set by next_pool

    def at_connected(self) -> str:
        self.allocator.raise_fence("DEL")
        return "fence"

    def at_fenced(self) -> str:
        return self.next_pool_or_emit()

    def load(self, request: config.PoolRequest) -> None:
        self.held = self.our_keys(request.name)

    def our_keys(self, pool: str) -> list[Held]:
        """Every key of this attachment in the pool, from linearizable reads after the fence
        went up. With `pick` stripe: the keys its ledger and prevResult name, read one by one
        (a DEL never lists a pool's 60,000 keys), or without either (an older version's ADD, no
        state folder) this host's home stripe. Otherwise one listing of the whole folder: the
        keys prevResult names, and any other (a leak, an older version's)."""
        allocator = self.allocator
        within = ""
        if self.conf.pick == "stripe":
            layout = allocator.layout
            folder = layout.folder(pool)
            keys = {c.key for c in allocator.claims if c.key.startswith(folder)}
            keys |= {layout.allocation_key(pool, i.ip) for i in self.conf.prev_ips}
            if keys:
                return [h for h in map(self.read, sorted(keys)) if h is not None]
            try:
                stripes, _ = allocator.stripes(pool)
            except PoolMissing:
                return []
            within = stripes.at(stripes.home(allocator.host or "", pool)).prefix
        found = allocator.scan(pool, self.skip, consistent=True, within=within)
        return [h for h in found if allocator.owns(h)]

    def read(self, key: str) -> Held | None:
        """The key, if it is this attachment's."""
        try:
            held = self.allocator.lookup_key(key, consistent=True)
        except InvalidPool as exc:
            self.skip(str(exc))
            return None
        return held if held is not None and self.allocator.owns(held) else None

    @staticmethod
    def skip(why: str) -> None:
        logger.warning("DEL skips: {}", why)

    def at_pool_loaded(self) -> str:
        self.release(self.held)
        if not self.held:
            logger.debug("pool {!r}: nothing of ours to release", self.current.name)
        return "release"

    def release(self, held: list[Held]) -> None:
        cooldown = self.conf.reuse_after > 0
        for h in held:
            if not self.allocator.release(h, cool=cooldown):
                raise WriteConflict(f"could not release {h.key}: it kept changing under us")
            cached = self.cached_pool(_pool_of(h.key, self.allocator.layout.prefix), h.ip)
            if cached is not None and cached.held.get(h.ip) is not None and not cooldown:
                cached.discard(h.ip)  # so this host's next ADD may have it at once
            logger.debug("released {}", h.key)

    def finish(self) -> None:
        """Keys the ledger names outside this DEL's pools (a pool the config no longer lists),
        then the ledger itself: the attachment is gone."""
        layout = self.allocator.layout
        folders = tuple(layout.folder(p.name) for p in self.conf.pools)
        for claim in self.allocator.claims:
            if claim.key.startswith(folders):
                continue  # read with its pool
            held = self.allocator.lookup_key(claim.key, consistent=True)
            if held is not None and self.allocator.owns(held):
                self.release([held])
        self.allocator.forget()
        entry = self.session.entry
        if entry is not None:
            entry.deleting = None

    def writing(self, state: str) -> bool:
        # The fence, and the releases once our keys are known.
        return state == "connected" or (state == "pool_loaded" and bool(self.held))

    def recover(self, error: CNIError) -> str | None:
        """No Consul: in the helper, the DEL is kept in the attachment's entry, to finish
        later, and the runtime is told it is done."""
        inputs, entry = self.session.inputs, self.session.entry
        caches = inputs.caches
        if (
            error.code != Code.TRY_AGAIN_LATER
            or caches is None
            or not caches.takes_over_dels
            or entry is None
            or inputs.environ.get(REPLAY_MARK)
        ):
            return None
        try:
            entry.journal_del(inputs.stdin, inputs.environ)
        except OSError as exc:
            logger.error("could not keep this DEL to finish later: {}", exc)
            return None
        logger.warning(
            "Consul cannot be reached ({}); the helper finishes this DEL of {}/{}/{} once it "
            "can, and keeps its addresses reserved until then",
            error.msg,
            *entry.attachment,
        )
        return "defer"


def _pool_of(key: str, prefix: str) -> str:
    """The pool a key `<prefix><pool>/<ip>` is in."""
    return key[len(prefix) :].partition("/")[0]
