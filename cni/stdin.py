"""A call's stdin as JSON, before its config is checked (cni/config.py checks it): the one
place it is parsed. The machine reads it whole (`decode`), and looks at it without judging
(`peek`) for the cniVersion an early error must echo; the helper peeks before its handshake,
for that version and the `ipam.timeout` it holds the call to.

Cheap to import: the helper reads it before its heavy modules are loaded, so json, the CNI
error and the settings' rules (consul/settings.py, which loads no client) only.
"""

from __future__ import annotations

import json
from typing import Any

from ..consul.settings import CALL_TIMEOUT
from .errors import CNIError, Code


def decode(stdin: bytes) -> dict[str, Any]:
    """stdin to a JSON object; 6 when it is not JSON, 7 when it is not an object."""
    try:
        data = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(
            Code.DECODE_FAILURE, f"the network config on stdin is not valid JSON: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise CNIError(Code.INVALID_CONFIG, "the network config on stdin must be a JSON object")
    return data


def peek(stdin: bytes) -> dict[str, Any] | None:
    """stdin's JSON object, or None when it is none."""
    try:
        return decode(stdin)
    except CNIError:
        return None


def cni_version(data: dict[str, Any] | None) -> str | None:
    """The cniVersion the config names, unchecked; None when it names none."""
    version = data.get("cniVersion") if data is not None else None
    return version if isinstance(version, str) and version else None


def call_timeout(data: dict[str, Any] | None) -> float:
    """The config's `ipam.timeout` when it is a number within the setting's limits; otherwise
    its default (the machine then reports the config error at once, or, for a number written
    as a string, which the schema reads too, stops by its own deadline, before this one)."""
    ipam = data.get("ipam") if data is not None else None
    timeout = ipam.get("timeout") if isinstance(ipam, dict) else None
    if (
        isinstance(timeout, int | float)
        and not isinstance(timeout, bool)
        and CALL_TIMEOUT.low <= timeout <= CALL_TIMEOUT.high
    ):
        return float(timeout)
    return CALL_TIMEOUT.default
