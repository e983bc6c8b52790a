"""Label-name rules of the collector, matching what a Grafana Pyroscope server accepts.

Label names follow the project's one label-name rule,
:func:`middleware.labels.label_name_problem` (the Prometheus data model,
``[a-zA-Z_][a-zA-Z0-9_]*``, no leading ``__``, at most :data:`MAX_LABEL_NAME_LENGTH`
characters), with one leniency that Pyroscope has as well: OpenTelemetry-style names with dots
(``otel.scope.name``, ``process.runtime.version``, which the official clients send as series
labels) are accepted and stored with every ``.`` replaced by ``_`` (``otel_scope_name``). Nothing else is rewritten: a
name with any other character outside ``[a-zA-Z0-9_.]`` (``bad-name``, ``ключ``), an empty name or
one starting with a digit is refused, because replacing arbitrary characters would make distinct
names collide silently. Values are kept exactly as sent (they must be valid UTF-8, which a
decoded ``str`` always is).

The same rules apply wherever a label name enters: the ``{k=v}`` tags of ``/ingest?name=``, the
series labels of a push, and the string labels of pprof samples (which become series labels).

Refused, with a message naming the label (each is an :class:`IngestError` 400):

* an empty name, a name with characters other than ``[a-zA-Z0-9_.]``, a leading digit;
* a name starting with ``__`` after sanitization (reserved for the server's own labels);
* two labels of one series that become the same name with different values (``a.b=1`` and
  ``a_b=2``); with the same value they are one label;
* a name longer than :data:`MAX_LABEL_NAME_LENGTH` or a value longer than
  :data:`MAX_LABEL_VALUE_LENGTH` characters (Pyroscope's default limits);
* a series with more than :data:`MAX_LABEL_NAMES_PER_SERIES` label names, counting
  ``service_name`` and the profile-type label ``__name__`` that every series carries
  (Pyroscope's default limit, counted the way it counts).
"""

from __future__ import annotations

from collections.abc import Iterable

from middleware.labels import LABEL_NAME_FORM, MAX_LABEL_NAME_LENGTH, label_name_problem

__all__ = [
    "LabelError",
    "MAX_LABEL_NAME_LENGTH",
    "MAX_LABEL_VALUE_LENGTH",
    "MAX_LABEL_NAMES_PER_SERIES",
    "IMPLICIT_SERIES_LABELS",
    "sanitize_label_name",
    "sanitize_labels",
    "check_series_size",
]

MAX_LABEL_VALUE_LENGTH = 2048
MAX_LABEL_NAMES_PER_SERIES = 30
#: Labels every stored series has besides its own: the service and the profile type.
IMPLICIT_SERIES_LABELS = 2


class LabelError(ValueError):
    """A label that the collector refuses; the message says which and why."""


def sanitize_label_name(name: str, where: str = "a label") -> str:
    """``name`` with dots replaced by underscores, or :class:`LabelError` if the result is not a
    label name (:func:`middleware.labels.label_name_problem`)."""
    sanitized = name.replace(".", "_")
    problem = label_name_problem(sanitized)
    if problem is None:
        return sanitized
    shown = f"{name[:64]!r}..." if len(name) > MAX_LABEL_NAME_LENGTH else repr(name)
    if problem.endswith(LABEL_NAME_FORM):
        problem += " (dots are accepted and become '_')"
    raise LabelError(f"bad label name {shown} in {where}: {problem}")


def _check_value(name: str, value: str, where: str) -> None:
    if len(value) > MAX_LABEL_VALUE_LENGTH:
        raise LabelError(f"label {name!r} in {where}: value longer than {MAX_LABEL_VALUE_LENGTH} characters")


def sanitize_labels(pairs: Iterable[tuple[str, str]], where: str = "a label set") -> tuple[tuple[str, str], ...]:
    """Sanitize the names of one label set, sorted by name; raises :class:`LabelError`.

    A name given twice (before sanitization) is refused; two names that become the same one are
    merged when their values agree and refused otherwise.
    """
    seen_raw: set[str] = set()
    out: dict[str, str] = {}
    origin: dict[str, str] = {}
    for raw, value in pairs:
        if raw in seen_raw:
            raise LabelError(f"label {raw!r} repeated in {where}")
        seen_raw.add(raw)
        name = sanitize_label_name(raw, where)
        _check_value(raw, value, where)
        if name in out:
            if out[name] != value:
                raise LabelError(
                    f"labels {origin[name]!r} and {raw!r} in {where} both become {name!r} "
                    "(dots become '_') with different values"
                )
            continue
        out[name] = value
        origin[name] = raw
    return tuple(sorted(out.items()))


def check_series_size(labels: tuple[tuple[str, str], ...], where: str = "a series") -> None:
    """Refuse a series with more label names than Pyroscope accepts (:class:`LabelError`)."""
    count = len(labels) + IMPLICIT_SERIES_LABELS
    if count > MAX_LABEL_NAMES_PER_SERIES:
        names = ", ".join(name for name, _ in labels)
        raise LabelError(
            f"too many labels in {where}: {count} label names counting service_name and __name__ "
            f"(limit {MAX_LABEL_NAMES_PER_SERIES}): {names}"
        )
