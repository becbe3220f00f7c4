"""The fast reading of a pool folder: the one module where speed shapes the code.

A call reads its pool's whole folder, tens of thousands of keys. Judged key by key, every name
through `ipaddress` and every value through json and marshmallow's AllocationSchema, 60,000 keys
take seconds. Here the same judgment is made in bulk, in C-level passes, for the well-formed case
only; whatever does not look plain goes back to the key-by-key reading (pool.py parse_held),
which judges it and words the error. So this module may only take what the schema takes, and
must give the same result: tests/unit/allocator/test_folder_validation.py proves it (Hypothesis
equivalence tests against the schema and `ipaddress`): they are this module's contract.

The fields it checks are AllocationSchema's own, read off the schema below (`FIELDS`): a field
added there is judged here too, or, when it is of a kind this module cannot judge, importing it
fails.

Entry points: `parse_folder` (a folder's keys at once, kept as rows until one is asked for:
HeldMap) and `load_allocation` (one value). Turning Consul's answer into columns is the
adapter's (consul/kv.py).
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import fields as dataclass_fields
from itertools import chain, repeat
from operator import itemgetter
from typing import Any, NamedTuple

from marshmallow import Schema, fields, validate

from . import schemas
from .held import Held
from .ranges import IPAddress
from .schemas import MAX_ALLOCATION_BYTES, AllocationSchema
from .store import Columns


# -- the schema's fields, as this module judges them ----------------------------------------
class SchemaFields(NamedTuple):
    """An allocation schema's fields by what a plain value holds in them (the required,
    non-empty `target` apart)."""

    names: tuple[str, ...]  # every field, in the schema's order
    text: tuple[str, ...]  # a string, or null
    numbers: tuple[str, ...]  # a finite number (float() keeps an int below 2**53 exact), or null
    text_maps: tuple[str, ...]  # an object of strings, or null


def fields_of(schema: type[Schema]) -> SchemaFields:
    """The fields of `schema`, each of a kind judged here; TypeError naming any other."""
    text: list[str] = []
    numbers: list[str] = []
    text_maps: list[str] = []
    declared = schema._declared_fields
    for name, f in declared.items():
        if f.data_key not in (None, name):
            raise TypeError(f"{schema.__name__}.{name} is read from another key: teach fastpath.py")
        if name == "target":
            if not _is_target(f):
                raise TypeError(f"{schema.__name__}.target is not a required non-empty string")
            continue
        kind = {fields.String: text, fields.Float: numbers, fields.Dict: text_maps}.get(type(f))
        if kind is None or not _optional(f) or (kind is text_maps and not _of_text(f)):
            raise TypeError(
                f"{schema.__name__}.{name} ({type(f).__name__}) is of a kind allocator/fastpath.py "
                "does not judge: teach it, or pools are read through the schema alone"
            )
        if kind is numbers and f.allow_nan:  # type: ignore[attr-defined]
            raise TypeError(f"{schema.__name__}.{name} takes NaN: teach fastpath.py")
        kind.append(name)
    return SchemaFields(tuple(declared), tuple(text), tuple(numbers), tuple(text_maps))


def _is_target(f: fields.Field) -> bool:
    lengths = [v for v in f.validators if isinstance(v, validate.Length)]
    return (
        type(f) is fields.String
        and f.required
        and not f.allow_none
        and len(f.validators) == len(lengths) == 1
        and lengths[0].min == 1
        and lengths[0].max is None
        and lengths[0].equal is None
    )


def _optional(f: fields.Field) -> bool:
    # Absent or null reads as None; nothing else is checked.
    return not f.required and f.load_default is None and f.allow_none and not f.validators


def _of_text(f: fields.Field) -> bool:
    keys, values = f.key_field, f.value_field  # type: ignore[attr-defined]
    return type(keys) is fields.String and type(values) is fields.String and not (
        keys.validators or values.validators or values.allow_none
    )


FIELDS = fields_of(AllocationSchema)
_ABSENT: dict[str, Any] = dict.fromkeys(FIELDS.names)
# Held's fields are the schema's, and what the key and its read say.
if {f.name for f in dataclass_fields(Held)} != {*FIELDS.names, "ip", "key", "index", "value"}:
    raise TypeError("Held's fields are not AllocationSchema's: keep them in step")


# -- one value ---------------------------------------------------------------------------------
def load_allocation(raw: bytes) -> dict[str, Any]:
    """schemas.load_allocation's answer, without the schema when the value is plain."""
    if len(raw) <= MAX_ALLOCATION_BYTES:
        data = _scan_whole(raw)
        if type(data) is dict and is_plain(data):
            return plain_allocation(data)
    return schemas.load_allocation(raw)


def is_plain(data: dict[str, Any]) -> bool:
    """The schema would take this object as it is."""
    target = data.get("target")
    if type(target) is not str or not target:
        return False
    if len(data) == 1:
        return True
    get = data.get
    for name in FIELDS.text:
        value = get(name)
        if value is not None and type(value) is not str:
            return False
    for name in FIELDS.numbers:
        value = get(name)
        if value is not None and not _plain_number(value):
            return False
    for name in FIELDS.text_maps:
        value = get(name)
        if value is not None and not _text_dict(value):
            return False
    return True


def plain_allocation(data: dict[str, Any]) -> dict[str, Any]:
    """What the schema loads from an object `is_plain` accepted: every field (None when
    absent), numbers as floats, nothing else."""
    out = {**_ABSENT, **data}
    if len(out) != len(_ABSENT):
        out = {name: out[name] for name in FIELDS.names}  # unknown fields: left out
    for name in FIELDS.numbers:
        if type(out[name]) is int:
            out[name] = float(out[name])
    return out


def make_held(ip: IPAddress, key: str, index: int, value: bytes, alloc: dict[str, Any]) -> Held:
    """Held(ip, key=..., **alloc), made a third faster: a frozen dataclass's constructor sets its
    twelve fields one object.__setattr__ at a time, where its whole __dict__ at once is the
    same object (tests/unit/allocator/test_folder_validation.py compares them)."""
    held = _new_object(Held)
    # `alloc` holds every field of the schema (its own load, or plain_allocation), no other.
    attributes = {**alloc, "ip": ip, "key": key, "index": index, "value": value}
    _set_attribute(held, "__dict__", attributes)
    return held


# -- a folder's values at once -----------------------------------------------------------------
def parse_allocations(raws: list[bytes]) -> list[dict[str, Any]] | None:
    """The JSON objects of many values, each as parsed alone and accepted by the schema's
    rules (`is_plain`); None when any value needs `load_allocation` one at a time, to be judged
    or worded there (or just to be parsed there: one with a byte order mark, say)."""
    if not raws:
        return []
    if max(map(len, raws)) > MAX_ALLOCATION_BYTES:
        return None  # the key-by-key reading names the first such value, in listing order
    data = _parse_flat(raws) or _parse_each(raws)
    return data if data is not None and all_plain(data) else None


def all_plain(data: list[Any]) -> bool:
    """`is_plain` of every item, judged a field at a time across all of them: each pass a few
    C-level maps where a loop would call `is_plain` 60,000 times."""
    if not data:
        return True
    if set(map(type, data)) != {dict}:
        return False
    targets = _column(data, "target")
    if set(map(type, targets)) != {str} or "" in targets:
        return False
    if set(map(len, data)) == {1}:
        return True  # a target and nothing else, as other tools write them
    return (
        all(_all_text(_column(data, name)) for name in FIELDS.text)
        and all(_all_numbers(_column(data, name)) for name in FIELDS.numbers)
        and all(_all_text_maps(_column(data, name)) for name in FIELDS.text_maps)
    )


def _column(data: list[dict[str, Any]], name: str) -> list[Any]:
    return list(map(dict.get, data, repeat(name)))


def _all_text(values: list[Any]) -> bool:
    return set(map(type, values)) <= {str, _NoneType}


def _all_numbers(values: list[Any]) -> bool:
    kinds = set(map(type, values))
    if not kinds <= {_NoneType, float, int}:
        return False
    if float in kinds and not all(map(math.isfinite, [v for v in values if type(v) is float])):
        return False
    if int in kinds:
        ints = [v for v in values if type(v) is int]
        return min(ints) > -_PLAIN_INT and max(ints) < _PLAIN_INT
    return True


def _all_text_maps(values: list[Any]) -> bool:
    maps = [v for v in values if v is not None]
    return not maps or (
        set(map(type, maps)) == {dict}
        and set(map(type, chain.from_iterable(map(dict.values, maps)))) <= {str}
    )


def _parse_flat(raws: list[bytes]) -> list[Any] | None:
    """Objects without a nested object, all parsed by one json.loads of `[v1,\\nv2,...]`: a
    fifth of the cost of a parse per value. None when the values are not all such objects.

    Each value is parsed as if alone, for the counts below prove that no value can run into
    the next: a raw newline occurs only between values, so every value starts with `{`, ends
    with `}` and holds no other brace. A value's object can then only end at its own last
    `}`, unless that brace is inside a string; such a string would run on into the newline
    after it, which JSON refuses in a string. So a successful parse has one object per value,
    each the value's own."""
    n = len(raws)
    joined = b",\n".join(raws)
    if (
        joined.count(b"{") != n
        or joined.count(b"}") != n
        or joined.count(b"\n") != n - 1
        or joined.count(b"},\n{") != n - 1
        or joined[:1] != b"{"
        or joined[-1:] != b"}"
    ):
        return None
    try:
        data = json.loads(b"[" + joined + b"]")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if len(data) == n else None  # the length cannot differ (see above)


def _parse_each(raws: list[bytes]) -> list[Any] | None:
    """Every value through the C scanner on its own, mapped rather than looped: None when any
    value is not plain UTF-8 JSON from its first byte to its last."""
    try:
        texts = list(map(bytes.decode, raws))
        found = list(map(_scan, texts, repeat(0)))
    except (UnicodeDecodeError, StopIteration, ValueError, RecursionError):
        return None
    if [end for _, end in found] != list(map(len, texts)):
        return None
    return [value for value, _ in found]


def _scan_whole(raw: bytes) -> Any:
    """The JSON value of `raw` when the C scanner takes all of it; None otherwise (json.loads
    then judges it, and words the error)."""
    try:
        text = raw.decode()
        data, end = _scan(text, 0)
    except (UnicodeDecodeError, StopIteration, ValueError, RecursionError):
        return None
    return data if end == len(text) else None


# The C scanner behind json.loads, called directly: a pool's 60,000 values are each a few dozen
# bytes, where json.loads spends most of its time on encoding detection and Python-level
# wrappers.
_Scan = Callable[[str, int], tuple[Any, int]]
_scan: _Scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_NoneType = type(None)
# Integers beyond this go to marshmallow: float() of a huge one overflows, and what the schema
# makes of that is its business.
_PLAIN_INT = 1 << 53


def _plain_number(value: Any) -> bool:
    """What fields.Float takes without a question: a finite float, or an int float() keeps
    exact. Not a bool (the schema refuses them), not NaN or infinity (`allow_nan` is off)."""
    kind = type(value)
    if kind is float:
        return bool(value - value == 0.0)  # False for NaN and both infinities
    return kind is int and -_PLAIN_INT < value < _PLAIN_INT


def _text_dict(value: Any) -> bool:
    return type(value) is dict and all(type(v) is str for v in value.values())


# -- a folder's keys at once -------------------------------------------------------------------
def parse_folder(listing: Columns, rows: list[int], folder: str) -> HeldMap | None:
    """The keys at `rows` of a listing of `folder`, checked all at once and kept as rows; None
    when some key needs the key-by-key reading, to be judged or worded there (a name in another
    spelling, a value `parse_allocations` does not take whole)."""
    keys, values, indexes = _taken(listing, rows)
    allocs = parse_allocations(values)
    if allocs is None:
        return None
    names = list(map(itemgetter(slice(len(folder), None)), keys))
    kept = []
    for version, pick in _by_version(names):
        group = _Group(keys, names, values, indexes, allocs)
        if pick is not None:
            group = group.only(pick)
        ints = address_ints(group.names, version)
        if ints is None:
            return None
        rows_of = _Rows(version, ints, group)
        if len(rows_of.where) != len(ints):  # two names for one address: cannot happen
            return None
        kept.append(rows_of)
    return HeldMap(rows=kept)


def _taken(listing: Columns, rows: list[int]) -> tuple[list[str], list[bytes], list[int]]:
    if rows and rows[-1] - rows[0] == len(rows) - 1:
        # One run of keys, as a listing of the folder has them (after the pool key): slices.
        part = slice(rows[0], rows[-1] + 1)
        return listing.keys[part], listing.values[part], listing.indexes[part]
    return (
        [listing.keys[i] for i in rows],
        [listing.values[i] for i in rows],
        [listing.indexes[i] for i in rows],
    )


def _by_version(names: list[str]) -> list[tuple[int, list[int] | None]]:
    """Which names to keep as the rows of each IP version (None: all of them)."""
    if ":" not in "".join(names):
        return [(4, None)]
    # IPv6 names, and IPv4 ones too in a dual-stack pool: one set of rows per version.
    sixes = [":" in name for name in names]
    out: list[tuple[int, list[int] | None]] = []
    for version, wanted in ((4, False), (6, True)):
        pick = [i for i, six in enumerate(sixes) if six is wanted]
        if len(pick) == len(names):
            out.append((version, None))
        elif pick:
            out.append((version, pick))
    return out


class _Group(NamedTuple):
    keys: list[str]
    names: list[str]
    values: list[bytes]
    indexes: list[int]
    allocs: list[dict[str, Any]]

    def only(self, pick: list[int]) -> _Group:
        keys, names, values, indexes, allocs = self
        return _Group(
            [keys[i] for i in pick],
            [names[i] for i in pick],
            [values[i] for i in pick],
            [indexes[i] for i in pick],
            [allocs[i] for i in pick],
        )


def address_ints(names: list[str], version: int) -> list[int] | None:
    """The addresses the names spell, as integers, when every one is of `version` and spelled
    as pool.py's key names are read without ipaddress: then no two names spell one address."""
    try:
        if version == 4:
            return _ipv4_ints(b"".join(map(_inet_pton, repeat(_AF_INET), names)), len(names))
        packed6 = list(map(_inet_pton, repeat(_AF_INET6), names))
        if list(map(_inet_ntop, repeat(_AF_INET6), packed6)) != names:
            return None
        return list(map(int.from_bytes, packed6))
    except (OSError, UnicodeEncodeError, ValueError):
        return None


def _ipv4_ints(packed: bytes, n: int) -> list[int] | None:
    if len(packed) != 4 * n:
        return None
    # Four bytes each, big-endian: one array conversion instead of an int per name.
    words = array("I")
    if words.itemsize != 4:
        return [int.from_bytes(packed[i : i + 4]) for i in range(0, len(packed), 4)]
    words.frombytes(packed)
    if sys.byteorder == "little":
        words.byteswap()
    return words.tolist()


_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_inet_pton, _inet_ntop = socket.inet_pton, socket.inet_ntop
_IPv4, _IPv6 = ipaddress.IPv4Address, ipaddress.IPv6Address
_target_of = itemgetter("target")
_new_object = object.__new__
_set_attribute = object.__setattr__


class _Rows:
    """A listing's allocation keys of one IP version, checked and kept as columns."""

    __slots__ = ("_targets", "allocs", "indexes", "ints", "keys", "kind", "values", "where")

    def __init__(self, version: int, ints: list[int], group: _Group) -> None:
        self.kind: type[IPAddress] = _IPv4 if version == 4 else _IPv6
        self.ints = ints
        self.keys, self.values, self.indexes = group.keys, group.values, group.indexes
        self.allocs = group.allocs
        # Address -> row, for the rows not yet made into Held or dropped.
        self.where = dict(zip(ints, range(len(ints)), strict=True))
        self._targets: list[str] | None = None

    def targets(self) -> list[str]:
        """Each row's `target`, for list.index to find a container's rows at C speed."""
        if self._targets is None:
            self._targets = list(map(_target_of, self.allocs))
        return self._targets

    def make(self, i: int, ip: IPAddress) -> Held:
        alloc = plain_allocation(self.allocs[i])
        return make_held(ip, self.keys[i], self.indexes[i], self.values[i], alloc)


class HeldMap(MutableMapping[IPAddress, Held]):
    """A pool's allocations by address. The keys of a listing stay rows of its columns (one
    set per IP version) until one is asked for: a call looks at a handful of a pool's 60,000
    keys, and an object for each would cost more than reading them all did.

    Reading a row makes it a Held, which changes the map, so every look at the rows holds
    `lock` (the pool's): calls in the helper may share a pool that still has rows."""

    def __init__(self, made: dict[IPAddress, Held] | None = None, rows: Iterable[_Rows] = ()):
        self._made: dict[IPAddress, Held] = made if made is not None else {}
        self._rows: dict[type, _Rows] = {r.kind: r for r in rows if r.where}
        self.lock = threading.RLock()

    def _rows_of(self, ip: object) -> _Rows | None:
        # The exact type: an interface, a string or a scoped IPv6 address (fd00::5%eth0, not
        # equal to fd00::5) is no key here, as it would be none of a dict of addresses.
        rows = self._rows.get(type(ip))
        if rows is None or getattr(ip, "scope_id", None) is not None:
            return None
        return rows

    def __getitem__(self, ip: IPAddress) -> Held:
        held = self._made.get(ip)
        if held is not None:
            return held
        with self.lock:
            held = self._made.get(ip)  # made by another thread meanwhile
            if held is not None:
                return held
            rows = self._rows_of(ip)
            i = rows.where.pop(int(ip), None) if rows is not None else None
            if rows is None or i is None:
                raise KeyError(ip)
            held = self._made[ip] = rows.make(i, ip)
            if not rows.where:
                del self._rows[rows.kind]
            return held

    def __contains__(self, ip: object) -> bool:
        if ip in self._made:
            return True
        with self.lock:
            if ip in self._made:
                return True
            rows = self._rows_of(ip)
            return rows is not None and int(ip) in rows.where  # type: ignore[call-overload]

    def __setitem__(self, ip: IPAddress, held: Held) -> None:
        with self.lock:
            self._drop_row(ip)
            self._made[ip] = held

    def __delitem__(self, ip: IPAddress) -> None:
        with self.lock:
            if not self._drop_row(ip):
                del self._made[ip]

    def _drop_row(self, ip: IPAddress) -> bool:
        rows = self._rows_of(ip)
        if rows is None or rows.where.pop(int(ip), None) is None:
            return False
        if not rows.where:
            del self._rows[rows.kind]
        return True

    def __iter__(self) -> Iterator[IPAddress]:
        # Both taken at once: a row made while the caller iterates moves into `_made`.
        with self.lock:
            made = list(self._made)
            rows = [(r.kind, list(r.where)) for r in self._rows.values()]
        yield from made
        for kind, values in rows:
            yield from map(kind, values)

    def __len__(self) -> int:
        with self.lock:
            return len(self._made) + sum(len(r.where) for r in self._rows.values())

    def __repr__(self) -> str:
        with self.lock:
            rows = sum(len(r.where) for r in self._rows.values())
            return f"HeldMap({self._made!r}, +{rows} not yet read)"

    def make_all(self) -> None:
        """Turn every row into its Held (the helper keeps its pools whole)."""
        with self.lock:
            made = self._made
            for rows in self._rows.values():
                kind = rows.kind
                for value, i in rows.where.items():
                    ip = kind(value)
                    made[ip] = rows.make(i, ip)
            self._rows = {}

    def live_ints(self, version: int) -> set[int]:
        """The addresses of one version that have a key (a release cooling down included)."""
        with self.lock:
            live = {int(ip) for ip in self._made if ip.version == version}
            rows = self._rows.get(_IPv4 if version == 4 else _IPv6)
            if rows is not None:
                live |= set(rows.where)
            return live

    def of_target(self, target: str) -> list[Held]:
        """Every allocation whose `target` is this container."""
        with self.lock:
            found = [h for h in self._made.values() if h.target == target]
            for rows in list(self._rows.values()):
                found += [self[ip] for ip in self._rows_with(rows, target)]
            return found

    @staticmethod
    def _rows_with(rows: _Rows, target: str) -> list[IPAddress]:
        targets, i = rows.targets(), -1
        out: list[IPAddress] = []
        while True:
            try:
                i = targets.index(target, i + 1)
            except ValueError:
                return out
            value = rows.ints[i]
            if rows.where.get(value) == i:
                out.append(rows.kind(value))
