"""Where log lines go. Warnings and errors always reach the caller's stderr; the verbose
flavour also appends every debug line to a log file.

One routing sink serves both ways of running: in-process, the call's stderr is ours; in the
helper, each call carries its own `CallLog` (via loguru's contextualize), so concurrent calls
never mix their lines and each caller gets its own warnings back.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from loguru import logger

DEFAULT_LOG_FILE = "/var/log/cni/ipam-da-consul.log"
_WARNING = 30


class CallLog:
    def __init__(self, stderr: TextIO, log_file: str | None = None) -> None:
        self.stderr = stderr
        self.log_file = self._usable(log_file) if log_file else None

    def _usable(self, path: str) -> str | None:
        # A log we cannot write must never cost an allocation: warn and carry on.
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8"):
                pass
            return path
        except OSError as exc:
            self.stderr.write(
                f"ipam-da-consul: WARNING: cannot open the log file {path}: "
                f"{exc.strerror or exc}; debug logs are off\n"
            )
            return None

    def emit(self, record: dict[str, Any]) -> None:
        text = record["message"]
        if record["exception"] is not None and record["exception"].value is not None:
            text += f" ({type(record['exception'].value).__name__})"
        if record["level"].no >= _WARNING:
            self.stderr.write(f"ipam-da-consul: {record['level'].name}: {text}\n")
        if self.log_file:
            stamp = datetime.now().astimezone().isoformat(timespec="milliseconds")
            line = f"{stamp} {os.getpid()} {record['level'].name:<7} {text}\n"
            try:
                with open(self.log_file, "a", encoding="utf-8") as fh:
                    fh.write(line)
            except OSError:
                self.log_file = None


_default = CallLog(sys.stderr)


def _route(message: Any) -> None:
    record = message.record
    call = record["extra"].get("call") or _default
    call.emit(record)


def verbose_log_file() -> str:
    return os.environ.get("IPAM_DA_CONSUL_LOG_FILE") or DEFAULT_LOG_FILE


def configure(verbose: bool) -> None:
    """In-process: this process's stderr, plus the debug file for the verbose flavour."""
    global _default
    _default = CallLog(sys.stderr, verbose_log_file() if verbose else None)
    logger.remove()
    logger.add(_route, level="DEBUG" if verbose else "WARNING", format="{message}", catch=True)


def configure_helper() -> None:
    """The helper: every level reaches the router, which asks each call what it wants."""
    logger.remove()
    logger.add(_route, level="DEBUG", format="{message}", catch=True)
