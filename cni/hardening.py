"""No core dumps: a core of the plugin, the helper or the admin CLI holds the ACL token (and the
config it came in), written wherever the core pattern says, or kept by systemd-coredump.

Imported on the thin client path (cni/main.py): `no_core_dumps` costs `resource` only (~0.4 ms
with this module); `not_dumpable` needs ctypes (~1.6 ms), so only the paths that import far more
anyway call it.
"""

from __future__ import annotations

_PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def no_core_dumps() -> None:
    """A hard core-size limit of 0, which this process cannot raise again. The kernel writes no
    core file; systemd-coredump, which the kernel pipes a core to whatever the limit, honours
    it too ("Resource limits disable core dumping for process ...")."""
    import resource

    try:  # noqa: SIM105 (contextlib is one more import on the thin client path)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass  # never a reason to fail a call


def not_dumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0): no core at all, even for a core handler that ignores the
    limit, and no ptrace or /proc/<pid>/mem or environ reading by processes of the same user
    without CAP_SYS_PTRACE (what protects an admin CLI run by a non-root operator)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux, or no prctl: the core limit still holds


def harden() -> None:
    """Both, for the long-lived helper, the in-process plugin and the admin CLI."""
    no_core_dumps()
    not_dumpable()
