"""`ctnocvr data prepare` never loses good rows (issue 10, section 1) -- the exact repros.

* A UTF-8 byte order mark in front of a common-features file once made every row of the split an
  "unknown_common_feature_index" reject (exit 0); one key of another length did the same to its chunk.
* Key identity is by bytes: a hash collision between two different keys stops the run, never merges.
* An empty split is an error unless asked for; a killed run's temporary folder is cleaned up by the next.
* rejects.csv has LF line ends; a duplicate-key reject keeps its raw line.
"""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctnocvr_rec.cli import main as cli_main
from ctnocvr_rec.data import prepare as prep
from ctnocvr_rec.data import rawfiles, rawformat, swar, synth

SCHEMA = "aliccp"  # the packaged ctnocvr_rec/configs/fields/aliccp.yaml
BOM = b"\xef\xbb\xbf"
CHUNK_MB = 32 / 1024  # 32 KiB: the files below span several chunks


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's repro set (seed 1), scaled down to 5000 + 1000 rows: still several chunks per file."""
    folder = tmp_path_factory.mktemp("raw")
    synth.generate(synth.SynthConfig(rows_train=5000, rows_test=1000, seed=1), folder)
    assert (folder / "common_features_train.csv").stat().st_size > 3 * CHUNK_MB * (1 << 20)
    return folder


def copy_raw(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("common_features_train.csv", "sample_skeleton_train.csv", "common_features_test.csv",
                 "sample_skeleton_test.csv"):  # fmt: skip
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def run(raw: Path, out: Path, **kw) -> dict:
    kw.setdefault("workers", 2)
    kw.setdefault("chunk_mb", CHUNK_MB)
    kw.setdefault("rows_per_shard", 2000)
    return prep.prepare(prep.PrepareOptions(str(raw), str(out), schema=str(SCHEMA), progress=False, **kw))


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def rows(out: Path) -> dict[int, dict]:
    found = {}
    for split in ("train", "valid", "test"):
        for path in sorted((out / split).glob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                found[row["sample_id"]] = dict(row, split=split)
    return found


def read_rejects(out: Path) -> list[dict[str, str]]:
    with open(out / "rejects" / "rejects.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_bom_on_any_file_changes_nothing(tmp_path: Path, raw: Path) -> None:
    """The issue's repro: BOM in front of common_features_train.csv -> all rows written. A BOM on
    every file gives byte-identical shards, vocabulary and rejects; BOM + CRLF the same rows."""
    clean = run(raw, tmp_path / "clean")
    assert clean["rejects"]["rows_rejected"] == 0 and clean["rejects"]["rows_written"] == 6000

    only_common = copy_raw(raw, tmp_path / "raw_bom_common")
    path = only_common / "common_features_train.csv"
    path.write_bytes(BOM + path.read_bytes())
    m = run(only_common, tmp_path / "bom_common")
    assert (m["rejects"]["rows_written"], m["rejects"]["rows_rejected"]) == (6000, 0)
    assert m["splits"]["train"]["rows"] + m["splits"]["valid"]["rows"] == 5000
    assert digests(tmp_path / "bom_common") == digests(tmp_path / "clean")

    every = copy_raw(raw, tmp_path / "raw_bom_all")
    for path in every.iterdir():
        path.write_bytes(BOM + path.read_bytes())
    run(every, tmp_path / "bom_all")
    assert digests(tmp_path / "bom_all") == digests(tmp_path / "clean")

    crlf = copy_raw(raw, tmp_path / "raw_bom_crlf")
    for path in crlf.iterdir():
        path.write_bytes(BOM + path.read_bytes().replace(b"\n", b"\r\n"))
    m = run(crlf, tmp_path / "bom_crlf")
    assert (m["rejects"]["rows_written"], m["rejects"]["rows_rejected"]) == (6000, 0)
    # CRLF moves byte offsets (the shuffle), never the rows
    assert rows(tmp_path / "bom_crlf") == rows(tmp_path / "clean")


def test_one_key_of_another_length_costs_only_its_own_rows(tmp_path: Path, raw: Path) -> None:
    """One common line re-keyed to 17 bytes (and one skeleton row pointing at an unknown 17-byte key):
    only the rows of the old key and that one row are rejected, every other row is written unchanged."""
    run(raw, tmp_path / "clean")
    clean = rows(tmp_path / "clean")
    edited = copy_raw(raw, tmp_path / "raw_edit")
    common = (edited / "common_features_train.csv").read_bytes().split(b"\n")
    middle = len(common) // 2
    old_key, rest = common[middle].split(b",", 1)
    assert len(old_key) != 17
    common[middle] = b"K" * 17 + b"," + rest
    (edited / "common_features_train.csv").write_bytes(b"\n".join(common))
    skeleton = (edited / "sample_skeleton_train.csv").read_bytes().split(b"\n")
    odd_row = 4321
    fields = skeleton[odd_row].split(b",")
    fields[3] = b"Z" * 17
    skeleton[odd_row] = b",".join(fields)
    (edited / "sample_skeleton_train.csv").write_bytes(b"\n".join(skeleton))
    referencing = {
        int(line.split(b",")[0]) for line in skeleton if line and line.split(b",")[3] == old_key
    }
    assert referencing

    m = run(edited, tmp_path / "edited")
    rejects = read_rejects(tmp_path / "edited")
    assert {int(r["line"]) for r in rejects} == {
        i + 1 for i, line in enumerate(skeleton) if line and line.split(b",")[3] in (old_key, b"Z" * 17)
    }
    assert {r["reason"] for r in rejects} == {"unknown_common_feature_index"}
    assert m["rejects"]["rows_rejected"] == len(referencing) + 1
    assert m["rejects"]["rows_in"] == m["rejects"]["rows_written"] + m["rejects"]["rows_rejected"]
    got = rows(tmp_path / "edited")
    lost = set(clean) - set(got)
    assert lost == referencing | {int(fields[0])}
    # the other rows keep their split, labels and user (mapped ids may move: the vocabulary counts
    # only written rows)
    same = ("split", "click", "conversion", "user_id", "request_id")
    assert all({k: got[s][k] for k in same} == {k: clean[s][k] for k in same} for s in got)


def weak_hash(words: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every key of the same length collides on both hashes."""
    return length.astype(np.uint64), length.astype(np.uint64) * np.uint64(3)


def write_tiny(folder: Path, common: list[str], skeleton: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "common_features_train.csv").write_text("".join(line + "\n" for line in common))
    (folder / "sample_skeleton_train.csv").write_text("".join(line + "\n" for line in skeleton))
    return folder


def test_colliding_hashes_never_merge_two_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swar, "hash_tokens", weak_hash)
    # two different common keys with equal hash pairs: stop, naming both lines and keys
    raw = write_tiny(tmp_path / "a", ["ka,1,101\x0211\x031.0", "kb,1,101\x0212\x031.0"], ["1,0,0,ka,0,"])
    with pytest.raises(prep.PrepareError, match=r"common_features_train\.csv:2: .*b'kb'.*b'ka' of line 1"):
        run(raw, tmp_path / "out_a", workers=1)
    # a skeleton key that only collides with a common key: stop, never join it to that row
    raw = write_tiny(tmp_path / "b", ["ka,1,101\x0211\x031.0"], ["1,0,0,ka,0,", "2,0,0,kz,0,"])
    with pytest.raises(
        prep.PrepareError,
        match=r"sample_skeleton_train\.csv:2: field common_feature_index: b'kz' has the same 64-bit hashes "
        r"as the different key of common_features_train\.csv:1",
    ):
        run(raw, tmp_path / "out_b", workers=2)
    # a true duplicate (same bytes) is still a duplicate reject, with its raw line
    raw = write_tiny(
        tmp_path / "c", ["ka,1,101\x0211\x031.0", "ka,1,101\x0213\x031.0"], ["1,0,0,ka,0,", "2,0,0,ka,0,"]
    )
    m = run(raw, tmp_path / "out_c", workers=1, valid_fraction=0.0)
    assert m["rejects"]["rows_written"] == 2 and m["rejects"]["common_rows_rejected"] == 1
    assert {r["user_id"] for r in rows(tmp_path / "out_c").values()} == {11}


def test_rejects_csv_has_lf_line_ends_and_duplicate_raw_line(tmp_path: Path) -> None:
    raw = write_tiny(
        tmp_path / "raw",
        ["ka,1,101\x0211\x031.0", "kb,2,101\x0212\x031.0", "ka,1,101\x0213\x031.0"],
        ["1,0,0,ka,0,", "2,0,0,kb,0,", "3,0,0,ka,1,205\x02x\x031.0"],
    )
    run(raw, tmp_path / "out", workers=1, valid_fraction=0.0)
    data = (tmp_path / "out" / "rejects" / "rejects.csv").read_bytes()
    assert b"\r" not in data and data.count(b"\n") == 1 + 4
    by_line = {(r["file"], int(r["line"])): r for r in read_rejects(tmp_path / "out")}
    dup = by_line[("common_features_train.csv", 3)]
    assert dup["reason"] == "duplicate_common_feature_index"
    assert dup["raw"] == "ka,1,101\\x0213\\x031.0" and "already defined at line 1" in dup["detail"]


def test_empty_split_is_an_error_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = write_tiny(
        tmp_path / "raw",
        ["ka,1,101\x0211\x031.0"],
        ["1,0,1,ka,0,", "2,0,0,nope,0,", "3,0,0,nope,0,", "4,0,0,ka,1,205\x02x\x031.0"],
    )
    args = ["data", "prepare", "--raw-dir", str(raw), "--out", str(tmp_path / "out"), "--schema", str(SCHEMA),
            "--no-progress", "--workers", "1"]  # fmt: skip
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "split train is empty: all 4 rows of" in err and "sample_skeleton_train.csv" in err
    assert "unknown_common_feature_index 2, invalid_label_pair 1, non_numeric 1" in err
    assert "first: line 1: invalid_label_pair" in err and "--allow-empty-split" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert cli_main(args + ["--allow-empty-split"]) == 0
    assert "rows_in 4 = rows_written 0 + rows_rejected 4" in capsys.readouterr().out
    # an empty test file is an empty test split
    (raw / "common_features_test.csv").write_text("")
    (raw / "sample_skeleton_test.csv").write_text("")
    (raw / "sample_skeleton_train.csv").write_text("1,0,0,ka,0,\n")
    assert cli_main(args + ["--force"]) == 2
    assert "split test is empty:" in capsys.readouterr().err


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_of_dead_runs_are_removed(tmp_path: Path) -> None:
    raw = write_tiny(tmp_path / "raw", ["ka,1,101\x0211\x031.0"], ["1,0,0,ka,0,"])
    host = rawfiles.HOST
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".out.tmp-{host}-{dead_pid()}", tmp_path / f".out.tmp-{dead_pid()}"]
        kept = [
            tmp_path / f".out.tmp-{host}-{live.pid}",  # a live run
            tmp_path / f".out.tmp-otherhost-{dead_pid()}",  # maybe live on another host
            tmp_path / f".other.tmp-{host}-{dead_pid()}",  # another output folder
        ]
        for folder in stale + kept:
            (folder / "train").mkdir(parents=True)
        run(raw, tmp_path / "out", workers=1, valid_fraction=0.0)
        assert [p.exists() for p in stale] == [False, False]
        assert [p.exists() for p in kept] == [True, True, True]
    finally:
        live.kill()
        live.wait()
    # a run killed between moving the old output aside and renaming the new one into place
    (tmp_path / "out").rename(tmp_path / f".out.old-{host}-{dead_pid()}")
    assert rawfiles.remove_stale_temporaries(tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_kill_9_during_prepare_then_rerun_cleans_up(tmp_path: Path, raw: Path) -> None:
    out = tmp_path / "out"
    code = (
        "from ctnocvr_rec.data import prepare as p; "
        f"p.prepare(p.PrepareOptions({str(raw)!r}, {str(out)!r}, schema={str(SCHEMA)!r}, workers=1, "
        "chunk_mb=0.01, progress=False))"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".out.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob(".out.tmp-*"))
    assert left, "the run finished before it was killed: make it slower"
    assert not out.exists()
    m = run(raw, out)
    assert m["rejects"]["rows_written"] == 6000
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_key_hash_depends_on_its_bytes_only() -> None:
    """The root cause: a key's hashes once depended on the longest key of its chunk."""
    rng = np.random.default_rng(0)
    keys = [bytes(rng.integers(33, 127, n).astype(np.uint8)) for n in rng.integers(1, 40, 300)]
    keys = [k.replace(b",", b"_") for k in keys]
    buffer = b"".join(keys)
    starts = np.cumsum([0] + [len(k) for k in keys[:-1]])
    _, words = swar.padded_words(np.frombuffer(buffer, np.uint8))
    h1, h2 = swar.hash_tokens(words, starts + swar.PAD, np.array([len(k) for k in keys]))
    assert [(int(a), int(b)) for a, b in zip(h1, h2)] == [swar.hash_key(k) for k in keys]
    # the statement: a longer neighbour line in the chunk changes no hash
    slots = rawformat.FieldSlots(("101",), (False,))
    data = b"".join(k + b",1,101\x027\x031.0\n" for k in keys[:50])
    alone = rawformat.parse_chunk(data, rawformat.COMMON, slots)
    with_long = rawformat.parse_chunk(b"L" * 77 + b",0,\n" + data, rawformat.COMMON, slots)
    assert alone.key_h1.tolist() == with_long.key_h1[1:].tolist()
    assert alone.key_h2.tolist() == with_long.key_h2[1:].tolist()


def test_strict_with_bom_and_crlf_names_file_and_line(tmp_path: Path) -> None:
    raw = write_tiny(tmp_path / "raw", ["ka,1,101\x0211\x031.0"], ["1,0,0,ka,0,", "2,0,0,ka,1,205\x02x\x031.0"])
    for path in raw.iterdir():
        path.write_bytes(BOM + path.read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(
        prep.PrepareError, match=r"sample_skeleton_train\.csv:2: non_numeric \(field 205 item 1: id 'x'\)"
    ):
        run(raw, tmp_path / "out", workers=1, strict=True)
    m = run(raw, tmp_path / "out", workers=1, valid_fraction=0.0)
    assert (m["rejects"]["rows_written"], m["rejects"]["rows_rejected"]) == (1, 1)
    assert rows(tmp_path / "out")[1]["user_id"] == 11  # the BOM is not part of the key "ka"


def test_tokens_equal_compares_every_byte_and_the_length() -> None:
    _, a = swar.padded_words(np.frombuffer(b"abcdefghijklmnopqrstuvwxyz" * 2, np.uint8))
    _, b = swar.padded_words(np.frombuffer(b"abcdefghijklmnopqrstuvwxyZ", np.uint8))
    p = swar.PAD
    starts, lengths = np.array([p, p, p, p]), np.array([26, 25, 1, 9])
    assert swar.tokens_equal(a, starts, lengths, b, starts, lengths).tolist() == [False, True, True, True]
    # different lengths are different keys, even when one is a prefix of the other (no read past b)
    got = swar.tokens_equal(a, np.array([p]), np.array([52]), b, np.array([p + 25]), np.array([1]))
    assert got.tolist() == [False]
