"""The profile model and the pprof reader/writer, on synthetic profiles.

The encoder's output is decoded independently with the raw protobuf classes (not with
parse_pprof) and checked against the structure rules of docs/protocol.md.
"""
from __future__ import annotations

import gzip
import os
from collections import Counter
from pathlib import Path

import pytest

from middleware._proto import profile_pb2 as pb
from middleware.pprof import (
    ProfileError,
    encode_pprof,
    find_profile_files,
    load_profiles,
    parse_pprof,
    read_pprof_file,
    write_pprof_file,
)
from middleware.profile import Frame, Profile, Sample
from support.profiles import (
    PERIOD,
    T0,
    build,
    calc_profile,
    frame,
    recursive_profile,
    sample,
)

pytestmark = pytest.mark.unit

SEC = 1_000_000_000


def _multiset(profile: Profile) -> Counter:
    return Counter({(s.stack, s.labels): s.values for s in profile.samples}.items())


# ------------------------------------------------------------------------------------------------
# encode: structure rules, checked on the raw message
# ------------------------------------------------------------------------------------------------
def test_encoded_profile_follows_protocol_rules():
    profile = calc_profile()
    data = encode_pprof(profile)
    assert data[:2] == b"\x1f\x8b", "files are gzipped"
    msg = pb.Profile()
    msg.ParseFromString(gzip.decompress(data))
    st = list(msg.string_table)

    assert st[0] == ""
    assert len(set(st)) == len(st), "strings are interned once"
    assert [(st[t.type], st[t.unit]) for t in msg.sample_type] == profile.sample_types
    assert st[msg.default_sample_type] == "cpu"
    assert (st[msg.period_type.type], st[msg.period_type.unit]) == ("cpu", "nanoseconds")
    assert msg.period == PERIOD
    assert msg.time_nanos == T0 and msg.duration_nanos == 10 * SEC

    fn_ids = [f.id for f in msg.function]
    loc_ids = [loc.id for loc in msg.location]
    assert 0 not in fn_ids and len(set(fn_ids)) == len(fn_ids)
    assert 0 not in loc_ids and len(set(loc_ids)) == len(loc_ids)
    functions = {f.id: (st[f.name], st[f.filename]) for f in msg.function}
    assert len(set(functions.values())) == len(functions), "functions unique by (name, file)"
    loc_keys = [(loc.line[0].function_id, loc.line[0].line) for loc in msg.location]
    assert len(set(loc_keys)) == len(loc_keys), "locations unique by (function, line)"
    assert all(len(loc.line) == 1 and loc.line[0].function_id in functions for loc in msg.location)

    locations = {loc.id: loc for loc in msg.location}
    assert len(msg.sample) == len(profile.samples)
    for smp, src in zip(msg.sample, profile.samples, strict=True):
        assert len(smp.value) == len(msg.sample_type), "one value per sample type"
        assert all(lid in locations for lid in smp.location_id)
        names = [functions[locations[lid].line[0].function_id][0] for lid in smp.location_id]
        assert names == [f.function for f in reversed(src.stack)], "location_id[0] is the leaf"
        lines = [locations[lid].line[0].line for lid in smp.location_id]
        assert lines == [f.line for f in reversed(src.stack)]
        labels = sorted((st[lab.key], st[lab.str]) for lab in smp.label)
        assert labels == list(src.labels)
        assert list(smp.value) == list(src.values)

    first = msg.sample[0]
    assert functions[locations[first.location_id[0]].line[0].function_id][0] == "calc3"


def test_encode_is_deterministic_and_plain_option():
    p = calc_profile()
    assert encode_pprof(p) == encode_pprof(p)
    plain = encode_pprof(p, compress=False)
    assert plain[:2] != b"\x1f\x8b"
    assert gzip.decompress(encode_pprof(p)) == plain


def test_encode_rejects_wrong_value_count():
    p = build([sample("main", 10)])
    p.samples.append(Sample((Frame("x"),), (1, 2)))
    with pytest.raises(ValueError, match="2 values for 3 sample types"):
        encode_pprof(p)


# ------------------------------------------------------------------------------------------------
# parse
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False])
def test_round_trip(compress):
    p = calc_profile()
    q = parse_pprof(encode_pprof(p, compress=compress))
    assert q.sample_types == p.sample_types
    assert q.default_sample_type == "cpu"
    assert (q.time_nanos, q.duration_nanos, q.period, q.period_type) == (T0, 10 * SEC, PERIOD, ("cpu", "nanoseconds"))
    assert _multiset(q) == _multiset(p)
    assert q.samples[0].stack[0] == Frame("main", "app.py", 5), "model stacks are root first"


def test_round_trip_keeps_comments_and_odd_names():
    p = build([sample("weird;name\u00e9@/srv/a b.py:7", 5 * PERIOD, labels={"k": "v with spaces"})])
    p.samples[0] = Sample(
        (Frame("<lambda>", "/srv/a b.py", 7), Frame("Klass.méthode", "", 0)), p.samples[0].values, p.samples[0].labels
    )
    p.comments = ["made by a test"]
    q = parse_pprof(encode_pprof(p))
    assert q.samples == p.samples
    assert q.comments == ["made by a test"]


def _raw_profile() -> pb.Profile:
    """A hand-built message (not via encode_pprof) with inlining, numeric labels, a mapping."""
    m = pb.Profile()
    m.string_table.extend(["", "cpu", "nanoseconds", "outer", "inlined", "f.py", "bytes", "size", "bin"])
    m.sample_type.add(type=1, unit=2)
    m.mapping.add(id=1, filename=8)
    m.function.add(id=7, name=3, filename=5)
    m.function.add(id=9, name=4, filename=5)
    loc = m.location.add(id=3, mapping_id=1)
    loc.line.add(function_id=9, line=11)  # inlined into...
    loc.line.add(function_id=7, line=22)  # ...this one (last = outermost)
    m.location.add(id=4, mapping_id=1, address=0xBEEF)  # no symbol
    s = m.sample.add(location_id=[4, 3], value=[42])
    s.label.add(key=7, num=64, num_unit=6)
    return m


def test_parse_inlined_frames_unsymbolized_and_numeric_labels():
    p = parse_pprof(_raw_profile().SerializeToString())
    assert p.default_sample_type == "cpu", "unset default_sample_type means the last sample type"
    (s,) = p.samples
    assert [f.function for f in s.stack] == ["outer", "inlined", "0xbeef"]
    assert s.stack[0] == Frame("outer", "f.py", 22) and s.stack[2].file == "bin"
    assert s.labels == (("size", "64 bytes"),)
    assert s.values == (42,)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.string_table.__setitem__(0, "x"), "string_table[0] must be the empty string"),
        (lambda m: m.function[0].__setattr__("id", 0), "function id 0 is zero or repeated"),
        (lambda m: m.location[1].__setattr__("id", 3), "location id 3 is zero or repeated"),
        (lambda m: m.sample[0].location_id.append(99), "missing location 99"),
        (lambda m: m.sample[0].value.append(1), "sample 0 has 2 values for 1 sample types"),
        (lambda m: m.function[0].__setattr__("name", 500), "refers to string 500"),
        (lambda m: m.location[0].line[0].__setattr__("function_id", 5), "missing function 5"),
        (lambda m: m.ClearField("sample_type"), "no sample_type"),
    ],
)
def test_parse_rejects_broken_structure(mutate, message):
    m = _raw_profile()
    mutate(m)
    with pytest.raises(ProfileError, match="not a valid pprof profile") as err:
        parse_pprof(m.SerializeToString(), source="x.pb")
    assert message in str(err.value)
    assert str(err.value).startswith("x.pb: ")


def test_parse_errors_are_clear():
    good = encode_pprof(calc_profile())
    bad_crc = good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:]
    cases = [
        (b"", r"^f: empty file \(0 bytes\)"),
        (b"\xff\xff\xff\xff not protobuf at all", r"^f: not a pprof profile"),
        (b"hello world, this is text\n", r"^f: not a pprof profile"),
        (b"\x68\x05", r"^f: not a valid pprof profile: string_table\[0\]"),  # valid protobuf, no pprof
        (good[: len(good) // 2], r"^f: corrupt gzip data"),  # truncated
        (bad_crc, r"^f: corrupt gzip data"),
        (gzip.compress(b""), r"^f: gzip stream holds no data"),
    ]
    for data, pattern in cases:
        with pytest.raises(ProfileError, match=pattern) as err:
            parse_pprof(data, "f")
        assert "\n" not in str(err.value)


def test_parse_empty_profile_is_not_an_error_but_is_empty():
    p = parse_pprof(encode_pprof(build([])))
    assert p.samples == [] and p.is_empty()


# ------------------------------------------------------------------------------------------------
# model: values, merge, filter
# ------------------------------------------------------------------------------------------------
def test_value_index_and_totals():
    p = calc_profile()
    assert p.value_index() == 1 and p.value_index("wall") == 2
    assert p.total("cpu") == 1000 * 1_000_000
    assert p.total("samples") == 100
    with pytest.raises(KeyError, match="available: samples, cpu, wall"):
        p.value_index("alloc")
    assert Profile(sample_types=[("a", "count"), ("b", "count")], default_sample_type="zzz").default_value_name() == "b"


def test_merge_aggregates_identical_stacks_and_unions_types():
    a = build([sample("main;f", 10 * PERIOD, labels={"t": "1"}), sample("main;g", 5 * PERIOD)], time_nanos=T0)
    b = build([sample("main;f", 20 * PERIOD, labels={"t": "1"}), sample("main;f", 1 * PERIOD, labels={"t": "2"})],
              time_nanos=T0 + 30 * SEC, duration_nanos=5 * SEC)
    c = Profile(sample_types=[("cpu", "nanoseconds"), ("alloc", "bytes")],
                samples=[Sample((frame("main"),), (7, 1024))], time_nanos=T0 - SEC, duration_nanos=SEC)
    m = a.merge(b, c)
    assert m.sample_types == [("samples", "count"), ("cpu", "nanoseconds"), ("wall", "nanoseconds"), ("alloc", "bytes")]
    by = {(tuple(f.function for f in s.stack), s.labels): s.values for s in m.samples}
    assert by[(("main", "f"), (("t", "1"),))] == (30, 30 * PERIOD, 30 * PERIOD, 0)
    assert by[(("main", "f"), (("t", "2"),))] == (1, PERIOD, PERIOD, 0)
    assert by[(("main",), ())] == (0, 7, 0, 1024)
    assert m.time_nanos == T0 - SEC and m.time_end_nanos == T0 + 35 * SEC
    assert m.total("cpu") == a.total("cpu") + b.total("cpu") + 7
    # the inputs are untouched
    assert len(a.samples) == 2 and a.sample_types[-1] == ("wall", "nanoseconds")


def test_merge_rejects_conflicting_units():
    a = Profile(sample_types=[("cpu", "nanoseconds")])
    b = Profile(sample_types=[("cpu", "count")])
    with pytest.raises(ValueError, match="different units"):
        a.merge(b)


def test_filter_by_labels_and_time():
    p = calc_profile()
    only_calc = p.filter(labels={"endpoint": "/calculate"})
    assert {s.label("endpoint") for s in only_calc.samples} == {"/calculate"}
    assert only_calc.total("cpu") == (500 + 100 + 150 + 40) * 1_000_000
    either = p.filter(labels=[("endpoint", "/calculate"), ("endpoint", "/other")])
    assert either.total("cpu") == 950 * 1_000_000, "same key twice: either value"
    both = p.filter(labels=[("endpoint", "/calculate"), ("thread_name", "worker-1")])
    assert both.total("cpu") == 140 * 1_000_000, "different keys: all must match"
    assert p.filter(labels={"endpoint": "/nope"}).samples == []
    assert p.label_values()["thread_name"] == ["MainThread", "worker-1"]

    assert p.filter(time_range=(T0 + 5 * SEC, None)).total("cpu") == p.total("cpu")
    assert p.filter(time_range=(T0 + 10 * SEC, None)).samples == [], "window ends at T0+10s (exclusive)"
    assert p.filter(time_range=(None, T0)).samples == [], "window starts at T0: [.., T0) misses it"
    assert p.filter(time_range=(None, T0 + 1)).samples != []
    assert not Profile(time_nanos=0).overlaps(T0, None), "no start time: cannot be placed in a range"


# ------------------------------------------------------------------------------------------------
# files and directories
# ------------------------------------------------------------------------------------------------
def _store(tmp_path: Path) -> Path:
    """A store-like directory: three 10 s windows, a nested directory, files to ignore."""
    store = tmp_path / "store"
    (store / "svc").mkdir(parents=True)
    for i in range(3):
        write_pprof_file(
            calc_profile(time_nanos=T0 + i * 10 * SEC), store / "svc" / f"svc-100-{T0 // SEC + i * 10}.pb.gz"
        )
    write_pprof_file(recursive_profile(), store / "other.pprof")
    (store / "README.txt").write_text("not a profile")
    (store / ".partial.pb.gz").write_bytes(b"\x1f\x8b half")
    return store


def test_load_directory_merges_and_selects_time(tmp_path):
    store = _store(tmp_path)
    files = find_profile_files(store)
    assert [f.name for f in files] == [
        "other.pprof",
        "svc-100-1763719200.pb.gz",
        "svc-100-1763719210.pb.gz",
        "svc-100-1763719220.pb.gz",
    ]
    everything = load_profiles(store)
    assert everything.total("cpu") == 3 * calc_profile().total("cpu") + recursive_profile().total("cpu")

    svc = store / "svc"
    second = load_profiles(svc, time_range=(T0 + 10 * SEC, T0 + 20 * SEC))
    assert second.total("cpu") == calc_profile().total("cpu")
    assert second.time_nanos == T0 + 10 * SEC
    two = load_profiles(svc, time_range=(T0 + 5 * SEC, T0 + 15 * SEC))
    assert two.total("cpu") == 2 * calc_profile().total("cpu")
    several = load_profiles(
        [svc / "svc-100-1763719200.pb.gz", svc / "svc-100-1763719210.pb.gz"], labels={"endpoint": "/other"}
    )
    assert several.total("cpu") == 2 * 160 * 1_000_000


def test_load_skips_unreadable_files_inside_directories_only(tmp_path, caplog):
    store = _store(tmp_path)
    (store / "svc" / "broken.pb.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    p = load_profiles(store / "svc")
    assert p.total("cpu") == 3 * calc_profile().total("cpu")
    assert "broken.pb.gz: corrupt gzip" in caplog.text
    with pytest.raises(ProfileError, match="broken.pb.gz: corrupt gzip"):
        load_profiles(store / "svc" / "broken.pb.gz")


def test_load_errors(tmp_path):
    with pytest.raises(ProfileError, match="nope.pb.gz: no such file or directory"):
        load_profiles(tmp_path / "nope.pb.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match="directory holds no pprof files"):
        load_profiles(tmp_path / "empty")
    write_pprof_file(build([]), tmp_path / "empty.pb.gz")
    with pytest.raises(ProfileError, match="empty.pb.gz: empty profile"):
        load_profiles(tmp_path / "empty.pb.gz")
    write_pprof_file(calc_profile(), tmp_path / "calc.pb.gz")
    with pytest.raises(ProfileError, match="no samples match --label endpoint=/missing"):
        load_profiles(tmp_path / "calc.pb.gz", labels={"endpoint": "/missing"})
    with pytest.raises(ProfileError, match="no profile in the time range"):
        load_profiles(tmp_path / "calc.pb.gz", time_range=(T0 + 3600 * SEC, None))
    assert load_profiles(tmp_path / "calc.pb.gz", time_range=(T0 + 3600 * SEC, None), allow_empty=True).samples == []


def test_read_and_write_file(tmp_path):
    path = tmp_path / "p.pprof"
    write_pprof_file(calc_profile(), path)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary file renamed away"
    assert _multiset(read_pprof_file(path)) == _multiset(calc_profile())
    with pytest.raises(ProfileError, match="is a directory"):
        read_pprof_file(tmp_path)


MEMORY_TYPES = [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"),
                ("inuse_space", "bytes")]


def _memory_window(t: int, pid: str, rows: dict[str, tuple[int, int, int, int]]) -> Profile:
    from support.profiles import stack

    return Profile(sample_types=list(MEMORY_TYPES),
                   samples=[Sample(stack(f"main;{fn}"), v, (("pid", pid),)) for fn, v in rows.items()],
                   time_nanos=t, duration_nanos=10, period_type=("space", "bytes"), period=512 * 1024,
                   default_sample_type="inuse_space")


def test_merging_memory_windows_sums_allocations_and_keeps_each_process_latest_in_use() -> None:
    # in-use is a snapshot: over windows 1..3 of a process, the merged value is window 3's (a
    # stack freed by then counts 0), while allocations add up; another process counts with its own
    # latest window
    w1 = _memory_window(100, "1", {"leak": (1, 100, 1, 100), "gone": (5, 50, 5, 50)})
    w2 = _memory_window(200, "1", {"leak": (1, 100, 2, 200), "gone": (0, 0, 5, 50)})
    w3 = _memory_window(300, "1", {"leak": (1, 100, 3, 300)})
    other = _memory_window(150, "2", {"cache": (2, 20, 2, 20)})
    cpu = Profile(samples=[Sample((Frame("main", "m.py", 1),), (1, 10, 10), (("pid", "1"),))], time_nanos=400)
    merged = Profile.merge_all([w3, cpu, w1, other, w2])
    got = {s.stack[-1].function: (s.values[merged.value_index("alloc_space")],
                                  s.values[merged.value_index("inuse_space")],
                                  s.values[merged.value_index("inuse_objects")]) for s in merged.samples}
    assert got["leak"] == (300, 300, 3) and got["gone"] == (50, 0, 0) and got["cache"] == (20, 20, 2)
    assert merged.default_sample_type == "cpu"  # CPU stays the default view of a mixed store
    assert Profile.merge_all([w1, w2]).total("inuse_space") == 250
