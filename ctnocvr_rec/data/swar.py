"""Vectorised kernels on byte tokens, eight bytes at a time (SWAR: SIMD within a register).

The raw Ali-CCP parser (:mod:`ctnocvr_rec.data.rawformat`) locates millions of small tokens per
chunk -- integer ids, short decimals, field names, request keys -- as ``(start, length)`` or
``(end, length)`` byte ranges of one buffer. A Python loop over them would dominate the parse; these
kernels instead handle every token of a chunk with a handful of numpy operations on little-endian
``uint64`` words:

* :func:`word_view` reinterprets a ``uint8`` buffer as overlapping unaligned words with a stride of
  one byte (no copy): ``words[p]`` holds bytes ``p .. p + 7``, byte ``p`` in the lowest position.
  A token of at most 8 bytes ending at ``e`` is therefore the top bytes of ``words[e - 8]``; masking
  off the bytes below it (``_KEEP_TOP``) isolates it, whatever precedes it in the buffer.
* Digits are checked and converted in-register: one word tests "all eight bytes are ``0``-``9``"
  with carry tricks, and three multiply-shift-mask steps turn eight ASCII digits into their value
  (:func:`parse_uint_tokens` reads up to two words, 16 digits; :func:`parse_short_decimals` first
  removes a single ``.`` by shifting the bytes below it).
* Keys are hashed and compared block by block (:func:`hash_tokens`, :func:`tokens_equal`), each token
  touching only its own ``ceil(length / 8)`` words with the bytes past its end masked out, so a
  token's hash depends on its bytes alone.
* Tokens the word kernels do not cover (signs, exponents, long decimals) go through one Arrow cast
  of their compacted bytes (:func:`parse_float_tokens`).

Padding contract: every word read may reach up to 8 bytes before a token's start or past its end, so
callers hand in buffers with :data:`PAD` zero bytes on each side (:func:`padded_words` builds one) and
token positions in padded coordinates. Kernels never read outside the padded buffer; what they read
of a neighbouring token is masked away, and the zero padding makes a short read at either edge
well-defined.

Kernels return ``(values, ok)`` pairs or boolean masks of the token count ``n`` and never raise on bad
bytes: ``ok`` is False where a token is not what the kernel reads, and the caller decides what that
means (the raw parser flags the line for its exact per-line path).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAD = 16  # zero bytes before and after a buffer so 8-byte windows never leave it
_FAST_INT_DIGITS = 16  # two words; longer integers are reported not ok (the raw parser's exact path reads them)

_ONES = np.uint64(0x0101010101010101)
_HIGH = np.uint64(0x8080808080808080)
_ZEROS_ASCII = np.uint64(0x3030303030303030)
# _KEEP_TOP[L]: keeps the top L bytes of a word (the L bytes that end where the word ends)
_KEEP_TOP = np.array([0] + [((1 << (8 * L)) - 1) << (8 * (8 - L)) for L in range(1, 9)], dtype=np.uint64)
# _FILL_ZERO_DIGITS[L]: ASCII '0' in the bottom 8-L bytes (leading zeros of an 8-digit field)
_FILL_ZERO_DIGITS = np.array(
    [int.from_bytes(b"0" * (8 - L) + b"\0" * L, "little") for L in range(9)], dtype=np.uint64
)
# _KEEP_LOW[L]: keeps the bottom L bytes
_KEEP_LOW = np.array([(1 << (8 * L)) - 1 for L in range(8)] + [(1 << 64) - 1], dtype=np.uint64)
_ONE_DOT_ZERO = np.uint64(int.from_bytes(b"\0\0\0\0\0" + b"1.0", "little"))


def word_view(padded: np.ndarray) -> np.ndarray:
    """``view[p]`` is the little-endian uint64 of ``padded[p:p+8]`` (unaligned, no copy)."""
    return np.ndarray(shape=(len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))


def words_ending_at(words: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The word whose top byte is byte ``end - 1``: a token ending at ``end`` sits in its top bytes."""
    return words[end - 8]


def is_one_point_zero(words: np.ndarray, end: np.ndarray, length: np.ndarray) -> np.ndarray:
    """bool ``[n]``: the token ``[end - length, end)`` is exactly ``1.0`` (every unweighted value),
    found by one masked word compare instead of a decimal parse."""
    return (length == 3) & ((words_ending_at(words, end) & _KEEP_TOP[3]) == _ONE_DOT_ZERO)


def _all_digits(w: np.ndarray) -> np.ndarray:
    """True where all 8 bytes of ``w`` are ASCII digits (SWAR has-less / has-more tests)."""
    below = (w - _ZEROS_ASCII) & ~w & _HIGH  # some byte < '0'
    above = ((w + _ONES * np.uint64(127 - 57)) | w) & _HIGH  # some byte > '9'
    return (below | above) == 0


def _eight_digits(w: np.ndarray) -> np.ndarray:
    """Value of 8 ASCII digits per word (first digit in the lowest byte)."""
    v = w - _ZEROS_ASCII
    v = (v * np.uint64(10) + (v >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v * np.uint64(100) + (v >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    v = (v * np.uint64(10000) + (v >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    return v


def parse_uint_tokens(
    words: np.ndarray, end: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative integers of the tokens ``[end - length, end)`` (1..16 digits), vectorised.

    Returns ``(values int64 [n], ok bool [n])``; ``ok`` is False for empty, too long or non-digit tokens.
    """
    n = len(end)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    ok = (length >= 1) & (length <= _FAST_INT_DIGITS)
    low_len = np.minimum(length, 8)
    low = words_ending_at(words, end)
    low = (low & _KEEP_TOP[low_len]) | _FILL_ZERO_DIGITS[low_len]
    ok &= _all_digits(low)
    value = _eight_digits(low)
    if int(length.max()) > 8:
        high_len = np.clip(length - 8, 0, 8)
        high = words_ending_at(words, end - 8)
        high = (high & _KEEP_TOP[high_len]) | _FILL_ZERO_DIGITS[high_len]
        ok &= _all_digits(high)
        value = value + _eight_digits(high) * np.uint64(100_000_000)
    return value.astype(np.int64), ok


_DOTS = np.uint64(0x2E2E2E2E2E2E2E2E)
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_POW10 = 10.0 ** np.arange(9)


def parse_short_decimals(
    words: np.ndarray, end: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """float32 values of tokens ``[end - length, end)`` of 1..8 bytes: digits with at most one '.'.

    Returns ``(values float32 [n], ok bool [n])``; ``ok`` is False for any other token (signs,
    exponents, longer tokens), which the caller parses another way. The value is the digits as an
    integer divided by a power of ten: the correctly rounded double, as Python's ``float`` gives.
    """
    length_c = np.clip(length, 0, 8)
    w = words[end - 8] & _KEEP_TOP[length_c]  # the token in the top bytes, zeros below
    x = w ^ _DOTS
    dot = ~((((x & _LOW7) + _LOW7) | x) | _LOW7)  # 0x80 exactly in the bytes that are '.'
    has_dot = dot != 0
    single = (dot & (dot - np.uint64(1))) == 0
    dot_byte = np.where(has_dot, (np.frexp(dot.astype(np.float64))[1] - 1) // 8, 0)
    # drop the '.': the bytes below it move up one byte
    joined = (w & ~_KEEP_LOW[dot_byte + 1]) | ((w & _KEEP_LOW[dot_byte]) << np.uint64(8))
    digits_word = np.where(has_dot, joined, w)
    n_digits = np.clip(length_c - has_dot, 0, 8)
    digits_word = (digits_word & _KEEP_TOP[n_digits]) | _FILL_ZERO_DIGITS[n_digits]
    ok = (length >= 1) & (length <= 8) & single & (n_digits >= 1) & _all_digits(digits_word)
    frac_digits = np.where(has_dot, 7 - dot_byte, 0)
    values = (_eight_digits(digits_word).astype(np.float64) / _POW10[frac_digits]).astype(np.float32)
    return values, ok


_FNV_OFFSET = (np.uint64(0xCBF29CE484222325), np.uint64(0x84222325CBF29CE4))
_MIX_MUL = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def hash_tokens(words: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of the byte tokens ``[start, start + length)``.

    Processes 8-byte blocks. A token's hash is a function of its own bytes only: each token is mixed
    with exactly its ``ceil(length / 8)`` blocks (bytes past its end masked out), then with its length,
    whatever the other tokens of the batch are (a shorter token is *not* run through the blocks of a
    longer neighbour). Two hashes let the caller tell a true duplicate (both equal) from a collision;
    callers still compare the bytes of keys whose hashes are equal (:func:`tokens_equal`).
    """
    h1 = np.full(len(start), _FNV_OFFSET[0], np.uint64)
    h2 = np.full(len(start), _FNV_OFFSET[1], np.uint64)
    max_len = int(length.max()) if len(length) else 0
    min_len = int(length.min()) if len(length) else 0
    for block in range(0, max_len, 8):
        if block + 8 <= min_len:  # every token covers this whole block: no mask, no selection
            w = words[start + block]
            h1 = _fmix64((h1 ^ w) * _MIX_MUL[0])
            h2 = _fmix64((h2 + w) * _MIX_MUL[1])
            continue
        live = np.flatnonzero(length > block)  # only the tokens that reach into this block
        w = words[start[live] + block] & _KEEP_LOW[np.minimum(length[live] - block, 8)]
        h1[live] = _fmix64((h1[live] ^ w) * _MIX_MUL[0])
        h2[live] = _fmix64((h2[live] + w) * _MIX_MUL[1])
    lengths = length.astype(np.uint64)
    return _fmix64(h1 ^ lengths), _fmix64(h2 ^ (lengths * _MIX_MUL[0]))


def tokens_equal(
    a_words: np.ndarray,
    a_start: np.ndarray,
    a_length: np.ndarray,
    b_words: np.ndarray,
    b_start: np.ndarray,
    b_length: np.ndarray,
) -> np.ndarray:
    """bool ``[n]``: token ``i`` of buffer a has the same bytes as token ``i`` of buffer b.

    ``*_words`` are :func:`word_view` s of zero-padded buffers (8 bytes readable past every token).
    Compares 8-byte blocks, vectorised; used to confirm that equal hashes mean equal keys.
    """
    equal = a_length == b_length
    max_len = int(a_length.max()) if len(a_length) else 0
    min_len = int(a_length.min()) if len(a_length) else 0
    for block in range(0, max_len, 8):
        if block + 8 <= min_len:  # every a token covers this whole block
            # a b token may be shorter (its pair is already unequal): keep its read inside the buffer
            b_at = np.minimum(b_start + block, len(b_words) - 1)
            equal &= a_words[a_start + block] == b_words[b_at]
            continue
        live = np.flatnonzero(equal & (a_length > block))
        mask = _KEEP_LOW[np.minimum(a_length[live] - block, 8)]
        equal[live] = (a_words[a_start[live] + block] & mask) == (b_words[b_start[live] + block] & mask)
    return equal


def padded_words(buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(padded uint8, word view)`` of a uint8 buffer with :data:`PAD` zero bytes on each side.

    A token at ``[s, s + L)`` of ``buffer`` is at ``[PAD + s, PAD + s + L)`` of the padded copy.
    """
    padded = np.zeros(len(buffer) + 2 * PAD, np.uint8)
    padded[PAD : PAD + len(buffer)] = buffer
    return padded, word_view(padded)


def hash_key(key: bytes) -> tuple[int, int]:
    """The :func:`hash_tokens` pair of one key (for the per-line path and for tests)."""
    padded = np.zeros(len(key) + 2 * PAD, np.uint8)
    padded[PAD : PAD + len(key)] = np.frombuffer(key, np.uint8)
    h1, h2 = hash_tokens(word_view(padded), np.array([PAD]), np.array([len(key)]))
    return int(h1[0]), int(h2[0])


def parse_float_tokens(
    padded: np.ndarray, start: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """float32 values of the byte tokens ``[start, start + length)`` via Arrow casts of their bytes.

    Returns ``(values float32 [n], ok bool [n])``. The tokens are compacted into one Arrow string
    array and cast at once; if that cast fails, halves are cast recursively so that only the bad
    tokens (not the whole chunk) are marked.
    """
    n = len(start)
    values = np.ones(n, np.float32)
    ok = np.ones(n, bool)
    if n == 0:
        return values, ok
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(length, out=offsets[1:])
    index = np.arange(int(offsets[-1]), dtype=np.int64) + np.repeat(start - offsets[:-1], length)
    data = padded[index]
    arrow = pa.Array.from_buffers(
        pa.string(), n, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    )

    def cast(lo: int, hi: int) -> None:
        try:
            values[lo:hi] = pc.cast(arrow.slice(lo, hi - lo), pa.float32()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, ValueError):
            if hi - lo == 1:
                ok[lo] = False
                return
            mid = (lo + hi) // 2
            cast(lo, mid)
            cast(mid, hi)

    cast(0, n)
    ok &= np.isfinite(values)
    return values, ok
