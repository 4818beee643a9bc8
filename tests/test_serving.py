"""Serving end to end on synthetic raw files: prepare -> train (1 rank) -> ``export`` -> ``predict`` /
``Scorer``: parity with the trainer, raw-id mapping, wrong inputs, self-contained artifacts, the
docs example."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctnocvr_rec.config import load_config
from ctnocvr_rec.data import prepare as prep
from ctnocvr_rec.data import synth
from ctnocvr_rec.data.dataset import ParquetBatchDataset
from ctnocvr_rec.serving import Scorer
from ctnocvr_rec.serving.contract import ServingContract
from ctnocvr_rec.serving.export import export_run, load_run_model
from ctnocvr_rec.serving.predict import PredictionWriter, check_prepared_matches, predict
from ctnocvr_rec.serving.program import ServingProgram, kjt_to_inputs
from ctnocvr_rec.serving.rawinput import RawReport, iter_raw_batches
from ctnocvr_rec.train.api import run_in_process

REPO = Path(__file__).resolve().parents[1]
PROBS = ("p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr")
INT8_TOLERANCE = 2e-3  # docs/serving.md, "int8 tolerance"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    raw, prepared, run, model = root / "raw", root / "prepared", root / "run", root / "model"
    synth.generate(synth.SynthConfig(rows_train=3000, rows_test=600, users=300, items=200, seed=3), raw)
    prep.prepare(prep.PrepareOptions(str(raw), str(prepared), schema="aliccp",
                                     workers=1, progress=False))
    torch.set_num_threads(1)
    cfg = load_config(None, [
        f"data.prepared_dir={prepared}", "data.schema=aliccp",
        f"train.run_dir={run}", "data.batch_size=200", "data.eval_batch_size=256", "train.epochs=1",
        "train.checkpoint_every_steps=50", "train.progress_bar=false", "model.arch=mmoe", "model.embedding_dim=6",
        "model.num_experts=2", "model.expert_hidden=[16]", "model.tower_hidden=[16]", "train.device=cpu",
        "train.eval_every_steps=1000", "eval.save_predictions=true",
    ])
    run_in_process(cfg)
    export_run(run, model, log=lambda _: None)
    return {"raw": raw, "prepared": prepared, "run": run, "model": model, "root": root}


@pytest.fixture(scope="module")
def scorers(served) -> dict[str, Scorer]:
    return {p: Scorer.load(served["model"], precision=p) for p in ("fp32", "int8")}


@pytest.fixture(scope="module")
def fp32_prepared(served, scorers) -> Path:
    """``predict`` of the prepared test split with the float program (shared by several tests)."""
    out = served["root"] / "fp32_prepared.parquet"
    summary = predict(served["model"], out, prepared=served["prepared"], split="test", batch_size=64,
                      progress=False, scorer=scorers["fp32"])
    assert summary["rows"] == 600 and "23 vocabularies equal" in summary["prepared_check"]
    return out


def read_sorted(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    cols = {n: table.column(n).to_numpy() for n in table.column_names}
    order = np.argsort(cols["sample_id"])
    return {k: v[order] for k, v in cols.items()}


def test_export_folder_is_self_describing(served, tmp_path):
    contract = json.loads((served["model"] / "serving.json").read_text())
    assert [f["field"] for f in contract["features"]][:3] == ["101", "121", "122"]  # schema order
    assert len(contract["features"]) == 23 and contract["outputs"] == list(PROBS)
    weighted = {f["field"] for f in contract["features"] if f["weights_from_input"]}
    assert weighted == {"109_14", "110_14", "127_14", "150_14", "853"}
    assert all(f["mapping"] == "vocab" and (served["model"] / f["vocab_file"]).is_file() for f in contract["features"])
    assert contract["run"]["step"] == 13 and contract["run"]["saved_world_size"] == 1  # 2700 train rows / 200
    assert contract["programs"]["fp32"]["max_abs_diff_vs_ranker"] <= 1e-5
    assert contract["programs"]["int8"]["max_abs_diff_vs_ranker"] <= INT8_TOLERANCE
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", contract["git"]["commit"])
    scorer = Scorer.load(served["model"], verify=True)
    assert scorer.contract.verify_files() == []
    # a damaged copy is refused, naming the file
    broken = tmp_path / "model"
    shutil.copytree(served["model"], broken)
    with open(broken / "vocab" / "205.parquet", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(ValueError, match=r"vocab/205.parquet: content differs"):
        Scorer.load(broken, verify=True)
    with pytest.raises(ValueError, match="already holds an export"):
        export_run(served["run"], served["model"], log=lambda _: None)


def test_predict_reproduces_the_trainers_predictions(served, scorers, fp32_prepared, tmp_path):
    trainer = read_sorted(served["run"] / "predictions" / "test.parquet")
    int8 = tmp_path / "int8.parquet"
    predict(served["model"], int8, prepared=served["prepared"], batch_size=64, progress=False, scorer=scorers["int8"])
    for precision, tolerance, out in (("fp32", 1e-5, fp32_prepared), ("int8", INT8_TOLERANCE, int8)):
        got = read_sorted(out)
        assert np.array_equal(got["sample_id"], trainer["sample_id"])
        assert np.array_equal(got["click"], trainer["click"]) and np.array_equal(got["conversion"], trainer["conversion"])
        for name in PROBS:
            diff = np.abs(got[name] - trainer[name]).max()
            assert diff <= tolerance, (precision, name, diff)
        if precision == "int8":
            assert diff > 0  # really the quantised tables


def test_a_prepared_set_with_another_vocabulary_is_refused(served, tmp_path):
    contract = ServingContract.load(served["model"])
    assert "23 vocabularies equal" in check_prepared_matches(contract, served["prepared"])
    other = tmp_path / "prepared"
    shutil.copytree(served["prepared"], other)
    vocab = pq.read_table(other / "vocab" / "205.parquet").to_pydict()
    vocab["mapped_id"][0], vocab["mapped_id"][1] = vocab["mapped_id"][1], vocab["mapped_id"][0]
    pq.write_table(pa.table(vocab), other / "vocab" / "205.parquet")
    with pytest.raises(ValueError, match=r"vocab/205.parquet: differs from the model's vocab/205.parquet"):
        check_prepared_matches(contract, other)


def test_scorer_equals_the_trained_ranker_on_batches_of_1_and_333(served, scorers):
    model, _ = load_run_model(served["run"])
    reference = ServingProgram(model).eval()
    scorer = scorers["fp32"]
    for batch_size in (1, 333):  # 333 > the export example's 8
        batch = next(iter(ParquetBatchDataset(served["prepared"], "test", batch_size)))
        got = scorer.score(batch.sparse_features, batch.weighted_features, ids="mapped")
        with torch.no_grad():
            want = reference(*kjt_to_inputs(batch.sparse_features, batch.weighted_features, batch_size))
        assert got["p_ctr"].shape == (batch_size,)
        for k, name in enumerate(PROBS):
            assert (got[name] - want[:, k]).abs().max().item() <= 1e-5


def test_raw_files_score_like_the_prepared_rows_and_count_unseen_ids_and_rejects(served, scorers, fp32_prepared,
                                                                                 tmp_path):
    prepared = read_sorted(fp32_prepared)
    base = predict(served["model"], tmp_path / "raw.parquet", raw_dir=served["raw"], progress=False,
                   scorer=scorers["fp32"])
    raw = read_sorted(tmp_path / "raw.parquet")
    assert np.array_equal(raw["sample_id"], prepared["sample_id"])
    for name in PROBS:
        assert np.abs(raw[name] - prepared[name]).max() <= 1e-5
    assert base["rows_rejected"] == 0 and base["rows_in"] == 600

    # an unseen item id and a broken line
    bad = tmp_path / "raw_bad"
    shutil.copytree(served["raw"], bad)
    skeleton = bad / "sample_skeleton_test.csv"
    lines = skeleton.read_bytes().split(b"\n")
    lines[0] = re.sub(rb"205\x02\d+\x03", b"205\x02987654321\x03", lines[0])
    lines.insert(5, b"this,is,not,a,skeleton,line,at,all")
    skeleton.write_bytes(b"\n".join(lines))
    out = tmp_path / "bad.parquet"
    summary = predict(served["model"], out, raw_dir=bad, progress=False, scorer=scorers["fp32"])
    assert summary["rows"] == 600 and summary["rows_in"] == 601 and summary["rows_rejected"] == 1
    assert summary["unseen_ids"] == base["unseen_ids"] + 1 and summary["unseen_by_field"]["205"] == 1 + \
        base["unseen_by_field"].get("205", 0)
    rejects = Path(summary["rejects_file"]).read_text().splitlines()
    assert rejects[1].startswith("sample_skeleton_test.csv,6,wrong_column_count")


def test_dict_of_raw_ids_scores_like_the_prepared_rows(served, scorers, fp32_prepared):
    scorer = scorers["fp32"]
    contract = scorer.contract
    user = [(f.field, f.weights_from_input) for f in contract.features if f.group == "user"]
    other = [(f.field, f.weights_from_input) for f in contract.features if f.group != "user"]
    rb = next(iter_raw_batches(served["raw"], "test", user, other, 5, RawReport()))
    features: dict[str, list[list]] = {}
    for name, (ids, lengths, weights) in rb.columns.items():
        cuts = np.cumsum(lengths)[:-1]
        features[name] = [list(map(int, part)) for part in np.split(ids, cuts)]
        if weights is not None:
            features[name + "__w"] = [list(map(float, part)) for part in np.split(weights, cuts)]
    got = scorer.score(features)
    prepared = read_sorted(fp32_prepared)
    rows = np.searchsorted(prepared["sample_id"], rb.sample_id)
    for name in PROBS:
        assert np.abs(got[name].numpy() - prepared[name][rows]).max() <= 1e-5


def test_wrong_inputs_name_the_feature(served, scorers):
    scorer = scorers["int8"]
    good = {f: [[1], [2]] for f in scorer.contract.field_names}
    for f in scorer.contract.features:
        if f.weights_from_input:
            good[f.field + "__w"] = [[1.0], [0.5]]
    assert scorer.score(good)["p_ctr"].shape == (2,)

    def bad(change: dict, drop: str | None = None) -> dict:
        out = {**good, **change}
        out.pop(drop, None)
        return out

    cases = [
        (bad({}, drop="205"), r"missing feature\(s\) \['205'\]"),
        (bad({"205": [[1.5], [2.0]]}), r"feature '205': ids must be integers, got float64"),
        (bad({"206": [["a"], ["b"]]}), r"feature '206': ids must be integers"),
        (bad({"207": [[1]]}), r"feature '207' has 1 rows, '101' has 2"),
        (bad({}, drop="853__w"), r"feature '853' is weighted: pass its weights as '853__w'"),
        (bad({"853__w": [[1.0, 2.0], [1.0]]}), r"feature '853': row 0 has 1 ids but 2 weights"),
        (bad({"999": [[1], [2]]}), r"unknown input\(s\) \['999'\]"),
        (bad({"216": [5, 6]}), r"feature '216': every row must be a list of ids"),
    ]
    for features, message in cases:
        with pytest.raises(ValueError, match=message):
            scorer.score(features)
    with pytest.raises(ValueError, match=r"feature '205': mapped id 100000 outside \[0, "):
        scorer.score(bad({"205": [[100000], [1]]}), ids="mapped")
    batch = next(iter(ParquetBatchDataset(served["prepared"], "test", 4)))
    kjt = batch.sparse_features
    as_float = type(kjt)(keys=kjt.keys(), values=kjt.values().float(), lengths=kjt.lengths())
    with pytest.raises(ValueError, match=r"feature 'f_101': ids must be int32 or int64, got torch.float32"):
        scorer.score(as_float, batch.weighted_features, ids="mapped")
    with pytest.raises(ValueError, match=r"missing feature 'f_109_14'"):
        scorer.score(batch.sparse_features, None, ids="mapped")
    with pytest.raises(FileNotFoundError, match="no aot program.*--aot"):
        Scorer.load(served["model"], precision="aot")


def test_programs_load_without_ctnocvr_rec(served, scorers, tmp_path):
    batch = next(iter(ParquetBatchDataset(served["prepared"], "test", 7)))
    encoded = scorers["fp32"].encode(batch.sparse_features, batch.weighted_features, ids="mapped")
    expected = {p: scorers[p].program(*encoded.inputs) for p in ("fp32", "int8")}
    torch.save({"inputs": encoded.inputs, "expected": expected}, tmp_path / "case.pt")
    script = tmp_path / "standalone.py"
    script.write_text(
        "import sys\n"
        "class Block:  # any import of our package fails: the programs must not need it\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'ctnocvr_rec':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, torchrec\n"
        "torch.set_num_threads(1)\n"
        "case = torch.load(sys.argv[2])\n"
        "fp32 = torch.export.load(sys.argv[1] + '/model_fp32.pt2').module()\n"
        "int8 = torch.jit.load(sys.argv[1] + '/model_int8.pt')\n"
        "for name, program in (('fp32', fp32), ('int8', int8)):\n"
        "    torch.testing.assert_close(program(*case['inputs']), case['expected'][name], rtol=0, atol=1e-6)\n"
        "assert not any(m.startswith('ctnocvr_rec') for m in sys.modules)\n"
        "try:\n"
        "    import ctnocvr_rec  # noqa: F401\n"
        "except ImportError:\n"
        "    print('standalone ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", str(script), str(served["model"]), str(tmp_path / "case.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "standalone ok" in proc.stdout, proc.stderr[-3000:]


def test_docs_example_runs(served, tmp_path, monkeypatch, capsys):
    text = (REPO / "docs" / "serving.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "artifacts" / "serving").mkdir(parents=True)
    (tmp_path / "artifacts" / "serving" / "model").symlink_to(served["model"])
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/serving.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'p_ctnocvr': [" in printed and "ids not seen in training" in printed


def test_prediction_writer_streams_row_groups(tmp_path):
    writer = PredictionWriter(tmp_path / "o.parquet", PROBS, labels=False, row_group_rows=100)
    for start in range(0, 350, 50):
        n = min(50, 350 - start)
        writer.write({"sample_id": np.arange(start, start + n), **{p: np.zeros(n, np.float32) for p in PROBS}})
        assert not (tmp_path / "o.parquet").exists()  # published only when complete
    writer.close()
    meta = pq.ParquetFile(tmp_path / "o.parquet").metadata
    assert meta.num_rows == 350 and meta.num_row_groups == 4  # 100, 100, 100, 50: written as it went


def test_cli_predict_prints_rows_per_second(served, tmp_path, capsys):
    from ctnocvr_rec.cli import main

    out = tmp_path / "cli.parquet"
    assert main(["predict", "--model", str(served["model"]), "--precision", "int8", "--raw-dir", str(served["raw"]),
                 "--out", str(out), "--no-progress", "--batch-size", "100"]) == 0
    printed = capsys.readouterr().out
    assert f"scored 600 rows of {served['raw']} split test (raw files) with int8" in printed
    assert re.search(r"[\d,]+ rows/s", printed) and "raw rows_in 600 = scored 600 + rejected 0" in printed
    assert pq.ParquetFile(out).metadata.num_rows == 600
    assert main(["predict", "--model", str(served["model"]), "--out", str(out), "--precision", "aot",
                 "--prepared", str(served["prepared"])]) == 2
    assert "no aot program" in capsys.readouterr().err
