"""Marshmallow schemas for the CNI wire objects: network config, Pool, result, error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import (
    EXCLUDE,
    INCLUDE,
    Schema,
    ValidationError,
    fields,
    pre_load,
    validate,
    validates,
)

from ..allocator.layout import check_network_name, check_pool_name
from ..allocator.schemas import IPAddressField, IPInterfaceField
from ..consul import settings as cs
from ..consul.settings import SettingsError

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
# Results of these versions carry ips[].version; 1.x dropped it.
VERSIONED_IPS = frozenset({"0.3.0", "0.3.1", "0.4.0"})


def _rule(check: Callable[[str], object]) -> Callable[[str], None]:
    """A consul/settings.py rule as a field validator: its SettingsError is the field's error."""

    def validator(value: str) -> None:
        try:
            check(value)
        except SettingsError as exc:
            raise ValidationError(str(exc)) from None

    return validator


def _within(limit: cs.Limit) -> validate.Range:
    return validate.Range(limit.low, limit.high)


class PoolSchema(Schema):
    """A Pool object; `requested-ip` (seed) and `requested_ip` (upstream code) both work."""

    class Meta:
        unknown = EXCLUDE

    name = fields.String(required=True)
    requested_ip = IPAddressField(load_default=None, allow_none=True)

    @pre_load
    def merge_spellings(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict) and "requested-ip" in data:
            data = dict(data)
            dashed = data.pop("requested-ip")
            if data.get("requested_ip", dashed) != dashed:
                raise ValidationError("requested-ip and requested_ip disagree", "requested_ip")
            data["requested_ip"] = dashed
        return data

    @validates("name")
    def check_name(self, value: str, **kwargs: Any) -> None:
        problem = check_pool_name(value)
        if problem:
            raise ValidationError(problem)


class IpamSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    # Connection settings: their defaults, limits and rules live in consul/settings.py.
    consul_servers = fields.List(
        fields.String(validate=_rule(cs.check_server_url)),
        required=True,
        validate=validate.Length(min=1, error="must list at least one Consul server URL"),
    )
    consul_connect_timeout = fields.Float(
        load_default=cs.CONNECT_TIMEOUT.default, validate=_within(cs.CONNECT_TIMEOUT)
    )
    consul_read_timeout = fields.Float(
        load_default=cs.READ_TIMEOUT.default, validate=_within(cs.READ_TIMEOUT)
    )
    consul_unreachable_grace = fields.Float(
        load_default=cs.UNREACHABLE_GRACE.default, validate=_within(cs.UNREACHABLE_GRACE)
    )
    consul_attempt_timeout = fields.Float(
        load_default=cs.ATTEMPT_TIMEOUT.default, validate=_within(cs.ATTEMPT_TIMEOUT)
    )
    timeout = fields.Float(load_default=cs.CALL_TIMEOUT.default, validate=_within(cs.CALL_TIMEOUT))
    consul_token = fields.String(load_default=None, allow_none=True)
    consul_token_file = fields.String(load_default=None, allow_none=True)
    consul_ca_file = fields.String(load_default=None, allow_none=True)
    consul_cert_file = fields.String(load_default=None, allow_none=True)
    consul_key_file = fields.String(load_default=None, allow_none=True)
    consul_datacenter = fields.String(load_default=None, allow_none=True)
    kv_prefix = fields.String(load_default=cs.DEFAULT_PREFIX, validate=_rule(cs.kv_prefix))
    pools = fields.List(fields.Nested(PoolSchema), load_default=None, allow_none=True)
    # Identity recorded in allocations so GC only ever touches this host's; default hostname.
    host = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=253))
    min_free = fields.Integer(load_default=0, strict=True, validate=validate.Range(min=0))
    reuse_after = fields.Float(load_default=0.0, validate=validate.Range(0, 30 * 86400))
    # How ADD picks among free addresses: "lowest" (the seed's) or "spread" (see
    # allocator/pool.py: fewer lost compare-and-sets when many hosts allocate at once).
    # "stripe" scales with the fleet (allocator/stripes.py); "lowest" is the seed's strict
    # next-available packing; "spread" spreads over the whole pool.
    pick = fields.String(
        load_default="stripe", validate=validate.OneOf(("stripe", "lowest", "spread"))
    )


class IPConfigSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    address = IPInterfaceField(required=True)
    gateway = IPAddressField(load_default=None, allow_none=True)
    interface = fields.Integer(load_default=None, allow_none=True)
    version = fields.String(load_default=None, allow_none=True)


class PrevResultSchema(Schema):
    """Only the parts we read are checked; the rest is carried through untouched."""

    class Meta:
        unknown = INCLUDE

    ips = fields.List(fields.Nested(IPConfigSchema), load_default=list)
    pools = fields.List(fields.Nested(PoolSchema), load_default=None, allow_none=True)


class NetworkConfigSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    cniVersion = fields.String(required=True)
    # Required by the CNI spec (and libcni): it names the network in fence keys and allocations.
    name = fields.String(
        required=True,
        error_messages={"required": "the network config has no name (the CNI spec requires one)"},
    )
    ipam = fields.Nested(IpamSchema, required=True)
    prevResult = fields.Nested(PrevResultSchema, load_default=None, allow_none=True)
    runtimeConfig = fields.Dict(load_default=dict)
    args = fields.Dict(load_default=dict)

    @validates("name")
    def check_name(self, value: str, **kwargs: Any) -> None:
        problem = check_network_name(value)
        if problem:
            raise ValidationError(problem)


class IPOutSchema(Schema):
    version = fields.String()
    address = fields.String(required=True)
    gateway = fields.String()
    interface = fields.Integer()


class ResultSchema(Schema):
    cniVersion = fields.String(required=True)
    interfaces = fields.List(fields.Dict())
    ips = fields.List(fields.Nested(IPOutSchema), required=True)
    # Routes and interfaces pass through from prevResult as they are (1.1 adds route fields).
    routes = fields.List(fields.Dict(), required=True)
    dns = fields.Dict(required=True)


class ErrorSchema(Schema):
    cniVersion = fields.String(required=True)
    code = fields.Integer(required=True)
    msg = fields.String(required=True)
    details = fields.String()


class VersionSchema(Schema):
    cniVersion = fields.String(required=True)
    supportedVersions = fields.List(fields.String(), required=True)


def result_schema(cni_version: str) -> ResultSchema:
    if cni_version in VERSIONED_IPS:
        return ResultSchema()
    return ResultSchema(exclude=("ips.version",))
