"""``export --format folded|speedscope|otlp -o FILE``: stacks for other tools.

``folded`` and ``speedscope`` write the merged profile of the selection; ``otlp`` writes an OTLP
``ExportProfilesServiceRequest`` (protobuf, :mod:`middleware.otlp`) in which each selected pprof
keeps its own window and process: one ``ResourceProfiles`` per (service, pid), one OTLP
``Profile`` per sample type of each pprof. The service of a local-store file is the one in its
name (``<service>-<pid>-<start>.pb.gz``), unless ``--service`` says otherwise.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from middleware.commands import (
    CommandError,
    add_profile_options,
    load_selected,
    parse_labels,
    time_range_of,
    write_output,
)
from middleware.pprof import ProfileError, find_profile_files, read_pprof_file
from middleware.profile import Profile, Sample
from middleware.reporters.folded import render_folded
from middleware.reporters.speedscope import render_speedscope

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export as folded stacks, speedscope JSON or OTLP profiles",
        description="Export the merged profile as Brendan Gregg's folded stacks or as a speedscope file, "
        "or the selected profiles as an OTLP ExportProfilesServiceRequest (protobuf; every sample type "
        "unless --value names one).",
    )
    add_profile_options(parser)
    parser.add_argument("--format", choices=("folded", "speedscope", "otlp"), required=True, help="output format")
    parser.add_argument("-o", "--output", default="-", metavar="FILE", help="output file (default: stdout)")
    parser.add_argument(
        "--service", metavar="NAME",
        help="otlp: the service.name of every profile (default: the service in a local-store file's name, "
        "else OTEL_SERVICE_NAME / MW_SERVICE_NAME, else service.name of OTEL_RESOURCE_ATTRIBUTES, "
        "else unknown_service)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "otlp":
        return _run_otlp(args)
    if args.service is not None:
        raise CommandError("--service applies to --format otlp only")
    profile, name, _ = load_selected(args)
    if args.format == "folded":
        text = render_folded(profile, name)
    else:
        label = Path(args.paths[0]).name if len(args.paths) == 1 else f"{len(args.paths)} inputs"
        text = render_speedscope(profile, name, name=f"middleware {name} profile: {label}")
    write_output(args.output, text)
    return 0


def _run_otlp(args: argparse.Namespace) -> int:
    from middleware.otlp import encode_otlp

    explicit, fallback = _services(args.service)
    sources = _select(args, explicit, fallback)
    _write_binary(args.output, encode_otlp(sources, service_name=fallback))
    return 0


def _services(service: str | None) -> tuple[str | None, str]:
    """``(--service by the service-name rule or None, the service of a file whose name has none)``."""
    from middleware.config import SETTINGS, resource_attributes
    from middleware.otlp import UNKNOWN_SERVICE, otlp_resource

    if service is not None:
        name = otlp_resource(service)[0]
        return name, name
    named = any((os.environ.get(v) or "").strip() for v in SETTINGS["service_name"].env)
    if named or resource_attributes().get("service.name"):
        return None, otlp_resource()[0]
    return None, UNKNOWN_SERVICE


def _select(args: argparse.Namespace, explicit: str | None, fallback: str) -> list[tuple[str, Profile]]:
    """Each pprof the options select (files, directories, --from/--until, --label, --value), with
    its service; :class:`ProfileError` / :class:`CommandError` when nothing is left."""
    from middleware.serve.importer import parse_store_filename

    time_range = time_range_of(args)
    labels = parse_labels(args.label)
    files: list[Path] = []
    for path in args.paths:
        p = Path(path)
        if p.is_dir():
            found = find_profile_files(p)
            if not found:
                raise ProfileError(f"{p}: directory holds no pprof files")
            files += found
        else:
            files.append(p)
    out: list[tuple[str, Profile]] = []
    read = 0
    for f in files:
        try:
            profile = read_pprof_file(f)
        except ProfileError as exc:
            if str(f) in args.paths:
                raise
            logger.warning("skipping %s", exc)  # a store may hold a file being written
            continue
        read += 1
        if time_range is not None and not profile.overlaps(*time_range):
            continue
        if labels:
            profile = profile.filter(labels=labels)
        if args.value is not None:
            names = [n for n, _ in profile.sample_types]
            if args.value not in names:
                continue
            profile = _only_type(profile, names.index(args.value))
        if profile.is_empty():
            continue
        parsed = parse_store_filename(f.name)
        out.append((explicit or (parsed[0] if parsed else fallback), profile))
    if not out:
        what = ", ".join(args.paths)
        if not read:
            raise ProfileError(f"{what}: no readable profile")
        raise CommandError(f"{what}: no profile with samples matches the selection ({read} read)")
    return out


def _only_type(profile: Profile, index: int) -> Profile:
    kept = Profile(
        sample_types=[profile.sample_types[index]],
        samples=[Sample(s.stack, (s.values[index],), s.labels) for s in profile.samples if s.values[index]],
        time_nanos=profile.time_nanos,
        duration_nanos=profile.duration_nanos,
        period_type=profile.period_type,
        period=profile.period,
        default_sample_type=profile.sample_types[index][0],
        span_traces=dict(profile.span_traces),
    )
    return kept


def _write_binary(path: str | None, data: bytes) -> None:
    if path in (None, "-"):
        if sys.stdout.isatty():
            raise CommandError("refusing to write protobuf to a terminal: use -o FILE or a pipe")
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    p = Path(path)
    if p.parent and not p.parent.exists():
        raise CommandError(f"{p}: directory {p.parent} does not exist")
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, p)
    except OSError as exc:
        raise CommandError(f"{p}: cannot write ({exc.strerror or exc})") from None
