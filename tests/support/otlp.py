"""Reading OTLP profiles (opentelemetry-proto messages) back in the tests of the OTLP converter and
exporter."""
from __future__ import annotations

from typing import Any

from middleware.profile import Frame


def sample_stack(dictionary: Any, sample: Any) -> tuple[Frame, ...]:
    """The stack of an OTLP ``sample``, root first, from the request's ``dictionary``; each
    location must be one line with no mapping, each function's system name its name."""
    names = dictionary.string_table
    frames: list[Frame] = []
    for li in dictionary.stack_table[sample.stack_index].location_indices:
        loc = dictionary.location_table[li]
        assert loc.mapping_index == 0 and len(loc.lines) == 1
        fn = dictionary.function_table[loc.lines[0].function_index]
        assert fn.name_strindex == fn.system_name_strindex
        frames.append(Frame(names[fn.name_strindex], names[fn.filename_strindex], loc.lines[0].line))
    return tuple(reversed(frames))
