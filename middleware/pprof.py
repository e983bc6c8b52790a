"""Reading and writing pprof (google/pprof profile.proto) profiles.

* :func:`parse_pprof` turns pprof bytes (gzipped or plain) into a :class:`~middleware.profile.Profile`,
  checking pprof's structure rules on the way (docs/protocol.md, "The profile":
  string_table[0] == "", nonzero unique ids, references that resolve, one value per sample type).
* :func:`encode_pprof` does the reverse and gzips the result; functions are unique by
  (name, file), locations by (function, line), stacks are written leaf first.
* :func:`load_profiles` reads files and directories, keeps the profiles whose time window
  overlaps a range, filters by labels and merges everything into one profile.

Problems with the input are reported as :class:`ProfileError` with a one-line message naming the
file (missing file, not pprof, corrupt gzip, empty profile, ...).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from google.protobuf.message import DecodeError

from middleware._proto import profile_pb2 as pb
from middleware.profile import (
    Frame,
    LabelFilter,
    Profile,
    Sample,
    normalize_label_filter,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ProfileError",
    "parse_pprof",
    "encode_pprof",
    "read_pprof_file",
    "write_pprof_file",
    "find_profile_files",
    "load_profiles",
    "PROFILE_SUFFIXES",
]

#: File names read from a directory (other files are ignored, hidden files too).
PROFILE_SUFFIXES = (".pprof", ".pb.gz", ".pb", ".prof", ".pprof.gz")

_GZIP_MAGIC = b"\x1f\x8b"


class ProfileError(Exception):
    """A profile could not be read; ``str(err)`` is a one-line message for the user."""


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------
def _gunzip(data: bytes, where: str) -> bytes:
    try:
        # gzip.decompress handles concatenated members and checks the CRC and the length.
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise ProfileError(f"{where}: corrupt gzip data ({exc})") from None


def parse_pprof(data: bytes, source: str = "<bytes>") -> Profile:
    """Decode a pprof profile (gzip-compressed or plain protobuf).

    Raises :class:`ProfileError` when the data is not a well-formed pprof profile. A profile
    with no samples is returned as such (see :func:`load_profiles` for the "empty" error).
    """
    if not data:
        raise ProfileError(f"{source}: empty file (0 bytes), not a pprof profile")
    if data[:2] == _GZIP_MAGIC:
        data = _gunzip(data, source)
        if not data:
            raise ProfileError(f"{source}: gzip stream holds no data, not a pprof profile")
    msg = pb.Profile()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ProfileError(f"{source}: not a pprof profile (protobuf decoding failed: {exc})") from None
    return _from_message(msg, source)


def _from_message(msg: pb.Profile, source: str) -> Profile:
    strings = list(msg.string_table)

    def bad(why: str) -> ProfileError:
        return ProfileError(f"{source}: not a valid pprof profile: {why}")

    if not strings or strings[0] != "":
        raise bad("string_table[0] must be the empty string")
    if not msg.sample_type:
        raise bad("no sample_type")

    def s(index: int, what: str) -> str:
        if not 0 <= index < len(strings):
            raise bad(f"{what} refers to string {index}, but string_table has {len(strings)} entries")
        return strings[index]

    sample_types = [(s(vt.type, "sample_type.type"), s(vt.unit, "sample_type.unit")) for vt in msg.sample_type]

    functions: dict[int, tuple[str, str]] = {}
    for fn in msg.function:
        if fn.id == 0 or fn.id in functions:
            raise bad(f"function id {fn.id} is zero or repeated")
        functions[fn.id] = (s(fn.name, "function.name"), s(fn.filename, "function.filename"))

    mappings: dict[int, str] = {}
    for m in msg.mapping:
        if m.id == 0 or m.id in mappings:
            raise bad(f"mapping id {m.id} is zero or repeated")
        mappings[m.id] = s(m.filename, "mapping.filename")

    # Each location expands to one or more frames, leaf first (inlined functions come first).
    locations: dict[int, tuple[Frame, ...]] = {}
    for loc in msg.location:
        if loc.id == 0 or loc.id in locations:
            raise bad(f"location id {loc.id} is zero or repeated")
        if loc.mapping_id and loc.mapping_id not in mappings:
            raise bad(f"location {loc.id} refers to missing mapping {loc.mapping_id}")
        frames: list[Frame] = []
        for ln in loc.line:
            if ln.function_id not in functions:
                raise bad(f"location {loc.id} refers to missing function {ln.function_id}")
            name, filename = functions[ln.function_id]
            frames.append(Frame(name or "<unknown>", filename, max(int(ln.line), 0)))
        if not frames:  # an unsymbolized address
            frames.append(Frame(f"0x{loc.address:x}", mappings.get(loc.mapping_id, ""), 0))
        locations[loc.id] = tuple(frames)

    ntypes = len(sample_types)
    samples: list[Sample] = []
    for i, smp in enumerate(msg.sample):
        if len(smp.value) != ntypes:
            raise bad(f"sample {i} has {len(smp.value)} values for {ntypes} sample types")
        leaf_first: list[Frame] = []
        for loc_id in smp.location_id:
            loc_frames = locations.get(loc_id)
            if loc_frames is None:
                raise bad(f"sample {i} refers to missing location {loc_id}")
            leaf_first.extend(loc_frames)
        labels: list[tuple[str, str]] = []
        for lab in smp.label:
            key = s(lab.key, "label.key")
            if lab.str:
                labels.append((key, s(lab.str, "label.str")))
            else:
                unit = s(lab.num_unit, "label.num_unit")
                labels.append((key, f"{lab.num}{unit and ' ' + unit}"))
        samples.append(Sample(tuple(reversed(leaf_first)), tuple(int(v) for v in smp.value), tuple(sorted(labels))))

    default = s(msg.default_sample_type, "default_sample_type") if msg.default_sample_type else ""
    if not default:
        default = sample_types[-1][0]  # pprof's rule: the last sample type
    period_type = (
        (s(msg.period_type.type, "period_type.type"), s(msg.period_type.unit, "period_type.unit"))
        if msg.HasField("period_type")
        else ("", "")
    )
    comments, requests = split_request_comments(s(c, "comment") for c in msg.comment)
    comments, span_traces = split_span_comments(comments)
    return Profile(
        sample_types=sample_types,
        samples=samples,
        time_nanos=int(msg.time_nanos),
        duration_nanos=int(msg.duration_nanos),
        period_type=period_type,
        period=int(msg.period),
        default_sample_type=default,
        comments=comments,
        requests=requests,
        span_traces=span_traces,
    )


#: Prefix of the comments carrying the trace of each span id: ``mw:spans {"<span>": "<trace>", ...}``.
SPANS_COMMENT = "mw:spans "
#: Spans per ``mw:spans`` comment (a window's spans take as many comments as needed).
SPANS_PER_COMMENT = 256
_SPAN_ID_RE = re.compile(r"[0-9a-f]{16}\Z")
_TRACE_ID_RE = re.compile(r"[0-9a-f]{32}\Z")


def split_span_comments(comments: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """The plain comments, and span id -> trace id of the ``mw:spans`` ones (lowercase hex).

    A malformed spans comment is kept as a plain comment."""
    plain: list[str] = []
    spans: dict[str, str] = {}
    for c in comments:
        if c.startswith(SPANS_COMMENT):
            try:
                doc = json.loads(c[len(SPANS_COMMENT):])
                if not (isinstance(doc, dict) and all(
                        isinstance(k, str) and isinstance(v, str) and _SPAN_ID_RE.match(k) and _TRACE_ID_RE.match(v)
                        for k, v in doc.items())):
                    raise ValueError("bad spans comment")
            except ValueError:
                plain.append(c)
                continue
            spans.update(doc)
        else:
            plain.append(c)
    return plain, spans


def span_comments(span_traces: Mapping[str, str]) -> list[str]:
    """The ``mw:spans`` comments of ``span_traces`` (inverse of :func:`split_span_comments`)."""
    items = sorted(span_traces.items())
    return [SPANS_COMMENT + json.dumps(dict(items[i:i + SPANS_PER_COMMENT]), separators=(",", ":"))
            for i in range(0, len(items), SPANS_PER_COMMENT)]


#: Prefix of the comments carrying request counts: ``mw:requests {"count": N, "labels": {...}}``.
REQUESTS_COMMENT = "mw:requests "


def split_request_comments(
    comments: Iterable[str],
) -> tuple[list[str], dict[tuple[tuple[str, str], ...], int]]:
    """The plain comments, and the request counts (label set -> count) of the ``mw:requests`` ones.

    A malformed request comment is kept as a plain comment (never an error: comments are free
    text to other tools)."""
    plain: list[str] = []
    requests: dict[tuple[tuple[str, str], ...], int] = {}
    for c in comments:
        if c.startswith(REQUESTS_COMMENT):
            try:
                doc = json.loads(c[len(REQUESTS_COMMENT):])
                count = doc["count"]
                labels = doc["labels"]
                if not (isinstance(count, int) and count >= 0 and isinstance(labels, dict)
                        and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
                    raise ValueError("bad request count")
            except (ValueError, KeyError, TypeError):
                plain.append(c)
                continue
            key = tuple(sorted(labels.items()))
            requests[key] = requests.get(key, 0) + count
        else:
            plain.append(c)
    return plain, requests


def request_comments(requests: Mapping[tuple[tuple[str, str], ...], int]) -> list[str]:
    """The ``mw:requests`` comments of request counts (inverse of :func:`split_request_comments`)."""
    return [REQUESTS_COMMENT + json.dumps({"count": count, "labels": dict(key)}, separators=(",", ":"))
            for key, count in requests.items() if count > 0]


# ------------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------------
class _Strings:
    def __init__(self) -> None:
        self.table: list[str] = [""]
        self.index: dict[str, int] = {"": 0}

    def __call__(self, value: str) -> int:
        i = self.index.get(value)
        if i is None:
            i = self.index[value] = len(self.table)
            self.table.append(value)
        return i


def to_message(profile: Profile) -> pb.Profile:
    """Build the protobuf message for ``profile`` (not compressed)."""
    if not profile.sample_types:
        raise ValueError("a pprof profile needs at least one sample type")
    ntypes = len(profile.sample_types)
    st = _Strings()
    msg = pb.Profile()
    for typ, unit in profile.sample_types:
        msg.sample_type.add(type=st(typ), unit=st(unit))

    function_ids: dict[tuple[str, str], int] = {}
    location_ids: dict[tuple[int, int], int] = {}

    def location_id(frame: Frame) -> int:
        fkey = (frame.function, frame.file)
        fid = function_ids.get(fkey)
        if fid is None:
            fid = function_ids[fkey] = len(function_ids) + 1
            msg.function.add(id=fid, name=st(frame.function), system_name=st(frame.function), filename=st(frame.file))
        lkey = (fid, frame.line)
        lid = location_ids.get(lkey)
        if lid is None:
            lid = location_ids[lkey] = len(location_ids) + 1
            loc = msg.location.add(id=lid)
            loc.line.add(function_id=fid, line=frame.line)
        return lid

    for sample in profile.samples:
        if len(sample.values) != ntypes:
            raise ValueError(f"sample has {len(sample.values)} values for {ntypes} sample types")
        out = msg.sample.add()
        out.location_id.extend(location_id(f) for f in reversed(sample.stack))  # leaf first
        out.value.extend(sample.values)
        for key, value in sample.labels:
            out.label.add(key=st(key), str=st(value))

    msg.time_nanos = profile.time_nanos
    msg.duration_nanos = profile.duration_nanos
    if profile.period_type and any(profile.period_type):
        msg.period_type.type = st(profile.period_type[0])
        msg.period_type.unit = st(profile.period_type[1])
    msg.period = profile.period
    msg.comment.extend(st(c) for c in [*profile.comments, *request_comments(profile.requests),
                                    *span_comments(profile.span_traces)])
    if profile.default_sample_type:
        msg.default_sample_type = st(profile.default_sample_type)
    msg.string_table.extend(st.table)
    return msg


def encode_pprof(profile: Profile, compress: bool = True) -> bytes:
    """Serialize ``profile`` as pprof, gzip-compressed unless ``compress`` is False."""
    raw = to_message(profile).SerializeToString()
    # mtime=0 keeps the output deterministic for identical profiles.
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def read_pprof_file(path: str | os.PathLike[str]) -> Profile:
    """Read and decode one pprof file; errors are :class:`ProfileError`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ProfileError(f"{p}: no such file or directory") from None
    except IsADirectoryError:
        raise ProfileError(f"{p}: is a directory") from None
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    return parse_pprof(data, str(p))


def write_pprof_file(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Write ``profile`` gzipped to ``path`` (atomically: temporary file + rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_bytes(encode_pprof(profile))
    os.replace(tmp, p)


def find_profile_files(directory: str | os.PathLike[str]) -> list[Path]:
    """pprof files under ``directory`` (recursive, sorted; see :data:`PROFILE_SUFFIXES`)."""
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.endswith(PROFILE_SUFFIXES):
                found.append(Path(root, name))
    return found


def _describe_filter(labels: LabelFilter, time_range: tuple[int | None, int | None] | None) -> str:
    parts = []
    if time_range and time_range != (None, None):
        parts.append("the time range")
    if labels:
        parts.append(" ".join(f"--label {k}={v}" for k, vs in labels.items() for v in sorted(vs)))
    return " and ".join(parts)


def load_profiles(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    time_range: tuple[int | None, int | None] | None = None,
    labels: LabelFilter | Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    allow_empty: bool = False,
) -> Profile:
    """Read pprof files and directories, select and merge them into one profile.

    * ``paths``: files and/or directories (directories are searched recursively for
      :data:`PROFILE_SUFFIXES`). A named file that cannot be read is an error; a file inside a
      directory that cannot be read is skipped with a warning (a store may hold a file being
      written), unless nothing readable remains.
    * ``time_range``: ``(start_ns, end_ns)``, either may be None; a profile is kept when its
      window ``[time_nanos, time_nanos + duration_nanos)`` overlaps the range.
    * ``labels``: keep samples whose labels match (see :meth:`Profile.filter`).

    Raises :class:`ProfileError` for unreadable input, and, unless ``allow_empty``, when the
    result has no samples ("empty profile"), with a message that says why.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ProfileError("no profile given")
    wanted = normalize_label_filter(labels)

    loaded: list[Profile] = []
    skipped: list[str] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files = find_profile_files(p)
            if not files:
                raise ProfileError(f"{p}: directory holds no pprof files (*{', *'.join(PROFILE_SUFFIXES)})")
            for f in files:
                try:
                    loaded.append(read_pprof_file(f))
                except ProfileError as exc:
                    logger.warning("skipping %s", exc)
                    skipped.append(str(exc))
        else:
            loaded.append(read_pprof_file(p))
    if not loaded:
        raise ProfileError(
            skipped[0] if len(skipped) == 1 else f"no readable profile ({len(skipped)} files failed: {skipped[0]})"
        )

    names = ", ".join(str(p) for p in paths)
    if not allow_empty and all(p.is_empty() for p in loaded):
        raise ProfileError(f"{names}: empty profile (no samples)")

    selected = [p for p in loaded if time_range is None or p.overlaps(*time_range)]
    if not selected:
        if allow_empty:
            return Profile(sample_types=list(loaded[0].sample_types), default_sample_type=loaded[0].default_sample_type)
        raise ProfileError(f"{names}: no profile in the time range ({len(loaded)} profiles outside it)")
    try:
        merged = Profile.merge_all(selected)
    except ValueError as exc:
        raise ProfileError(f"{names}: cannot merge profiles: {exc}") from None
    if wanted:
        merged = merged.filter(labels=wanted)
    if not allow_empty and merged.is_empty():
        raise ProfileError(f"{names}: no samples match {_describe_filter(wanted, time_range)}")
    return merged
