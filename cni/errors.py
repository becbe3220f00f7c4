"""CNI error codes and the exception that carries one to stdout."""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class Code(IntEnum):
    # Codes the CNI spec defines.
    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    NOT_READY = 50
    # Plugin codes, numbered as the upstream Rust plugin numbered them.
    INTERNAL = 100
    HTTP = 111
    MISSING_RESOURCE = 114
    INVALID_RESOURCE = 117
    POOL_FULL = 122
    NOT_IN_POOL = 124
    KV_WRITE_FAILED = 125
    # Beyond upstream: a conventional static IP (CNI_ARGS, runtimeConfig) that is in use.
    ADDRESS_IN_USE = 126


# Codes that say the call itself was wrong (env, JSON, config): retrying it unchanged never helps.
INPUT_CODES = (
    Code.INCOMPATIBLE_VERSION,
    Code.INVALID_ENV,
    Code.DECODE_FAILURE,
    Code.INVALID_CONFIG,
)


class CNIError(Exception):
    def __init__(self, code: Code, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_wire(self, cni_version: str) -> dict[str, Any]:
        from .schemas import ErrorSchema

        return ErrorSchema().dump(
            {
                "cniVersion": cni_version,
                "code": int(self.code),
                "msg": self.msg,
                "details": self.details,
            }
        )
