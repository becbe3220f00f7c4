"""VERSION: the versions of the spec this plugin speaks; no config, no Consul."""

from __future__ import annotations

from typing import Any

from ..env import Environment
from ..schemas import SUPPORTED_VERSIONS, VersionSchema
from .base import Command, Inputs


class Version(Command):
    name = "VERSION"
    stdin_optional = True

    @classmethod
    def build(
        cls, inputs: Inputs, env: Environment, data: dict[str, Any], cni_version: str
    ) -> Command:
        return cls(cni_version)

    def __init__(self, cni_version: str) -> None:
        self.cni_version = cni_version

    def at_parsed(self) -> str:
        self.output = VersionSchema().dump(
            {"cniVersion": self.cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}
        )
        return "report"
