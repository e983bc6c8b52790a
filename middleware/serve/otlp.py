"""OTLP profiles ingest of ``python -m middleware serve``: ``POST /v1development/profiles``.

The body is an ``ExportProfilesServiceRequest`` (OTLP/HTTP: ``application/x-protobuf``, or
``application/json``; ``Content-Encoding: gzip`` accepted). :func:`decode_otlp` turns it into
:class:`~middleware.serve.ingest.Upload` s with :mod:`middleware.otlp` (one per resource and
window, see there), each checked by the same path as ``/ingest`` and the push API
(:func:`~middleware.serve.ingest.upload_from_profile`: label names sanitised, values and totals
bounded, at most ``max_series_per_upload`` series over the whole request, the store's series cap
per service). The service is the resource's ``service.name``, its other attributes are static
tags of the series (dots become ``_``), except ``process.pid``, which is the samples' ``pid``.

Answers: ``200`` with an ``ExportProfilesServiceResponse`` in the request's encoding; when some
profiles were refused (a bad service name or label, a negative value...), the others are stored
and ``partial_success`` says how many OTLP profiles were rejected and why. A request that cannot
be read, or whose every profile was refused, is ``400`` with the reason (text); bodies over
``--max-body`` or decompressing beyond ``--max-profile`` are ``413``; other encodings ``415``;
storing failures as for ``/ingest`` (503, 507).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

from google.protobuf import json_format

from middleware.otlp import OTLP_PROFILES_PATH, OtlpError, read_otlp
from middleware.pprof import encode_pprof
from middleware.serve.ingest import (
    SERVICE_LABEL,
    IngestError,
    IngestLimits,
    IngestParams,
    Upload,
    gunzip_capped,
    upload_from_profile,
)
from middleware.serve.labels import LabelError, sanitize_labels

if TYPE_CHECKING:  # pragma: no cover - typing only
    from middleware.serve.routes import Handler

log = logging.getLogger(__name__)

__all__ = ["OTLP_PROFILES_PATH", "OtlpDecoded", "decode_otlp", "handle_otlp_export"]

_SERVICE_MAX = 256
_PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf", "application/proto", "")


@dataclass
class OtlpDecoded:
    """The uploads of one request, and what was refused: OTLP profiles and the first reason."""

    uploads: list[Upload] = field(default_factory=list)
    rejected_profiles: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def error_message(self) -> str:
        more = f" (and {len(self.reasons) - 1} more)" if len(self.reasons) > 1 else ""
        return (self.reasons[0] + more) if self.reasons else ""


def _content_type(headers: Mapping[str, str]) -> str:
    return (headers.get("content-type", "") or "").split(";")[0].strip().lower()


def decode_otlp(
    headers: Mapping[str, str], body: bytes, limits: IngestLimits, now_ns: int | None = None
) -> OtlpDecoded:
    """Decode and check an export request; :class:`IngestError` when it cannot be read at all
    (400), is too large (413), has an unsupported encoding (415), or holds more series than
    ``limits.max_series_per_upload``. Profiles refused on their own are counted, not raised."""
    encoding = (headers.get("content-encoding", "") or "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        body = gunzip_capped(body, limits.max_decompressed_bytes)
    elif encoding not in ("", "identity"):
        raise IngestError(415, f"unsupported Content-Encoding {encoding!r}: use gzip or none")
    ctype = _content_type(headers)
    if ctype not in _PROTOBUF_TYPES and ctype != "application/json":
        raise IngestError(415, f"unsupported Content-Type {ctype!r}: use application/x-protobuf or application/json")
    if len(body) > limits.max_decompressed_bytes:
        raise IngestError(413, f"request exceeds the limit of {limits.max_decompressed_bytes} bytes")
    try:
        profiles = read_otlp(body, "application/json" if ctype == "application/json" else "application/x-protobuf")
    except OtlpError as exc:
        raise IngestError(400, str(exc)) from None
    out = OtlpDecoded()
    request_series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    tenant = headers.get("x-scope-orgid", "") or ""
    for item in profiles:
        try:
            params = IngestParams(service=_service(item.service), tags=_tags(item.attributes), spy_name="otlp")
            plain = encode_pprof(item.profile, compress=False)
            upload = upload_from_profile(params, item.profile, plain, tenant=tenant, now_ns=now_ns, limits=limits)
        except IngestError as exc:
            if exc.status != 400:
                raise
            out.rejected_profiles += item.otlp_profiles
            out.reasons.append(f"service {item.service!r}: {exc.message}")
            continue
        request_series.update((params.service, labels) for labels in upload.series)
        if len(request_series) > limits.max_series_per_upload:
            raise IngestError(
                400,
                f"too many series in one request: more than {limits.max_series_per_upload} distinct label sets "
                "over all its profiles (resource attributes plus sample attributes; $MW_SERVE_MAX_SERIES_PER_UPLOAD)",
            )
        out.uploads.append(upload)
    return out


def _service(name: str) -> str:
    if not name or len(name) > _SERVICE_MAX or any(c in name for c in '{}, ="') or not name.isprintable():
        raise IngestError(
            400, f"bad service.name {name[:64]!r}: 1-{_SERVICE_MAX} characters, no spaces, quotes, commas, '=' or "
            "braces"
        )
    return name


def _tags(attributes: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    try:
        tags = sanitize_labels(list(attributes.items()), where="the resource attributes")
    except LabelError as exc:
        raise IngestError(400, str(exc)) from None
    if any(k == SERVICE_LABEL for k, _ in tags):
        raise IngestError(400, f"resource attribute {SERVICE_LABEL!r} is reserved (the service is service.name)")
    return tags


def _response(partial: OtlpDecoded, ctype: str) -> tuple[bytes, str]:
    from middleware._proto.otlp.profiles_service_pb2 import ExportProfilesServiceResponse

    msg = ExportProfilesServiceResponse()
    if partial.rejected_profiles:
        msg.partial_success.rejected_profiles = partial.rejected_profiles
        msg.partial_success.error_message = partial.error_message
    if ctype == "application/json":
        return json_format.MessageToJson(msg, indent=None).encode(), "application/json"
    return msg.SerializeToString(), "application/x-protobuf"


def handle_otlp_export(handler: Handler) -> None:
    """Answer ``POST /v1development/profiles`` on ``handler`` (authorization included)."""
    app = handler.server.app
    if not handler._authorized():
        length = (handler.headers.get("Content-Length") or "").strip()
        handler._drain(int(length) if length.isdigit() else 0)
        handler._deny()
        return
    try:
        body = handler._read_body(app.config.limits.max_body_bytes)
        decoded = decode_otlp(handler.headers, body, app.config.limits)  # type: ignore[arg-type]
    except IngestError as exc:
        app.rejected += 1
        log.info("rejected OTLP export from %s: %s %s", handler.client_address[0], exc.status, exc.message)
        handler._text(exc.status, exc.message)
        return
    if not decoded.uploads:
        app.rejected += 1
        message = decoded.error_message or "the request holds no profile"
        log.info("rejected OTLP export from %s: 400 %s", handler.client_address[0], message)
        handler._text(HTTPStatus.BAD_REQUEST, message)
        return
    ids = handler._store(decoded.uploads, "otlp", "an OTLP export", "the profiles")
    if ids is None:
        return
    app.accepted += len(ids)
    if decoded.rejected_profiles:
        app.rejected += 1
        log.info("OTLP export from %s: %d profiles rejected: %s", handler.client_address[0],
                 decoded.rejected_profiles, decoded.error_message)
    body_out, ctype = _response(decoded, _content_type(handler.headers))  # type: ignore[arg-type]
    handler._send(HTTPStatus.OK, body_out, ctype)
