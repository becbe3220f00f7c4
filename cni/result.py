"""Build the CNI result: prevResult's content kept, our addresses and default routes added."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from ..allocator.layout import key_name
from ..allocator.ranges import IPAddress, IPRange
from .schemas import VERSIONED_IPS, result_schema

_DEFAULT_DST = {4: "0.0.0.0/0", 6: "::/0"}


@dataclass(frozen=True)
class Assigned:
    """One address this call hands out, with the range that gives it prefix and gateway."""

    pool: str
    ip: IPAddress
    range: IPRange

    def address(self) -> str:
        """address/prefix, the address spelled as its key is, whichever Python runs this."""
        return f"{key_name(self.ip)}/{self.range.prefixlen}"


def build(
    cni_version: str, prev: dict[str, Any] | None, assigned: list[Assigned]
) -> dict[str, Any]:
    prev = prev or {}
    ips = _objects(prev.get("ips"))
    routes = _objects(prev.get("routes"))
    present = {_addr(ip.get("address")) for ip in ips}
    for a in assigned:
        if a.ip not in present:
            ips.append(_ip_entry(a))
            _add_default_route(routes, a.range)
    if cni_version in VERSIONED_IPS:
        for ip in ips:
            ip.setdefault("version", "4" if ":" not in ip["address"] else "6")
    result: dict[str, Any] = {
        "cniVersion": cni_version,
        "ips": ips,
        "routes": routes,
        "dns": prev.get("dns") if isinstance(prev.get("dns"), dict) else {},
    }
    if isinstance(prev.get("interfaces"), list):
        result["interfaces"] = prev["interfaces"]
    return result_schema(cni_version).dump(result)


def _objects(items: Any) -> list[dict[str, Any]]:
    """Copies of the objects of a list of prevResult (what is not an object is left out)."""
    return [dict(item) for item in items or [] if isinstance(item, dict)]


def _ip_entry(a: Assigned) -> dict[str, Any]:
    entry: dict[str, Any] = {"address": a.address()}
    if a.range.gateway is not None:
        entry["gateway"] = str(a.range.gateway)
    return entry


def _add_default_route(routes: list[dict[str, Any]], rng: IPRange) -> None:
    # One default route per family: a second would make the interface plugin fail to add it.
    if rng.gateway is None:
        return
    dst = _DEFAULT_DST[rng.version]
    if not any(r.get("dst") == dst for r in routes):
        routes.append({"dst": dst, "gw": str(rng.gateway)})


def _addr(text: Any) -> IPAddress | None:
    try:
        return ipaddress.ip_interface(text).ip
    except (TypeError, ValueError):
        return None
