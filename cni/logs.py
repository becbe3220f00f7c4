"""Log sinks: warnings and errors to stderr always; the verbose flavour adds a debug file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loguru import logger

DEFAULT_LOG_FILE = "/var/log/cni/ipam-da-consul.log"
_FILE_FORMAT = "{time:YYYY-MM-DDTHH:mm:ss.SSSZZ} {process} {level: <7} {message}"


def configure(verbose: bool) -> None:
    logger.remove()
    logger.add(
        sys.stderr, level="WARNING", format="ipam-da-consul: {level}: {message}", colorize=False
    )
    if verbose:
        _add_file_sink(os.environ.get("IPAM_DA_CONSUL_LOG_FILE") or DEFAULT_LOG_FILE)


def _add_file_sink(path: str) -> None:
    # A log we cannot write must never cost an allocation: warn and carry on.
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        logger.add(path, level="DEBUG", format=_FILE_FORMAT, colorize=False, catch=True)
    except OSError as exc:
        logger.warning(
            "cannot open the log file {}: {}; debug logs are off", path, exc.strerror or exc
        )
