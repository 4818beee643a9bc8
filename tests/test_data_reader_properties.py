"""Property tests of the raw reader behind ``ctnocvr data prepare`` (hypothesis).

The contract (issue 10, section 1): junk lines inserted anywhere in valid raw files -- random bytes,
blank lines, partial lines, lines with keys of odd lengths, lines that look almost valid -- never
change which valid rows are written nor their content, every junk line is a counted reject at its
own line, and ``rows_in = rows_written + rows_rejected``. A UTF-8 byte order mark and CRLF line ends
change nothing. Chunks are a few hundred bytes (random size), so every example crosses many chunk
boundaries and mixes keys of different lengths in one chunk (what once lost whole chunks).

``CTNOCVR_HYPOTHESIS_EXAMPLES`` sets the number of examples of the main test (default 25: the file
runs in well under a minute); e.g. ``CTNOCVR_HYPOTHESIS_EXAMPLES=10000`` for a long run.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ctnocvr_rec.data import prepare as prep
from ctnocvr_rec.data.rawformat import COMMON, SKELETON, FieldSlots, FileKind, Reject, parse_line

EXAMPLES = int(os.environ.get("CTNOCVR_HYPOTHESIS_EXAMPLES", "25"))
# shrinking a failure takes minutes (each example is a whole prepare run): off unless asked for
# with CTNOCVR_HYPOTHESIS_SHRINK=1; the failing example is printed either way
SHRINK = os.environ.get("CTNOCVR_HYPOTHESIS_SHRINK", "") == "1"
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[p for p in Phase if SHRINK or p is not Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)

SCHEMA_YAML = """
fields:
  - {name: "101", group: user}
  - {name: "109_14", group: user, multi_valued: true, weighted: true}
  - {name: "205", group: item}
  - {name: "210", group: item, multi_valued: true}
  - {name: "508", group: combination, min_count: 2}
  - {name: "853", group: combination, weighted: true, mapping: hash, num_buckets: 7}
"""
USER_SLOTS = FieldSlots(("101", "109_14"), (False, True))
SKELETON_SLOTS = FieldSlots(("205", "210", "508", "853"), (False, False, False, True))
USER_FIELDS = ["101", "109_14", "999"]  # 999: outside the schema (counted, dropped)
ITEM_FIELDS = ["205", "210", "508", "853"]
BOM = b"\xef\xbb\xbf"

# key bytes: anything but the separators the format reserves (',', \x00-\x03, line ends)
KEY_BYTES = st.sampled_from(b"abcdefXYZ0123456789_-.:/\xc3\xa9\xff\x7f ")
keys = st.lists(KEY_BYTES, min_size=1, max_size=30).map(bytes)
values = st.sampled_from([b"1.0", b"0.5", b"2", b"3.25", b"1e-3", b"-0.75", b".5", b"7."])


def items(fields: list[str]) -> st.SearchStrategy[list[bytes]]:
    one = st.tuples(st.sampled_from(fields), st.integers(0, 10**17), values).map(
        lambda t: t[0].encode() + b"\x02" + str(t[1]).encode() + b"\x03" + t[2]
    )
    return st.lists(one, max_size=4)


def common_line(key: bytes, its: list[bytes]) -> bytes:
    return key + b"," + str(len(its)).encode() + b"," + b"\x01".join(its)


def skeleton_line(sid: int, click: int, buy: int, key: bytes, its: list[bytes]) -> bytes:
    head = f"{sid},{click},{buy},".encode()
    return head + key + b"," + str(len(its)).encode() + b"," + b"\x01".join(its)


@dataclass
class RawSet:
    common: list[bytes]
    skeleton: list[bytes]
    keys: set[bytes]


@st.composite
def valid_sets(draw: st.DrawFn) -> RawSet:
    """A small valid train split: distinct keys of mixed lengths, every skeleton row joinable."""
    key_list = draw(st.lists(keys, min_size=1, max_size=6, unique=True))
    common = [common_line(k, draw(items(USER_FIELDS))) for k in key_list]
    n_rows = draw(st.integers(1, 14))
    skeleton = []
    for sid in range(1, n_rows + 1):
        click, buy = draw(st.sampled_from([(0, 0), (1, 0), (1, 1)]))
        skeleton.append(skeleton_line(sid, click, buy, draw(st.sampled_from(key_list)), draw(items(ITEM_FIELDS))))
    return RawSet(common, skeleton, set(key_list))


def is_junk(line: bytes, kind: FileKind, known: set[bytes]) -> bool:
    """True when the reader must reject ``line`` without touching any valid row.

    Rejected by the line rules, or well formed with a key outside ``known``: in the skeleton that is
    an unknown common_feature_index (a reject); in a common file it is an extra, unreferenced request.
    """
    if b"\n" in line:
        return False
    parsed = parse_line(line, kind, USER_SLOTS if kind is COMMON else SKELETON_SLOTS)
    return isinstance(parsed, Reject) or parsed.key not in known


@st.composite
def junk_line(draw: st.DrawFn, kind: FileKind, base: RawSet) -> bytes:
    valid_lines = base.common if kind is COMMON else base.skeleton
    make = draw(st.sampled_from(["bytes", "blank", "odd_key", "partial", "mutated", "cr", "bom"]))
    if make == "bytes":
        line = draw(st.binary(max_size=60)).replace(b"\n", b"")
    elif make == "blank":
        line = draw(st.sampled_from([b"", b" ", b"\r", b",,", b",,,,,"]))
    elif make == "odd_key":  # well formed, with a key of any length that no valid line has
        key = draw(keys.filter(lambda k: k not in base.keys))
        if kind is COMMON:
            line = common_line(key, draw(items(USER_FIELDS)))
        else:
            line = skeleton_line(draw(st.integers(1, 10**6)), 1, 0, key, draw(items(ITEM_FIELDS)))
    elif make == "partial":
        line = draw(st.sampled_from(valid_lines))
        line = line[: draw(st.integers(0, max(len(line) - 1, 0)))]
    elif make == "mutated":  # one byte of a valid line replaced or removed
        line = bytearray(draw(st.sampled_from(valid_lines)))
        at = draw(st.integers(0, len(line) - 1))
        if draw(st.booleans()):
            line[at] = draw(st.sampled_from(b",\x01\x02\x03x9.-\r\xff"))
        else:
            del line[at]
        line = bytes(line).replace(b"\n", b"")
    elif make == "cr":  # a carriage return inside the line
        line = draw(st.sampled_from(valid_lines))
        at = draw(st.integers(0, len(line)))
        line = line[:at] + b"\r" + line[at:] + b"x"
    else:  # a byte order mark that is not at the start of the file is just bytes
        line = BOM + draw(st.sampled_from(valid_lines))
    if not is_junk(line, kind, base.keys):
        line = b"\x00junk"  # the generator made a valid line by chance: use plain junk instead
    return line


@st.composite
def with_junk(draw: st.DrawFn, kind: FileKind, base: RawSet, lines: list[bytes]) -> tuple[list[bytes], list[int]]:
    """``lines`` with junk lines inserted, prepended and appended; returns them and the 1-based line
    numbers of the junk."""
    n = draw(st.integers(0, 6))
    out = list(lines)
    for _ in range(n):
        out.insert(draw(st.integers(0, len(out))), b"\x00JUNK\x00")  # placeholder, replaced below
    junk_at = [i + 1 for i, line in enumerate(out) if line == b"\x00JUNK\x00"]
    for i in junk_at:
        line = draw(junk_line(kind, base))
        if i == 1 and line.startswith(BOM) and not is_junk(line[len(BOM) :], kind, base.keys):
            line = b"\x00junk"  # a BOM that opens the file is dropped: the rest must still be junk
        out[i - 1] = line
    return out, junk_at


def write_file(path: Path, lines: list[bytes], bom: bool, crlf: bool, final_newline: bool) -> None:
    end = b"\r\n" if crlf else b"\n"
    final_newline |= bool(lines) and lines[-1] == b""  # an empty last line exists only before a newline
    body = end.join(lines) + (end if final_newline and lines else b"")
    path.write_bytes((BOM if bom else b"") + body)


def run(raw: Path, out: Path, schema: Path, chunk_bytes: int, workers: int = 1) -> dict:
    return prep.prepare(
        prep.PrepareOptions(
            str(raw),
            str(out),
            schema=str(schema),
            valid_fraction=0.3,
            workers=workers,
            chunk_mb=chunk_bytes / (1 << 20),
            progress=False,
            allow_empty_split=True,
        )
    )


def rows_by_sample(out: Path) -> dict[int, dict]:
    rows = {}
    for split in ("train", "valid", "test"):
        for path in sorted((out / split).glob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                assert row["sample_id"] not in rows
                rows[row["sample_id"]] = dict(row, split=split)
    return rows


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def rejects_of(out: Path) -> list[dict[str, str]]:
    data = (out / "rejects" / "rejects.csv").read_bytes()
    assert b"\r" not in data  # LF line ends; a carriage return inside a raw line is shown as \\r
    with open(out / "rejects" / "rejects.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_same_rows(base: dict[int, dict], other: dict[int, dict]) -> None:
    """Same sample ids, same values in every column; request ids may be renumbered but must group
    the rows exactly as before (an extra common line shifts the numbering of later requests)."""
    assert sorted(base) == sorted(other)
    renumber: dict[int, int] = {}
    for sid, row in base.items():
        got = dict(other[sid])
        assert renumber.setdefault(row["request_id"], got["request_id"]) == got["request_id"]
        got["request_id"] = row["request_id"]
        assert got == row, sid
    assert len(set(renumber.values())) == len(renumber)


@given(
    data=st.data(),
    base=valid_sets(),
    chunk_bytes=st.integers(1, 400),
    bom=st.booleans(),
    crlf=st.booleans(),
    final_newline=st.booleans(),
)
@SETTINGS
def test_junk_lines_never_change_the_valid_rows(
    data: st.DataObject, base: RawSet, chunk_bytes: int, bom: bool, crlf: bool, final_newline: bool
) -> None:
    common, common_junk = data.draw(with_junk(COMMON, base, base.common), label="common")
    # well-formed junk of the common file adds (unused) requests: skeleton junk must not use their keys
    added = [parse_line(common[i - 1], COMMON, USER_SLOTS) for i in common_junk]
    known = base.keys | {p.key for p in added if not isinstance(p, Reject)}
    skeleton, skeleton_junk = data.draw(
        with_junk(SKELETON, RawSet(base.common, base.skeleton, known), base.skeleton), label="skeleton"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        schema = root / "schema.yaml"
        schema.write_text(SCHEMA_YAML)
        clean, dirty = root / "clean", root / "dirty"
        for folder, c, s, b, cr, fn in (
            (clean, base.common, base.skeleton, False, False, True),
            (dirty, common, skeleton, bom, crlf, final_newline),
        ):
            folder.mkdir()
            write_file(folder / "common_features_train.csv", c, b, cr, fn)
            write_file(folder / "sample_skeleton_train.csv", s, b, cr, fn)
        m_clean = run(clean, root / "out_clean", schema, 1 << 20)  # one chunk per file
        m_dirty = run(dirty, root / "out_dirty", schema, chunk_bytes)

        # the valid set alone: every row written, nothing rejected
        r = m_clean["rejects"]
        assert (r["rows_in"], r["rows_written"], r["rows_rejected"]) == (len(base.skeleton),) * 2 + (0,)
        # with junk: the same rows, every junk line a reject at its own line, the balance holds
        r = m_dirty["rejects"]
        assert r["rows_in"] == len(skeleton) == r["rows_written"] + r["rows_rejected"]
        assert r["rows_written"] == len(base.skeleton)
        assert_same_rows(rows_by_sample(root / "out_clean"), rows_by_sample(root / "out_dirty"))
        assert digests(root / "out_clean" / "vocab") == digests(root / "out_dirty" / "vocab")
        rejects = rejects_of(root / "out_dirty")
        skeleton_rejects = [int(x["line"]) for x in rejects if x["file"] == "sample_skeleton_train.csv"]
        assert sorted(skeleton_rejects) == skeleton_junk
        common_rejects = {int(x["line"]) for x in rejects if x["file"] == "common_features_train.csv"}
        assert common_rejects <= set(common_junk)  # junk that is well formed is an unused request
        assert all(x["reason"] and x["detail"] for x in rejects)


@given(base=valid_sets(), chunk_bytes=st.integers(1, 200), workers=st.sampled_from([1, 2]))
@settings(SETTINGS, max_examples=max(EXAMPLES // 5, 3))
def test_output_independent_of_chunking_bom_and_line_ends(base: RawSet, chunk_bytes: int, workers: int) -> None:
    """A byte order mark on every file and any chunk size or worker count give byte-identical
    shards and vocabulary (row byte offsets, which drive the shuffle, are counted after the BOM)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        schema = root / "schema.yaml"
        schema.write_text(SCHEMA_YAML)
        for name, bom in (("plain", False), ("bom", True)):
            (root / name).mkdir()
            write_file(root / name / "common_features_train.csv", base.common, bom, False, True)
            write_file(root / name / "sample_skeleton_train.csv", base.skeleton, bom, False, True)
        run(root / "plain", root / "a", schema, 1 << 20)
        run(root / "bom", root / "b", schema, chunk_bytes, workers=workers)
        for sub in ("train", "valid", "vocab"):
            if (root / "a" / sub).exists() or (root / "b" / sub).exists():
                assert digests(root / "a" / sub) == digests(root / "b" / sub), sub
