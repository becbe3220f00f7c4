"""Errors the allocator raises; the CNI layer maps each to an error code."""


class AllocatorError(Exception):
    """Base class: a pool or allocation problem, with a message for people."""


class PoolMissing(AllocatorError):
    """The pool's ranges key does not exist."""


class InvalidPool(AllocatorError):
    """The pool's ranges key, or a key in its folder, holds something unusable."""


class PoolFull(AllocatorError):
    """Every address of every range is taken."""


class NotInPool(AllocatorError):
    """A requested address lies outside every range of the pool."""


class WriteConflict(AllocatorError):
    """A CAS write kept losing to other writers until the time budget ran out."""


class AllocationMissing(AllocatorError):
    """CHECK found an address of ours no longer allocated to us."""


class AddressInUse(AllocatorError):
    """A static address requested through a CNI convention belongs to another container."""


class CallAbandoned(AllocatorError):
    """The call must not write any more: its caller gave up, or its time budget ran out."""
