"""Export to speedscope's JSON file format (https://www.speedscope.app/file-format-schema.json).

One "sampled" profile per thread (the ``thread_name`` label; samples without it go to "all"),
frames shared between them. Each speedscope sample is a stack of frame indices, root first, and
its weight is the value of the selected sample type. Frames are (function, file): speedscope
merges by frame, so keeping lines apart would split functions into one box per line.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

from middleware.profile import Profile
from middleware.reporters import resolve_value

logger = logging.getLogger(__name__)

__all__ = ["speedscope_document", "render_speedscope", "SCHEMA_URL"]

SCHEMA_URL = "https://www.speedscope.app/file-format-schema.json"
_UNITS = {"nanoseconds", "microseconds", "milliseconds", "seconds", "bytes"}


def speedscope_document(profile: Profile, value: str | None = None, name: str = "middleware profile") -> dict[str, Any]:
    """The speedscope file as a JSON-ready dict."""
    index, vname, unit = resolve_value(profile, value)
    frames: list[dict[str, Any]] = []
    frame_ids: dict[tuple[str, str], int] = {}
    # thread -> stack(tuple of frame ids) -> weight
    per_thread: dict[str, dict[tuple[int, ...], int]] = defaultdict(lambda: defaultdict(int))
    for sample in profile.samples:
        v = sample.values[index]
        if not v or not sample.stack:
            continue
        ids = []
        for f in sample.stack:
            key = (f.function, f.file)
            fid = frame_ids.get(key)
            if fid is None:
                fid = frame_ids[key] = len(frames)
                entry: dict[str, Any] = {"name": f.function}
                if f.file:
                    entry["file"] = f.file
                frames.append(entry)
            ids.append(fid)
        per_thread[sample.label("thread_name") or "all"][tuple(ids)] += v

    profiles: list[dict[str, Any]] = []
    for thread in sorted(per_thread):
        stacks = per_thread[thread]
        ordered = sorted(stacks.items())
        total = sum(w for _, w in ordered)
        profiles.append(
            {
                "type": "sampled",
                "name": f"{vname} - {thread}",
                "unit": unit if unit in _UNITS else "none",
                "startValue": 0,
                "endValue": total,
                "samples": [list(s) for s, _ in ordered],
                "weights": [w for _, w in ordered],
            }
        )
    # the busiest thread first is what one wants to look at
    profiles.sort(key=lambda p: -p["endValue"])
    return {
        "$schema": SCHEMA_URL,
        "shared": {"frames": frames},
        "profiles": profiles,
        "name": name,
        "activeProfileIndex": 0,
        "exporter": "middleware",
    }


def render_speedscope(profile: Profile, value: str | None = None, name: str = "middleware profile") -> str:
    return json.dumps(speedscope_document(profile, value, name), separators=(",", ":")) + "\n"
