"""The official Ali-CCP raw format: fast vectorised chunk parsing plus an exact per-line path.

Files (one line per record, ``\\n`` terminated, no quoting):

* ``sample_skeleton_{train,test}.csv``: ``sample_id,click,buy,common_feature_index,feature_num,feature_list``
* ``common_features_{train,test}.csv``: ``common_feature_index,feature_num,feature_list``

``feature_list`` is ``field\\x02feature_id\\x03value`` items joined by ``\\x01``.

Two parsers implement the same rules:

* :func:`parse_chunk` works on a whole byte chunk with numpy. It never loops over lines in Python: it
  finds the separators with vectorised comparisons, validates the separator *sequence* of every
  line pairwise (a line with ``k`` items must read ``\\x02 \\x03 (\\x01 \\x02 \\x03)*``, tokens
  non-empty), reads integers with SWAR digit arithmetic on unaligned 64-bit words (8 digits per
  word), maps field names by their packed bytes through a collision-free modulo table, reads short
  plain decimals (``1.0``, ``0.69315``) by SWAR too and any other float with one Arrow cast over the
  compacted value bytes (those token kernels live in :mod:`ctnocvr_rec.data.swar`; this module finds
  the tokens and applies the rules). Lines that fail any check are *flagged*, not judged.
* :func:`parse_line` is the plain, exact per-line parser. It runs only on flagged lines, produces the
  precise reject reason (``FILE:LINE: reason (field ...)``), and accepts the line if the fast path was
  merely conservative (e.g. a 17-digit id), so both paths always agree on what is accepted.

Rules (both paths; the first failing rule is the reason):

1. ``wrong_column_count``: splitting on ``,`` must give the file's column count.
2. ``non_numeric``: ``sample_id``, ``click``, ``buy``, ``feature_num`` must be 1..18 ASCII digits.
3. ``bad_common_feature_index``: the key must be non-empty and free of ``\\x00-\\x03``.
4. ``malformed_feature_item``: an item needs exactly one ``\\x02`` and one ``\\x03`` after it, with a
   non-empty field name, id and value; no ``\\x00-\\x03`` outside ``feature_list``.
5. ``non_numeric``: feature ids are 1..18 ASCII digits; values are finite decimal floats
   (``[+-]?(d+.?d*|.d+)([eE][+-]?d+)?``).
6. ``feature_num_mismatch``: ``feature_num`` equals the number of items.
7. ``bad_label`` (click/buy not 0/1) and ``invalid_label_pair`` (``click=0, buy=1``, paper Table 1).

Unknown field names are not errors: their values are counted per name in ``ignored`` and dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ctnocvr_rec.data import swar
from ctnocvr_rec.data.csr import Csr
from ctnocvr_rec.data.formats.base import Reason
from ctnocvr_rec.data.swar import PAD

SKELETON_COLUMNS = ("sample_id", "click", "buy", "common_feature_index", "feature_num", "feature_list")
COMMON_COLUMNS = ("common_feature_index", "feature_num", "feature_list")
ITEM_SEP, FIELD_SEP, VALUE_SEP = 1, 2, 3  # \x01 between items, \x02 after the field, \x03 before the value

MAX_INT_DIGITS = 18  # fits int64 without overflow checks


@dataclass(frozen=True)
class FileKind:
    """Column layout of one raw file kind."""

    name: str
    columns: tuple[str, ...]
    int_columns: tuple[str, ...]  # parsed as integers, in this order in ParsedChunk.ints
    key_column: str = "common_feature_index"

    @property
    def n_columns(self) -> int:
        return len(self.columns)

    def col(self, name: str) -> int:
        return self.columns.index(name)


SKELETON = FileKind("skeleton", SKELETON_COLUMNS, ("sample_id", "click", "buy", "feature_num"))
COMMON = FileKind("common", COMMON_COLUMNS, ("feature_num",))


@dataclass(frozen=True)
class FieldSlots:
    """The feature-list fields extracted from one file kind, in output order.

    ``names[k]`` is the Ali-CCP field name of slot ``k``; ``weighted[k]`` says whether its values are
    kept as weights. Field names of at most 8 bytes are matched by their packed bytes.
    """

    names: tuple[str, ...]
    weighted: tuple[bool, ...]

    def __post_init__(self) -> None:
        for name in self.names:
            if not 1 <= len(name.encode()) <= 8:
                raise ValueError(f"field name {name!r}: must be 1..8 bytes to be matched in raw files")

    @property
    def codes(self) -> np.ndarray:
        return np.array([_pack_name(n.encode()) for n in self.names], dtype=np.uint64)

    def lookup(self, name_code: np.ndarray, short: np.ndarray) -> np.ndarray:
        """Slot of each packed field name (-1 when not a slot), via a collision-free modulo table."""
        codes = self.codes
        if len(codes) == 0:
            return np.full(len(name_code), -1, np.int64)
        modulus = _table_modulus(tuple(int(c) for c in codes))
        table = np.full(modulus, -1, np.int64)
        table[(codes % np.uint64(modulus)).astype(np.int64)] = np.arange(len(codes))
        slot = table[(name_code % np.uint64(modulus)).astype(np.int64)]
        hit = (slot >= 0) & short
        hit[hit] = codes[slot[hit]] == name_code[hit]
        return np.where(hit, slot, -1)


def _table_modulus(codes: tuple[int, ...]) -> int:
    """Smallest modulus >= 2 * len(codes) under which the codes do not collide."""
    modulus = max(2 * len(codes), 2)
    while len({c % modulus for c in codes}) < len(codes):
        modulus += 1
    return modulus


def _pack_name(name: bytes) -> int:
    """Little-endian packing of a <= 8 byte name (the fast path computes the same from the buffer)."""
    return int.from_bytes(name, "little")


@dataclass
class Reject:
    """One rejected line; ``line`` is 0-based within its chunk until the caller adds the chunk base."""

    line: int
    reason: str
    detail: str


@dataclass
class ParsedChunk:
    """Accepted lines of one chunk, column-wise (``n`` accepted lines, in file order).

    Attributes:
        n_lines: number of lines in the chunk (accepted + rejected).
        line: int64 ``[n]`` 0-based line index inside the chunk.
        ints: int64 ``[n, len(kind.int_columns)]``.
        key_h1, key_h2: uint64 ``[n]`` two independent 64-bit hashes of ``common_feature_index``
            (functions of the key's bytes only).
        key_start, key_len: int64 ``[n]`` byte offset (in the chunk) and length of each key, so that
            callers can compare the bytes of keys whose hashes are equal.
        slots: one :class:`Csr` per field slot (raw ids, weights where weighted).
        rejects: the rejected lines with reasons.
        ignored: values of field names outside the slots, per name.
        line_starts, line_ends: int64 ``[n_lines]`` byte offsets of every line in the chunk (ends
            exclude the newline), for raw-line retrieval.
        fast_lines: how many lines the vectorised path accepted (the rest went through parse_line).
    """

    n_lines: int
    line: np.ndarray
    ints: np.ndarray
    key_h1: np.ndarray
    key_h2: np.ndarray
    key_start: np.ndarray
    key_len: np.ndarray
    slots: list[Csr]
    rejects: list[Reject]
    ignored: dict[str, int]
    line_starts: np.ndarray
    line_ends: np.ndarray
    fast_lines: int = 0

    def raw_line(self, data: bytes, i: int) -> bytes:
        return data[int(self.line_starts[i]) : int(self.line_ends[i])]


# ----------------------------------------------------------------------------------------------
# Fast chunk parser
# ----------------------------------------------------------------------------------------------


# _BAD_PAIR[4 * a + b]: separator b may not follow separator a inside a line
_BAD_PAIR = np.ones(16, bool)
_BAD_PAIR[4 * FIELD_SEP + VALUE_SEP] = _BAD_PAIR[4 * VALUE_SEP + ITEM_SEP] = _BAD_PAIR[
    4 * ITEM_SEP + FIELD_SEP
] = False


def _line_bounds(padded: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive, without ``\\n`` / ``\\r\\n``) of every line, in padded coordinates."""
    body = padded[PAD : PAD + size]
    newlines = np.flatnonzero(body == 10) + PAD
    ends = newlines
    if size and body[-1] != 10:
        ends = np.append(newlines, PAD + size)
    starts = np.empty_like(ends)
    if len(ends):
        starts[0] = PAD
        starts[1:] = newlines[: len(ends) - 1] + 1
    ends = ends - ((padded[ends - 1] == 13) & (ends > starts))  # tolerate CRLF
    return starts.astype(np.int64), ends.astype(np.int64)


def _per_line_counts(
    positions: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For sorted ``positions``: index of the first one in each line and how many each line holds."""
    first = np.searchsorted(positions, starts)
    last = np.searchsorted(positions, ends)
    return first, last - first


def parse_chunk(data: bytes, kind: FileKind, slots: FieldSlots) -> ParsedChunk:
    """Parse a chunk of whole lines (see the module docstring); never raises on bad input."""
    size = len(data)
    if size == 0:
        return _empty_chunk(kind, slots)
    padded = np.zeros(size + 2 * PAD, np.uint8)
    padded[PAD : PAD + size] = np.frombuffer(data, np.uint8)
    words = swar.word_view(padded)
    starts, ends = _line_bounds(padded, size)
    n = len(starts)
    flagged = np.zeros(n, bool)
    n_commas = kind.n_columns - 1

    # --- columns: exactly n_commas commas per line
    commas = np.flatnonzero(padded == 44)
    comma_first, comma_count = _per_line_counts(commas, starts, ends)
    flagged |= comma_count != n_commas
    ok = ~flagged
    ok_lines = np.flatnonzero(ok)
    if len(ok_lines) == n:
        comma_matrix = commas.reshape(n, n_commas) if n_commas else np.zeros((n, 0), np.int64)
    else:
        take = (comma_first[ok_lines, None] + np.arange(n_commas)).ravel()
        comma_matrix = commas[take].reshape(len(ok_lines), n_commas)
    col_start = np.empty((n, kind.n_columns), np.int64)
    col_end = np.empty((n, kind.n_columns), np.int64)
    col_start[:, 0], col_end[:, -1] = starts, ends
    col_start[ok_lines, 1:] = comma_matrix + 1
    col_end[ok_lines, :-1] = comma_matrix
    bad_cols = ~ok
    col_start[bad_cols, 1:] = starts[bad_cols, None]  # harmless values for flagged lines
    col_end[bad_cols, :-1] = starts[bad_cols, None]
    region_start, region_end = col_start[:, -1], col_end[:, -1]

    # --- separators \x00..\x03: the sequence of each line must be \x02 \x03 (\x01 \x02 \x03)*.
    # Checked pairwise on the whole chunk (no per-separator line arrays): \x02 -> \x03, \x01 -> \x02,
    # \x03 -> \x01 inside a line; a line's first separator is \x02 and its last \x03.
    seps = np.flatnonzero(padded[PAD : PAD + size] < 4) + PAD
    if len(padded) < 2**31:
        seps = seps.astype(np.int32)  # halves the memory traffic of every per-item array below
    sep_first, sep_count = _per_line_counts(seps, starts, ends)
    sep_type = padded[seps]
    has_items = region_end > region_start
    flagged |= np.where(has_items, sep_count % 3 != 2, sep_count != 0)
    with_seps = np.flatnonzero(sep_count > 0)
    first_sep = sep_first[with_seps]
    last_sep = first_sep + sep_count[with_seps] - 1
    flagged[with_seps] |= (
        (seps[first_sep] < region_start[with_seps])
        | (sep_type[first_sep] != FIELD_SEP)
        | (sep_type[last_sep] != VALUE_SEP)
    )
    if len(seps) > 1:
        bad_pair = _BAD_PAIR[sep_type[:-1] * np.uint8(4) + sep_type[1:]]
        # a pair across two lines is not a sequence inside one (first/last checks cover those)
        bad_pair[last_sep[last_sep < len(seps) - 1]] = False
        bad_at = np.flatnonzero(bad_pair)
        if len(bad_at):
            flagged[np.searchsorted(ends, seps[bad_at])] = True
    if len(seps) and sep_type[-1] == 0:
        flagged[np.searchsorted(ends, seps[-1])] = True

    # --- leading integer columns and the key
    int_cols = [kind.col(c) for c in kind.int_columns]
    ints = np.zeros((n, len(int_cols)), np.int64)
    for j, c in enumerate(int_cols):
        value, good = swar.parse_uint_tokens(words, col_end[:, c], col_end[:, c] - col_start[:, c])
        ints[:, j] = value
        flagged |= ~good
    key_col = kind.col(kind.key_column)
    key_len = col_end[:, key_col] - col_start[:, key_col]
    flagged |= key_len < 1
    if kind is SKELETON:
        click, buy = ints[:, 1], ints[:, 2]
        flagged |= (click > 1) | (buy > 1) | ((click == 0) & (buy == 1))

    # --- items of the lines still unflagged
    if flagged.any():  # rare: drop the separators of flagged lines so the rest stays aligned
        keep_sep = ~np.repeat(flagged, sep_count)
        seps, sep_type = seps[keep_sep], sep_type[keep_sep]
    items_per_line = np.where(flagged, 0, (sep_count + 1) // 3)
    item_bounds = np.zeros(n + 1, np.int64)  # items of line i: [item_bounds[i], item_bounds[i + 1])
    np.cumsum(items_per_line, out=item_bounds[1:])
    x02_idx = np.flatnonzero(sep_type == FIELD_SEP)
    x02 = seps[x02_idx]
    x03 = seps[x02_idx + 1]
    lines_with_items = np.flatnonzero(items_per_line > 0)
    # a name starts after the previous \x01, or at feature_list for a line's first item
    name_start = seps[np.maximum(x02_idx - 1, 0)] + 1
    name_start[item_bounds[lines_with_items]] = region_start[lines_with_items]
    # a value ends at the next \x01, or at the line end for a line's last item
    value_end = seps[np.minimum(x02_idx + 2, max(len(seps) - 1, 0))]
    value_end[item_bounds[lines_with_items + 1] - 1] = region_end[lines_with_items]
    name_len = x02 - name_start
    id_len = x03 - x02 - 1
    value_len = value_end - x03 - 1
    item_bad = (name_len < 1) | (id_len < 1) | (value_len < 1)

    # field ids (SWAR); 17+ digit ids are flagged for the exact path
    ids, ids_ok = swar.parse_uint_tokens(words, x03, id_len)
    item_bad |= ~ids_ok

    # values: short plain decimals ("1.0", "0.69315", "2") by SWAR, anything else by an Arrow cast
    values = np.ones(len(x02), np.float32)
    is_one = swar.is_one_point_zero(words, value_end, value_len)
    rest = np.flatnonzero(~is_one)
    values[rest], simple = swar.parse_short_decimals(words, value_end[rest], value_len[rest])
    other = rest[~simple & ~item_bad[rest]]
    if len(other):
        values[other], other_ok = swar.parse_float_tokens(padded, x03[other] + 1, value_len[other])
        item_bad[other[~other_ok]] = True

    # feature names: packed bytes of names up to 8 bytes
    short = name_len <= 8
    shift = np.uint64(8) * (np.uint64(8) - np.minimum(name_len, 8).astype(np.uint64))
    name_code = swar.words_ending_at(words, x02) >> shift
    bad_items = np.flatnonzero(item_bad)
    if len(bad_items):
        flagged[np.searchsorted(item_bounds, bad_items, side="right") - 1] = True

    # feature_num must equal the item count
    feature_num = ints[:, kind.int_columns.index("feature_num")]
    flagged |= ~flagged & (feature_num != items_per_line)

    # --- keep the items of accepted lines and split them into slots
    accepted = np.flatnonzero(~flagged)
    if len(accepted) < n:
        item_keep = np.repeat(~flagged, items_per_line)
        ids, values, name_code, short = (
            ids[item_keep],
            values[item_keep],
            name_code[item_keep],
            short[item_keep],
        )
        name_start, name_len = name_start[item_keep], name_len[item_keep]
        items_per_line = np.where(flagged, 0, items_per_line)
        item_bounds = np.zeros(n + 1, np.int64)
        np.cumsum(items_per_line, out=item_bounds[1:])
    row_bounds = item_bounds[np.append(accepted, n)]  # item range of each accepted line

    slot_of_item = slots.lookup(name_code, short)
    ignored: dict[str, int] = {}
    unmatched = np.flatnonzero(slot_of_item < 0)
    if len(unmatched):
        body = padded.tobytes()
        uniq_codes, first_at, counts = np.unique(
            name_code[unmatched] * short[unmatched], return_index=True, return_counts=True
        )
        long_names = unmatched[~short[unmatched]]
        for code, at, count in zip(uniq_codes, first_at, counts):
            if code == 0:
                continue  # long names, counted one by one below
            i = unmatched[at]
            name = body[name_start[i] : name_start[i] + name_len[i]].decode("utf-8", "replace")
            ignored[name] = ignored.get(name, 0) + int(count)
        for i in long_names:
            name = body[name_start[i] : name_start[i] + name_len[i]].decode("utf-8", "replace")
            ignored[name] = ignored.get(name, 0) + 1

    csrs: list[Csr] = []
    by_slot = np.argsort(slot_of_item.astype(np.int8), kind="stable")  # radix sort; keeps line order
    slot_bounds = np.searchsorted(slot_of_item[by_slot], np.arange(-1, len(slots.names) + 1))
    for k, weighted in enumerate(slots.weighted):
        sel = by_slot[slot_bounds[k + 1] : slot_bounds[k + 2]]
        # items are in line order, so each row's share of sel is a contiguous run
        offsets = np.searchsorted(sel, row_bounds).astype(np.int64)
        csrs.append(Csr(offsets, ids[sel], values[sel] if weighted else None))

    key_start = col_start[accepted, key_col]
    h1, h2 = swar.hash_tokens(words, key_start, key_len[accepted])
    chunk = ParsedChunk(
        n_lines=n,
        line=accepted.astype(np.int64),
        ints=ints[accepted],
        key_h1=h1,
        key_h2=h2,
        key_start=key_start - PAD,
        key_len=key_len[accepted],
        slots=csrs,
        rejects=[],
        ignored=ignored,
        line_starts=starts - PAD,
        line_ends=ends - PAD,
        fast_lines=len(accepted),
    )
    flagged_lines = np.flatnonzero(flagged)
    if len(flagged_lines):
        _resolve_flagged(chunk, data, flagged_lines, kind, slots)
    return chunk


def _empty_chunk(kind: FileKind, slots: FieldSlots) -> ParsedChunk:
    none = np.zeros(0, np.int64)
    return ParsedChunk(
        0,
        none,
        np.zeros((0, len(kind.int_columns)), np.int64),
        none.astype(np.uint64),
        none.astype(np.uint64),
        none,
        none,
        [Csr.empty(0, w) for w in slots.weighted],
        [],
        {},
        none,
        none,
    )


def _resolve_flagged(
    chunk: ParsedChunk, data: bytes, lines: np.ndarray, kind: FileKind, slots: FieldSlots
) -> None:
    """Run the exact parser on flagged lines: reject them with a reason or merge them in."""
    rescued: list[tuple[int, ParsedLine]] = []
    for i in lines.tolist():
        result = parse_line(chunk.raw_line(data, i), kind, slots)
        if isinstance(result, Reject):
            result.line = i
            chunk.rejects.append(result)
        else:
            rescued.append((i, result))
            for name, count in result.ignored.items():
                chunk.ignored[name] = chunk.ignored.get(name, 0) + count
    if rescued:
        _merge_rescued(chunk, rescued, slots)


def _merge_rescued(chunk: ParsedChunk, rescued: list[tuple[int, ParsedLine]], slots: FieldSlots) -> None:
    extra_line = np.array([i for i, _ in rescued], np.int64)
    extra_ints = np.array([r.ints for _, r in rescued], np.int64).reshape(len(rescued), -1)
    extra_h = np.array([r.key_hash for _, r in rescued], np.uint64).reshape(len(rescued), 2)
    order = np.argsort(np.concatenate([chunk.line, extra_line]), kind="stable")
    chunk.line = np.concatenate([chunk.line, extra_line])[order]
    chunk.ints = np.concatenate([chunk.ints, extra_ints])[order]
    chunk.key_h1 = np.concatenate([chunk.key_h1, extra_h[:, 0]])[order]
    chunk.key_h2 = np.concatenate([chunk.key_h2, extra_h[:, 1]])[order]
    extra_key_start = np.array([chunk.line_starts[i] + r.key_offset for i, r in rescued], np.int64)
    chunk.key_start = np.concatenate([chunk.key_start, extra_key_start])[order]
    chunk.key_len = np.concatenate([chunk.key_len, [len(r.key) for _, r in rescued]]).astype(np.int64)[order]
    for k, weighted in enumerate(slots.weighted):
        extra = Csr(
            np.concatenate([[0], np.cumsum([len(r.ids[k]) for _, r in rescued])]).astype(np.int64),
            np.array([v for _, r in rescued for v in r.ids[k]], np.int64),
            np.array([v for _, r in rescued for v in r.weights[k]], np.float32) if weighted else None,
        )
        chunk.slots[k] = Csr.concat([chunk.slots[k], extra], weighted).take(order)


# ----------------------------------------------------------------------------------------------
# Exact per-line parser (the reference for reasons)
# ----------------------------------------------------------------------------------------------

_FLOAT_RE = re.compile(rb"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_CONTROL_RE = re.compile(rb"[\x00-\x03]")


@dataclass
class ParsedLine:
    ints: list[int]
    key: bytes
    key_hash: tuple[int, int]
    key_offset: int  # byte offset of the key inside the line
    ids: list[list[int]]  # per slot
    weights: list[list[float]]  # per slot (1.0 for unweighted slots)
    ignored: dict[str, int] = field(default_factory=dict)


def _shown(token: bytes, limit: int = 40) -> str:
    text = repr(token[:limit])[2:-1]
    return text + ("..." if len(token) > limit else "")


def _is_uint(token: bytes) -> bool:
    return 1 <= len(token) <= MAX_INT_DIGITS and token.isdigit() and token.isascii()


def parse_line(line: bytes, kind: FileKind, slots: FieldSlots) -> ParsedLine | Reject:
    """Parse one line (without its newline) exactly; returns the row or the first rule it breaks."""
    if line.endswith(b"\r"):
        line = line[:-1]
    columns = line.split(b",")
    if len(columns) != kind.n_columns:
        return Reject(
            0, Reason.WRONG_COLUMN_COUNT, f"expected {kind.n_columns} columns, found {len(columns)}"
        )
    by_name = dict(zip(kind.columns, columns))
    ints: list[int] = []
    for name in kind.int_columns:
        token = by_name[name]
        if not _is_uint(token):
            return Reject(
                0,
                Reason.NON_NUMERIC,
                f"field {name}: {_shown(token)!r} is not a 1..{MAX_INT_DIGITS} digit integer",
            )
        ints.append(int(token))
    key = by_name[kind.key_column]
    if not key or _CONTROL_RE.search(key):
        return Reject(
            0, Reason.BAD_KEY, f"field {kind.key_column}: {_shown(key)!r} is empty or holds control bytes"
        )
    feature_list = by_name["feature_list"]
    items = feature_list.split(b"\x01") if feature_list else []
    lookup = {n.encode(): k for k, n in enumerate(slots.names)}
    ids: list[list[int]] = [[] for _ in slots.names]
    weights: list[list[float]] = [[] for _ in slots.names]
    ignored: dict[str, int] = {}
    for position, item in enumerate(items, start=1):
        head, sep, value = item.partition(b"\x03")
        fname, sep2, fid = head.partition(b"\x02")
        if (
            not sep
            or not sep2
            or not fname
            or not fid
            or not value
            or _CONTROL_RE.search(fname)
            or _CONTROL_RE.search(fid)
            or _CONTROL_RE.search(value)
        ):
            return Reject(0, Reason.MALFORMED_ITEM, f"field feature_list item {position}: {_shown(item)!r}")
        field_name = fname.decode("utf-8", "replace")
        if not _is_uint(fid):
            return Reject(0, Reason.NON_NUMERIC, f"field {_shown(fname)} item {position}: id {_shown(fid)!r}")
        if not _FLOAT_RE.fullmatch(value) or not math.isfinite(float(value)):
            return Reject(
                0, Reason.NON_NUMERIC, f"field {_shown(fname)} item {position}: value {_shown(value)!r}"
            )
        slot = lookup.get(fname)
        if slot is None:
            ignored[field_name] = ignored.get(field_name, 0) + 1
            continue
        ids[slot].append(int(fid))
        weights[slot].append(float(np.float32(float(value))))
    feature_num = ints[kind.int_columns.index("feature_num")]
    if feature_num != len(items):
        return Reject(
            0,
            Reason.FEATURE_NUM_MISMATCH,
            f"field feature_num: says {feature_num}, feature_list has {len(items)} items",
        )
    if kind is SKELETON:
        click, buy = ints[1], ints[2]
        if click > 1 or buy > 1:
            return Reject(0, Reason.BAD_LABEL, f"field click/buy: ({click}, {buy}) must be 0 or 1")
        if click == 0 and buy == 1:
            return Reject(
                0, Reason.INVALID_LABEL_PAIR, "field click/buy: click=0, buy=1 (conversion without click)"
            )
    key_offset = sum(len(c) + 1 for c in columns[: kind.col(kind.key_column)])
    return ParsedLine(ints, key, swar.hash_key(key), key_offset, ids, weights, ignored)
