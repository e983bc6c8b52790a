"""Profiles as OTLP profiles ``v1development`` (``ExportProfilesServiceRequest``), and back.

The conventions (docs/protocol.md, "OTLP profiles"), shared with the native exporter:

* one shared ``ProfilesDictionary`` whose every table starts with its zero value (``""``, an empty
  mapping, location, function, link, attribute and stack); no mappings; one ``Location`` per
  distinct (function, file, line) with one ``Line``; one ``Function`` per distinct (name, file),
  ``name`` = ``system_name`` = the pprof function name; stacks leaf first;
* one ``ResourceProfiles`` per process (the samples' ``pid`` label) with ``service.name``,
  ``process.pid``, ``telemetry.sdk.*`` and the attributes of ``OTEL_RESOURCE_ATTRIBUTES`` and
  ``MW_CUSTOM_RESOURCE_ATTRIBUTES`` (:func:`middleware.config.resource_attributes`); one
  ``ScopeProfiles`` (scope ``middleware``);
* one OTLP ``Profile`` per pprof sample type, in the pprof's order, holding the samples whose
  value for that type is non-zero (``values = [value]``); sample attributes are the pprof labels,
  except a ``span_id`` whose trace the profile knows (:attr:`Profile.span_traces`): that one is a
  ``Link`` (trace id, span id) instead.

Back (:func:`read_otlp`, :func:`from_otlp`): the Profiles of one ``ResourceProfiles`` with the
same window and period become one :class:`~middleware.profile.Profile` with those sample types
(one value per type, 0 where a type lacks the sample), links become ``span_id`` labels plus
``span_traces`` entries, ``service.name`` is the service, ``process.pid`` a ``pid`` label of the
samples that lack one, and the other resource attributes are handed back beside the profile.
What OTLP has no room for is not carried: pprof comments, request counts and the default sample
type (``cpu`` when there is such a type, else the last one, pprof's rule).

Malformed input raises :class:`OtlpError` (a :class:`ValueError`) with a message naming the
problem.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from middleware._proto.otlp import common_pb2, profiles_pb2
from middleware._proto.otlp.profiles_service_pb2 import ExportProfilesServiceRequest
from middleware.profile import Frame, Profile, Sample

logger = logging.getLogger(__name__)

__all__ = [
    "OtlpError",
    "OtlpProfile",
    "OTLP_PROFILES_PATH",
    "SCOPE_NAME",
    "UNKNOWN_SERVICE",
    "to_otlp",
    "encode_otlp",
    "otlp_resource",
    "parse_otlp",
    "read_otlp",
    "from_otlp",
]

#: The path of OTLP/HTTP profile exports, after the endpoint's base URL.
OTLP_PROFILES_PATH = "/v1development/profiles"
#: The instrumentation scope of the profiles we write.
SCOPE_NAME = "middleware"
#: The service of a resource without ``service.name`` (OpenTelemetry's default).
UNKNOWN_SERVICE = "unknown_service"
_SPAN_RE = re.compile(r"[0-9a-f]{16}\Z")
_TRACE_RE = re.compile(r"[0-9a-f]{32}\Z")


class OtlpError(ValueError):
    """An OTLP request that cannot be read; ``str()`` says why."""


def _version() -> str:
    from middleware import __version__

    return __version__


# ------------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------------


class _Dictionary:
    """Interns strings, functions, locations, stacks, attributes and links into one
    ``ProfilesDictionary`` (index 0 of every table is its zero value)."""

    def __init__(self, msg: profiles_pb2.ProfilesDictionary) -> None:
        self.msg = msg
        msg.string_table.append("")
        msg.mapping_table.add()
        msg.location_table.add()
        msg.function_table.add()
        msg.link_table.add()
        msg.attribute_table.add()
        msg.stack_table.add()
        self._strings: dict[str, int] = {"": 0}
        self._functions: dict[tuple[str, str], int] = {}
        self._locations: dict[Frame, int] = {}
        self._stacks: dict[tuple[int, ...], int] = {(): 0}
        self._attributes: dict[tuple[str, str], int] = {}
        self._links: dict[tuple[str, str], int] = {}

    def string(self, value: str) -> int:
        i = self._strings.get(value)
        if i is None:
            i = self._strings[value] = len(self.msg.string_table)
            self.msg.string_table.append(value)
        return i

    def location(self, frame: Frame) -> int:
        i = self._locations.get(frame)
        if i is None:
            fkey = (frame.function, frame.file)
            fi = self._functions.get(fkey)
            if fi is None:
                fi = self._functions[fkey] = len(self.msg.function_table)
                name = self.string(frame.function)
                self.msg.function_table.add(
                    name_strindex=name, system_name_strindex=name, filename_strindex=self.string(frame.file)
                )
            i = self._locations[frame] = len(self.msg.location_table)
            self.msg.location_table.add().lines.add(function_index=fi, line=frame.line)
        return i

    def stack(self, frames: tuple[Frame, ...]) -> int:
        key = tuple(self.location(f) for f in reversed(frames))  # leaf first
        i = self._stacks.get(key)
        if i is None:
            i = self._stacks[key] = len(self.msg.stack_table)
            self.msg.stack_table.add(location_indices=key)
        return i

    def attribute(self, key: str, value: str) -> int:
        i = self._attributes.get((key, value))
        if i is None:
            i = self._attributes[(key, value)] = len(self.msg.attribute_table)
            entry = self.msg.attribute_table.add(key_strindex=self.string(key))
            entry.value.string_value = value
        return i

    def link(self, trace_id: str, span_id: str) -> int:
        i = self._links.get((trace_id, span_id))
        if i is None:
            i = self._links[(trace_id, span_id)] = len(self.msg.link_table)
            self.msg.link_table.add(trace_id=bytes.fromhex(trace_id), span_id=bytes.fromhex(span_id))
        return i


def otlp_resource(
    service_name: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[str, dict[str, str]]:
    """The service name and the resource attributes of the environment (without ``service.name``).

    The service is ``service_name`` when given, else the agent's setting (``OTEL_SERVICE_NAME``,
    ``MW_SERVICE_NAME``), else ``service.name`` of the attributes, else the agent's default; the
    attributes are :func:`middleware.config.resource_attributes`.
    """
    from middleware.config import SETTINGS, resolve_service_name, resource_attributes

    e = os.environ if env is None else env
    attributes = resource_attributes(e)
    attribute_service = attributes.pop("service.name", "")
    if service_name is None and not any((e.get(v) or "").strip() for v in SETTINGS["service_name"].env):
        service_name = attribute_service or None
    return resolve_service_name(service_name, e), attributes


def _any_value(value: str | int) -> common_pb2.AnyValue:
    return common_pb2.AnyValue(int_value=value) if isinstance(value, int) else common_pb2.AnyValue(string_value=value)


def to_otlp(
    profiles: Profile | Iterable[Profile | tuple[str, Profile]],
    *,
    service_name: str | None = None,
    attributes: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> ExportProfilesServiceRequest:
    """One ``ExportProfilesServiceRequest`` holding ``profiles`` (see the module doc).

    ``profiles``: one profile, or several, each optionally as ``(service, profile)``; the others
    belong to ``service_name`` (default: the agent's service name, :func:`otlp_resource`).
    ``attributes``: resource attributes (default: those of the environment ``env``), after ours
    (``service.name``, ``process.pid``, ``telemetry.sdk.*``), each replacing one of ours with the
    same key except ``service.name``. Samples are
    split by their ``pid`` label: one ``ResourceProfiles`` per (service, pid), in order of first
    appearance; a profile's samples without ``pid`` go to a resource without ``process.pid``.
    """
    default_service, env_attributes = otlp_resource(service_name, env)
    extra = dict(env_attributes if attributes is None else attributes)
    extra.pop("service.name", None)
    items = [profiles] if isinstance(profiles, Profile) else list(profiles)
    request = ExportProfilesServiceRequest()
    dictionary = _Dictionary(request.dictionary)
    scopes: dict[tuple[str, str], profiles_pb2.ScopeProfiles] = {}
    version = _version()

    def scope_of(service: str, pid: str) -> profiles_pb2.ScopeProfiles:
        scope = scopes.get((service, pid))
        if scope is None:
            rp = request.resource_profiles.add()
            resource: dict[str, str | int] = {"service.name": service}
            if pid:
                resource["process.pid"] = int(pid) if pid.isdigit() else pid
            resource.update({"telemetry.sdk.name": "middleware", "telemetry.sdk.language": "python",
                             "telemetry.sdk.version": version})
            resource.update(extra)  # a key given again takes the later value, in its first place
            for key, value in resource.items():
                rp.resource.attributes.add(key=key, value=_any_value(value))
            scope = scopes[(service, pid)] = rp.scope_profiles.add()
            scope.scope.name = SCOPE_NAME
            scope.scope.version = version
        return scope

    for item in items:
        service, profile = item if isinstance(item, tuple) else (default_service, item)
        by_pid: dict[str, list[Sample]] = {}
        for sample in profile.samples:
            by_pid.setdefault(sample.label("pid") or "", []).append(sample)
        for pid, samples in by_pid.items():
            _add_profiles(scope_of(service, pid), dictionary, profile, samples)
    return request


def _add_profiles(
    scope: profiles_pb2.ScopeProfiles, dictionary: _Dictionary, profile: Profile, samples: list[Sample]
) -> None:
    """One OTLP Profile per sample type of ``profile``, with those of ``samples`` non-zero in it."""
    encoded: list[tuple[int, list[int], int]] = []  # (stack, attributes, link) of each sample
    for sample in samples:
        attrs: list[int] = []
        link = 0
        for key, value in sample.labels:
            trace = profile.span_traces.get(value) if key == "span_id" else None
            if trace is not None and _SPAN_RE.match(value) and _TRACE_RE.match(trace):
                link = dictionary.link(trace, value)
            else:
                attrs.append(dictionary.attribute(key, value))
        encoded.append((dictionary.stack(sample.stack), attrs, link))
    period_type = profiles_pb2.ValueType(
        type_strindex=dictionary.string(profile.period_type[0] if profile.period_type else ""),
        unit_strindex=dictionary.string(profile.period_type[1] if profile.period_type else ""),
    )
    for index, (typ, unit) in enumerate(profile.sample_types):
        out = scope.profiles.add(
            time_unix_nano=profile.time_nanos,
            duration_nano=profile.duration_nanos,
            period=profile.period,
        )
        out.sample_type.type_strindex = dictionary.string(typ)
        out.sample_type.unit_strindex = dictionary.string(unit)
        out.period_type.CopyFrom(period_type)
        for sample, (stack, attrs, link) in zip(samples, encoded, strict=True):
            amount = sample.values[index]
            if amount:
                out.samples.add(stack_index=stack, attribute_indices=attrs, link_index=link, values=[amount])


def encode_otlp(
    profiles: Profile | Iterable[Profile | tuple[str, Profile]],
    *,
    service_name: str | None = None,
    attributes: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """:func:`to_otlp`, serialized (the body of an OTLP/HTTP protobuf export)."""
    return to_otlp(profiles, service_name=service_name, attributes=attributes, env=env).SerializeToString()


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------


@dataclass
class OtlpProfile:
    """One profile read from a request: its service, the other resource attributes (strings),
    and how many OTLP ``Profile`` messages (one per sample type) it was made of."""

    service: str
    profile: Profile
    attributes: dict[str, str] = field(default_factory=dict)
    otlp_profiles: int = 0


def parse_otlp(data: bytes, content_type: str = "application/x-protobuf") -> ExportProfilesServiceRequest:
    """An ``ExportProfilesServiceRequest`` from its protobuf bytes, or from OTLP/JSON
    (``content_type`` ``application/json``: lowerCamelCase or original field names, trace and span
    ids in hex as OTLP/JSON writes them). Raises :class:`OtlpError`."""
    request = ExportProfilesServiceRequest()
    if content_type.split(";")[0].strip().lower() == "application/json":
        try:
            doc = json.loads(data.decode("utf-8"))
            _hex_ids_to_base64(doc)
            json_format.ParseDict(doc, request)
        except (ValueError, UnicodeDecodeError, json_format.ParseError) as exc:
            raise OtlpError(f"not an OTLP/JSON ExportProfilesServiceRequest: {exc}") from None
        return request
    try:
        request.ParseFromString(data)
    except (DecodeError, ValueError) as exc:
        raise OtlpError(f"not an ExportProfilesServiceRequest (protobuf): {exc}") from None
    return request


def _hex_ids_to_base64(doc: Any) -> None:
    """OTLP/JSON writes trace, span and profile ids in hex where protobuf's JSON has base64."""
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    dictionary = doc.get("dictionary")
    links = dictionary.get("linkTable", dictionary.get("link_table")) if isinstance(dictionary, dict) else None
    for link in links if isinstance(links, list) else []:
        for key in ("traceId", "trace_id", "spanId", "span_id"):
            if isinstance(link, dict) and isinstance(link.get(key), str):
                link[key] = base64.b64encode(bytes.fromhex(link[key])).decode()
    for rp in doc.get("resourceProfiles", doc.get("resource_profiles")) or []:
        for sp in (rp.get("scopeProfiles", rp.get("scope_profiles")) or []) if isinstance(rp, dict) else []:
            for p in (sp.get("profiles") or []) if isinstance(sp, dict) else []:
                for key in ("profileId", "profile_id"):
                    if isinstance(p, dict) and isinstance(p.get(key), str):
                        p[key] = base64.b64encode(bytes.fromhex(p[key])).decode()


class _Reader:
    """Resolves a request's dictionary references, checking each one."""

    def __init__(self, d: profiles_pb2.ProfilesDictionary) -> None:
        self.d = d
        if d.string_table and d.string_table[0] != "":
            raise OtlpError("dictionary.string_table[0] must be the empty string")
        self._stacks: dict[int, tuple[Frame, ...]] = {}
        self._attributes: dict[int, tuple[str, str]] = {}
        self._frames: dict[int, tuple[Frame, ...]] = {}

    @staticmethod
    def _check(index: int, table: Any, what: str) -> None:
        if not 0 <= index < max(len(table), 1):
            raise OtlpError(f"{what} refers to index {index}, but the dictionary's table has {len(table)} entries")

    def string(self, index: int, what: str) -> str:
        self._check(index, self.d.string_table, what)
        return self.d.string_table[index] if self.d.string_table else ""

    def value(self, v: common_pb2.AnyValue, what: str) -> str:
        kind = v.WhichOneof("value")
        if kind is None:
            return ""
        if kind == "string_value":
            return v.string_value
        if kind == "string_value_strindex":
            return self.string(v.string_value_strindex, what)
        if kind == "bool_value":
            return "true" if v.bool_value else "false"
        if kind == "int_value":
            return str(v.int_value)
        if kind == "double_value":
            return repr(v.double_value) if math.isfinite(v.double_value) else str(v.double_value)
        if kind == "bytes_value":
            return v.bytes_value.hex()
        return json.dumps(json_format.MessageToDict(v), separators=(",", ":"), sort_keys=True)

    def attribute(self, index: int, what: str) -> tuple[str, str]:
        got = self._attributes.get(index)
        if got is None:
            self._check(index, self.d.attribute_table, what)
            if index == 0 or not self.d.attribute_table:
                raise OtlpError(f"{what} refers to attribute 0, the dictionary's empty entry")
            entry = self.d.attribute_table[index]
            key = self.string(entry.key_strindex, f"attribute {index}'s key")
            if not key:
                raise OtlpError(f"attribute {index} has an empty key")
            got = self._attributes[index] = (key, self.value(entry.value, f"attribute {index}'s value"))
        return got

    def _location(self, index: int) -> tuple[Frame, ...]:
        got = self._frames.get(index)
        if got is None:
            self._check(index, self.d.location_table, "a stack")
            if not self.d.location_table:
                raise OtlpError("a stack refers to a location, but the dictionary has none")
            loc = self.d.location_table[index]
            frames: list[Frame] = []
            for line in loc.lines:  # inlined functions first, the caller last (as pprof)
                self._check(line.function_index, self.d.function_table, f"location {index}")
                fn = self.d.function_table[line.function_index] if self.d.function_table else profiles_pb2.Function()
                name = self.string(fn.name_strindex, f"function {line.function_index}'s name") or self.string(
                    fn.system_name_strindex, f"function {line.function_index}'s system name")
                filename = self.string(fn.filename_strindex, f"function {line.function_index}'s file name")
                frames.append(Frame(name or "<unknown>", filename, max(int(line.line), 0)))
            if not frames:  # an unsymbolized address
                self._check(loc.mapping_index, self.d.mapping_table, f"location {index}")
                mapping = self.d.mapping_table[loc.mapping_index] if self.d.mapping_table else profiles_pb2.Mapping()
                frames.append(Frame(f"0x{loc.address:x}", self.string(mapping.filename_strindex, "a mapping"), 0))
            got = self._frames[index] = tuple(frames)
        return got

    def stack(self, index: int) -> tuple[Frame, ...]:
        """Root first, as the model has it."""
        got = self._stacks.get(index)
        if got is None:
            self._check(index, self.d.stack_table, "a sample")
            leaf_first: list[Frame] = []
            if self.d.stack_table:
                for loc in self.d.stack_table[index].location_indices:
                    leaf_first.extend(self._location(loc))
            got = self._stacks[index] = tuple(reversed(leaf_first))
        return got

    def link(self, index: int) -> tuple[str, str]:
        """``(span id, trace id)`` in lowercase hex."""
        self._check(index, self.d.link_table, "a sample")
        link = self.d.link_table[index]
        if len(link.trace_id) != 16 or len(link.span_id) != 8:
            raise OtlpError(
                f"link {index}: trace_id must be 16 bytes and span_id 8 (got {len(link.trace_id)} and "
                f"{len(link.span_id)})"
            )
        return link.span_id.hex(), link.trace_id.hex()


@dataclass
class _Group:
    service: str
    attributes: dict[str, str]
    pid: str
    time_nanos: int
    duration_nanos: int
    period_type: tuple[str, str]
    period: int
    types: list[tuple[str, str]] = field(default_factory=list)
    values: dict[tuple[tuple[Frame, ...], tuple[tuple[str, str], ...]], dict[int, int]] = field(default_factory=dict)
    span_traces: dict[str, str] = field(default_factory=dict)
    count: int = 0


def read_otlp(
    data: bytes | ExportProfilesServiceRequest, content_type: str = "application/x-protobuf"
) -> list[OtlpProfile]:
    """The profiles of an OTLP request (bytes, see :func:`parse_otlp`, or the message), one per
    resource and (window, period): see the module doc. Raises :class:`OtlpError`."""
    request = data if isinstance(data, ExportProfilesServiceRequest) else parse_otlp(data, content_type)
    reader = _Reader(request.dictionary)
    groups: dict[tuple[int, int, int, tuple[str, str], int], _Group] = {}
    for r, rp in enumerate(request.resource_profiles):
        attributes: dict[str, str] = {}
        for kv in rp.resource.attributes:
            if kv.key in attributes:
                raise OtlpError(f"resource {r}: attribute {kv.key!r} repeated")
            attributes[kv.key] = reader.value(kv.value, f"resource {r}'s {kv.key!r}")
        service = attributes.pop("service.name", "") or UNKNOWN_SERVICE
        pid = attributes.pop("process.pid", "")
        for sp in rp.scope_profiles:
            for p, msg in enumerate(sp.profiles):
                where = f"resource {r}, profile {p}"
                typ = (reader.string(msg.sample_type.type_strindex, f"{where}: sample_type"),
                       reader.string(msg.sample_type.unit_strindex, f"{where}: sample_type"))
                if not typ[0]:
                    raise OtlpError(f"{where}: sample_type has no type name")
                period_type = (reader.string(msg.period_type.type_strindex, f"{where}: period_type"),
                               reader.string(msg.period_type.unit_strindex, f"{where}: period_type"))
                key = (r, msg.time_unix_nano, msg.duration_nano, period_type, msg.period)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = _Group(service, attributes, pid, msg.time_unix_nano, msg.duration_nano,
                                                 period_type, msg.period)
                if typ not in group.types:
                    if any(name == typ[0] for name, _ in group.types):
                        raise OtlpError(f"{where}: sample type {typ[0]!r} given twice with different units")
                    group.types.append(typ)
                group.count += 1
                _read_samples(reader, msg, where, group, group.types.index(typ))
    out: list[OtlpProfile] = []
    for group in groups.values():
        samples = []
        for (stack, labels), values in group.values.items():
            samples.append(Sample(stack, tuple(values.get(i, 0) for i in range(len(group.types))), labels))
        names = [name for name, _ in group.types]
        profile = Profile(
            sample_types=list(group.types),
            samples=samples,
            time_nanos=group.time_nanos,
            duration_nanos=group.duration_nanos,
            period_type=group.period_type,
            period=group.period,
            default_sample_type="cpu" if "cpu" in names else names[-1],
            span_traces=group.span_traces,
        )
        out.append(OtlpProfile(group.service, profile, dict(group.attributes), group.count))
    return out


def _read_samples(reader: _Reader, msg: profiles_pb2.Profile, where: str, group: _Group, column: int) -> None:
    common = [reader.attribute(i, f"{where}: the profile's attributes") for i in msg.attribute_indices]
    for s, sample in enumerate(msg.samples):
        if sample.values and sample.timestamps_unix_nano and len(sample.values) != len(sample.timestamps_unix_nano):
            raise OtlpError(f"{where}, sample {s}: {len(sample.values)} values for "
                            f"{len(sample.timestamps_unix_nano)} timestamps")
        if sample.values:
            value = sum(sample.values)
        elif sample.timestamps_unix_nano:
            value = len(sample.timestamps_unix_nano)  # one event per timestamp
        else:
            raise OtlpError(f"{where}, sample {s}: neither values nor timestamps")
        labels: dict[str, str] = dict(common)
        own: set[str] = set()
        for i in sample.attribute_indices:
            key, text = reader.attribute(i, f"{where}, sample {s}")
            if key in own:
                raise OtlpError(f"{where}, sample {s}: attribute {key!r} repeated")
            own.add(key)
            labels[key] = text
        if sample.link_index:
            span_id, trace_id = reader.link(sample.link_index)
            labels["span_id"] = span_id
            group.span_traces[span_id] = trace_id
        if group.pid and "pid" not in labels:
            labels["pid"] = group.pid
        identity = (reader.stack(sample.stack_index), tuple(sorted(labels.items())))
        values = group.values.setdefault(identity, {})
        values[column] = values.get(column, 0) + value


def from_otlp(
    data: bytes | ExportProfilesServiceRequest, content_type: str = "application/x-protobuf"
) -> list[tuple[str, Profile]]:
    """``(service, profile)`` of each profile in an OTLP request (:func:`read_otlp`)."""
    return [(p.service, p.profile) for p in read_otlp(data, content_type)]
