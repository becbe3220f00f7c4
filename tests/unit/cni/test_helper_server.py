"""The helper's call socket under descriptor exhaustion (issue 25, finding 4's other half)."""

from __future__ import annotations

import errno
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ipam_da_consul.cni.helper.caches import PoolCaches
from ipam_da_consul.cni.helper.server import HelperServer


class _Exhausted:
    """The listening socket, as when the process has no descriptor left: accept() fails with
    EMFILE while the connection stays queued, so the socket stays readable."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failed = 0
        self.accepted = 0
        self.failing = True

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Any:
        if self.failing:
            self.failed += 1
            raise OSError(errno.EMFILE, "Too many open files")
        got = self.sock.accept()
        self.accepted += 1
        return got

    def close(self) -> None:
        self.sock.close()


def _no_kv(_settings: Any) -> Any:
    raise AssertionError("no call reaches Consul here")


def test_out_of_descriptors_backs_off_instead_of_spinning(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    path = str(folder / "helper.sock")
    server = HelperServer(path, PoolCaches(1.0, make_kv=_no_kv))
    exhausted = _Exhausted(server.socket)
    server.socket = exhausted  # type: ignore[assignment]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with socket.socket(socket.AF_UNIX) as waiting:
            waiting.connect(path)
            time.sleep(1.5)
            # 50 ms, doubling to 1 s: 0, .05, .15, .35, .75, 1.35 s. Spinning: thousands.
            assert 3 <= exhausted.failed <= 8, exhausted.failed
            exhausted.failing = False
            # The queued connection is taken once accept() works again (within 1 s).
            end = time.monotonic() + 5
            while not exhausted.accepted and time.monotonic() < end:
                time.sleep(0.05)
            assert exhausted.accepted == 1
            assert server.accept_backoff == 0.0
    finally:
        server.shutdown()
        server.server_close()
