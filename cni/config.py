"""Turn stdin into a checked network config: the pools to serve and how to reach Consul."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from marshmallow import ValidationError

from ..allocator.ranges import IPAddress
from ..allocator.schemas import MAX_ALLOCATION_BYTES, describe, dump_allocation
from ..consul import settings as cs
from ..consul.settings import ConsulSettings, SettingsError  # ConsulSettings: re-exported
from ..consul.urls import shown_url
from . import spelling
from .errors import CNIError, Code
from .schemas import SUPPORTED_VERSIONS, IpamSchema, NetworkConfigSchema

_SECRET_KEYS = ("token", "secret", "password")
# CNI_ARGS keys that runtimes document passing: understood, so they never fail a call (with or
# without IgnoreUnknown), and recorded in the allocation so operators can ask who holds what.
RUNTIME_KEYS = (
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "NOMAD_REGION",
    "NOMAD_NAMESPACE",
    "NOMAD_JOB_ID",
    "NOMAD_GROUP_NAME",
    "NOMAD_ALLOC_ID",
)


@dataclass(frozen=True)
class PoolRequest:
    name: str
    requested_ip: IPAddress | None = None


@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    consul: ConsulSettings
    pools: list[PoolRequest]
    prev_result: dict[str, Any] | None
    prev_ips: list[Any]  # ipaddress interfaces from prevResult.ips
    # Static addresses from the CNI conventions (CNI_ARGS IP=, runtimeConfig.ips, args.cni.ips);
    # each goes to the pool whose ranges hold it.
    requested_ips: list[IPAddress] = field(default_factory=list)
    # GC: the (container, ifname) pairs the runtime still uses; None when not given.
    valid_attachments: list[tuple[str, str]] | None = None
    host: str | None = None
    # The runtime's own names for the container (RUNTIME_KEYS found in CNI_ARGS).
    runtime: dict[str, str] = field(default_factory=dict)
    # STATUS fails when a pool has fewer free addresses than this.
    min_free: int = 0
    # Seconds a released address stays unusable (0: reusable at once).
    reuse_after: float = 0.0
    # "stripe", "lowest" or "spread": how ADD picks among free addresses (cni/commands/add.py).
    pick: str = "stripe"


def cni_version_of(data: Mapping[str, Any]) -> str:
    version = data.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CNIError(Code.INVALID_CONFIG, "the network config has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            Code.INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported; supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def load(
    data: dict[str, Any],
    command: str,
    env: Mapping[str, str],
    args: Mapping[str, str] | None = None,
) -> NetConf:
    version = cni_version_of(data)
    conf = _checked(data, command)
    ipam = conf["ipam"]
    prev = conf["prevResult"]
    runtime = {k: v for k, v in (args or {}).items() if k in RUNTIME_KEYS and v}
    if command == "ADD":
        runtime = _runtime_that_fits(runtime, conf["name"], env, ipam["host"])
    return NetConf(
        cni_version=version,
        name=conf["name"],
        consul=_consul_settings(ipam, env),
        pools=_pools(prev, ipam, command),
        prev_result=data.get("prevResult") if isinstance(data.get("prevResult"), dict) else None,
        prev_ips=[ip["address"] for ip in (prev or {}).get("ips", [])],
        # Only ADD reads static addresses: DEL must not fail on what it does not need.
        requested_ips=_requested_ips(conf, args or {}) if command == "ADD" else [],
        valid_attachments=_attachments(data) if command == "GC" else None,
        host=ipam["host"] or None,
        runtime=runtime,
        min_free=ipam["min_free"],
        reuse_after=ipam["reuse_after"],
        pick=ipam["pick"],
    )


def _checked(data: dict[str, Any], command: str) -> dict[str, Any]:
    """The network config as NetworkConfigSchema reads it, its ipam section's unknown keys
    reported first; error 7 names a misspelt required setting when it can."""
    section = data.get("ipam")
    unknown = _unknown_keys(section, command) if isinstance(section, dict) else []
    try:
        conf: dict[str, Any] = NetworkConfigSchema().load(data)
    except ValidationError as exc:
        hint = _missing_hint(section, unknown) if isinstance(section, dict) else ""
        raise CNIError(
            Code.INVALID_CONFIG, f"invalid network config: {describe(exc.messages)}{hint}"
        ) from None
    return conf


# Commands that refuse a near miss (cni/spelling.py): they would run with a setting silently at
# its default. DEL and GC release, and must not leave an address allocated over a typo.
_STRICT_COMMANDS = frozenset({"ADD", "CHECK", "STATUS"})
_IPAM_SETTINGS: tuple[frozenset[str], frozenset[str]] | None = None


def _ipam_settings() -> tuple[frozenset[str], frozenset[str]]:
    """The ipam section's settings, and those of them that are required (IpamSchema)."""
    global _IPAM_SETTINGS
    if _IPAM_SETTINGS is None:
        fields = IpamSchema().fields
        _IPAM_SETTINGS = (
            frozenset(fields), frozenset(n for n, f in fields.items() if f.required)
        )
    return _IPAM_SETTINGS


def _unknown_keys(section: dict[str, Any], command: str) -> list[spelling.Unknown]:
    """Report the ipam section's keys that are not settings (see cni/spelling.py for the
    rules); error 7 for a near miss in a command that would run with it silently off."""
    unknown = spelling.unknown_keys(section, _ipam_settings()[0])
    near = [u for u in unknown if u.near]
    if near and command in _STRICT_COMMANDS:
        raise CNIError(
            Code.INVALID_CONFIG,
            f"the ipam section has {'an unknown key' if len(near) == 1 else 'unknown keys'} "
            f"close to a setting: {', '.join(u.describe() for u in near)}. A misspelled "
            f"setting would silently be its default, so {command} is refused; fix the "
            "spelling (DEL and GC go on, with a warning)",
        )
    # Behind ipam-delegated the section also holds the sibling delegates' settings.
    delegated = "delegates" in section or section.get("type") == "ipam-delegated"
    for u in unknown:
        if u.near or not delegated:
            logger.warning("{}", u.warning())
        else:
            logger.debug("{} (a sibling delegate's, behind ipam-delegated?)", u.warning())
    return unknown


def _missing_hint(section: dict[str, Any], unknown: list[spelling.Unknown]) -> str:
    missing = [k for k in sorted(_ipam_settings()[1]) if k not in section]
    hints = spelling.missing_hints(missing, unknown)
    return "".join(
        f" (the ipam section has `{spelling.shown(u.key)}`: did you mean `{name}`?)"
        for name, u in hints.items()
    )


def _runtime_that_fits(
    runtime: dict[str, str], network: str, env: Mapping[str, str], host: str | None
) -> dict[str, str]:
    """The runtime's names this ADD records. A pool refuses an allocation larger than
    MAX_ALLOCATION_BYTES (allocator/schemas.py), so one written larger would fail every later
    read of the pool: the names, which are for operators and never fail a call, are left out
    when they do not fit, and an allocation too large even without them is refused."""

    def size(names: dict[str, str]) -> int:
        # The call's nonce and time as long as they can be.
        value = dump_allocation(
            # A call without a container ID fails on its environment; measured as one byte.
            env.get("CNI_CONTAINERID") or "-",
            env.get("CNI_IFNAME") or None,
            host or default_host(),
            network,
            "0" * 32,
            names,
            9_999_999_999.999,
        )
        return len(value)

    if size(runtime) <= MAX_ALLOCATION_BYTES:
        return runtime
    bare = size({})
    if bare <= MAX_ALLOCATION_BYTES:
        logger.warning(
            "the runtime's names ({}) are left out of the allocation: with them it would be "
            "larger than the {} bytes a pool accepts",
            ", ".join(sorted(runtime)),
            MAX_ALLOCATION_BYTES,
        )
        return {}
    raise CNIError(
        Code.INVALID_CONFIG,
        f"the allocation this ADD would write is {bare} bytes, more than the "
        f"{MAX_ALLOCATION_BYTES} a pool accepts: the container ID, interface, network name or "
        "ipam.host is too long",
    )


def _pools(prev: dict[str, Any] | None, ipam: dict[str, Any], command: str) -> list[PoolRequest]:
    # Behind ipam-delegated the pools arrive in prevResult; standalone, in the ipam section.
    raw = (prev or {}).get("pools") or ipam.get("pools")
    if not raw and command in ("GC", "STATUS"):
        return []  # behind ipam-delegated these commands cannot know the pools
    if not raw:
        raise CNIError(
            Code.INVALID_CONFIG,
            "no pools to allocate from: prevResult.pools (behind ipam-delegated) or ipam.pools "
            '(standalone) must list at least one Pool object, e.g. {"name": "pool-name"}',
        )
    pools = [PoolRequest(p["name"], p["requested_ip"]) for p in raw]
    names = [p.name for p in pools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CNIError(
            Code.INVALID_CONFIG,
            f"prevResult.pools names pool(s) more than once: {', '.join(dupes)}",
        )
    return pools


def _requested_ips(conf: dict[str, Any], args: Mapping[str, str]) -> list[IPAddress]:
    unknown = sorted(set(args) - {"IP", "IgnoreUnknown", *RUNTIME_KEYS})
    if unknown and args.get("IgnoreUnknown", "").lower() not in ("1", "true"):
        raise CNIError(
            Code.INVALID_ENV,
            f"CNI_ARGS has unknown key(s) {', '.join(unknown)}; set IgnoreUnknown=1 to allow them",
        )
    ips = filter(None, args.get("IP", "").split(","))
    wanted: list[tuple[str, Any]] = [("CNI_ARGS IP", v) for v in ips]
    wanted += [("runtimeConfig.ips", v) for v in _list(conf["runtimeConfig"].get("ips"))]
    cni_args = conf["args"].get("cni") if isinstance(conf["args"].get("cni"), dict) else {}
    wanted += [("args.cni.ips", v) for v in _list(cni_args.get("ips"))]
    out: list[IPAddress] = []
    for source, value in wanted:
        code = Code.INVALID_ENV if source.startswith("CNI_ARGS") else Code.INVALID_CONFIG
        text = str(value).strip()
        if "%" in text:
            raise CNIError(
                code, f"{source}: {value!r} has a zone ID ('%...'); give a plain IP address"
            )
        try:
            ip = ipaddress.ip_interface(text).ip
        except ValueError:
            raise CNIError(code, f"{source}: {value!r} is not an IP address") from None
        if ip not in out:
            out.append(ip)
    return out


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CNIError(Code.INVALID_CONFIG, f"expected a list of IP addresses, got {value!r}")
    return value


def _attachments(data: dict[str, Any]) -> list[tuple[str, str]]:
    """GC's still-valid attachments; absent or null never means "release everything"."""
    raw = data.get("cni.dev/valid-attachments", data.get("cni.dev/attachments"))
    if not isinstance(raw, list):
        raise CNIError(
            Code.INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments (a list of {containerID, ifname}); "
            "without it nothing is released",
        )
    out = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str):
            raise CNIError(
                Code.INVALID_CONFIG, f"invalid entry in cni.dev/valid-attachments: {item!r}"
            )
        out.append((item["containerID"], str(item.get("ifname") or "")))
    return out


def _consul_settings(ipam: dict[str, Any], env: Mapping[str, str]) -> ConsulSettings:
    """The schema checked each field; here the settings that also come from the environment
    (token, TLS files) are resolved. Their rules, and their messages, are consul/settings.py's."""
    try:
        tls = cs.tls_config(
            ipam["consul_ca_file"], ipam["consul_cert_file"], ipam["consul_key_file"], env
        )
        return ConsulSettings(
            servers=ipam["consul_servers"],
            connect_timeout=ipam["consul_connect_timeout"],
            read_timeout=ipam["consul_read_timeout"],
            timeout=ipam["timeout"],
            unreachable_grace=ipam["consul_unreachable_grace"],
            attempt_timeout=ipam["consul_attempt_timeout"],
            token=cs.resolve_token(
                ipam["consul_token"],
                ipam["consul_token_file"],
                env,
                file_source="ipam.consul_token_file",
                # An empty file has always meant the anonymous token here.
                empty_file_is_anonymous=True,
            ),
            ca_file=tls.ca_file,
            cert_file=tls.cert_file,
            key_file=tls.key_file,
            datacenter=cs.datacenter(ipam["consul_datacenter"]),
            kv_prefix=cs.kv_prefix(ipam["kv_prefix"]),
        )
    except SettingsError as exc:
        raise CNIError(Code.INVALID_CONFIG, str(exc)) from None


def default_host() -> str:
    """This host's identity in allocations, when `ipam.host` does not set one: the hostname,
    with a tag derived from /etc/machine-id so cloned machines that kept one hostname never
    GC each other's allocations. The tag is a hash: machine-id(5) asks not to expose the ID."""
    import hashlib
    import socket

    name = socket.gethostname()
    try:
        with open("/etc/machine-id", "rb") as fh:
            machine = fh.read().strip()
    except OSError:
        return name
    if not machine:
        return name
    tag = hashlib.sha256(b"ipam-da-consul host " + machine).hexdigest()[:8]
    return f"{name}#{tag}"


def redact(value: Any) -> Any:
    """A copy of a JSON value with secrets replaced, for the verbose log."""
    if isinstance(value, dict):
        return {k: "<redacted>" if _is_secret(k) and v else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return shown_url(value)  # a server URL's password (any URL's user-info)
    return value


def _is_secret(key: Any) -> bool:
    k = str(key).lower()
    return any(s in k for s in _SECRET_KEYS) and not k.endswith("_file")
