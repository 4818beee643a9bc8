"""Dense features after the shards: the transform, the loader's ``batch.dense``, the dense arch, every
ranker with and without dense features (sparse-only exactly as before), the evaluation filler batch,
the serving program and the Scorer's dense inputs. Fast unit tests; the end-to-end runs (2 gloo
ranks, elastic resume, export + predict) are in ``tests/test_dense_end_to_end.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctnocvr_rec.config import ConfigError, load_config
from ctnocvr_rec.data.batch import CtnocvrBatch
from ctnocvr_rec.data.batching import table_to_batch
from ctnocvr_rec.data.dataset import ParquetBatchDataset, make_dataloader
from ctnocvr_rec.data.dense import fit_dense_stats, transform_dense
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.models import build_model
from ctnocvr_rec.models.testing import TINY_SIZES, SyntheticStream, tiny_dense_schema, tiny_model_config
from ctnocvr_rec.modules.dense_arch import DenseFeatureArch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prepared_fixture import aliccp_schema, aliccp_schema_with_dense, raw_dense, write_prepared  # noqa: E402
from _sparse_baseline import CASES, fingerprint  # noqa: E402

CPU = torch.device("cpu")
BASELINE = Path(__file__).resolve().parent / "data" / "sparse_only_baseline.json"


# ------------------------------------------------------------------------------------------ transform


def test_transform_is_log1p_then_standardise_with_train_stats():
    raw = np.array([0.0, 1.0, np.e - 1, -3.0, 100.0])
    logged = transform_dense(raw, "log1p")
    np.testing.assert_allclose(logged, [0.0, np.log(2), 1.0, -np.log(4), np.log(101)], rtol=1e-6)
    assert logged.dtype == np.float32
    stats = fit_dense_stats(raw, "log1p")
    z = transform_dense(raw, "log1p", True, stats["mean"], stats["std"])
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-5
    # standardize off: mean/std are ignored; a constant column gets std 1 (values -> 0, not NaN)
    np.testing.assert_array_equal(transform_dense(raw, "none", False, 5.0, 0.5), raw.astype(np.float32))
    const = fit_dense_stats(np.full(4, 7.0))
    assert const == {"mean": 7.0, "std": 1.0}
    np.testing.assert_array_equal(transform_dense(np.full(4, 7.0), "none", True, **const), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="not finite"):
        transform_dense(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="transform must be one of"):
        transform_dense(raw, "sqrt")


def test_the_transform_has_one_definition():
    package = Path(__file__).resolve().parents[1] / "ctnocvr_rec"
    defining = [str(p.relative_to(package)) for p in package.rglob("*.py")
                if "def transform_dense(" in p.read_text(encoding="utf-8")]
    assert defining == ["data/dense.py"]


# ------------------------------------------------------------------------------------------ loader


@pytest.fixture(scope="module")
def dense_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    schema = aliccp_schema_with_dense(3)
    tables = write_prepared(root, schema, {"train": 230, "test": 70}, rows_per_file=60, row_group_size=25)
    return root, schema, tables


def test_manifest_records_the_fitted_stats_and_stored_values_are_their_transform(dense_set):
    root, schema, tables = dense_set
    prepared = PreparedSet.open(root)
    assert prepared.schema.dense == schema.dense
    stats = prepared.dense_stats()
    raw = raw_dense(schema, 230, 0)  # the fixture's train raw values (seed 0, split index 0)
    for d in schema.dense:
        assert stats[d.name]["mean"] == pytest.approx(fit_dense_stats(raw[d.name], d.transform)["mean"])
        stored = tables["train"].column(d.column).to_numpy()
        np.testing.assert_array_equal(stored, transform_dense(raw[d.name], d.transform, d.standardize,
                                                               stats[d.name]["mean"], stats[d.name]["std"]))
    assert abs(float(tables["train"].column("x0__d").to_numpy().mean())) < 1e-5  # standardised on train


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_stacks_dense_columns_in_schema_order(dense_set, shuffle):
    root, schema, tables = dense_set
    expected = {sid: row for sid, row in zip(
        tables["train"].column("sample_id").to_numpy(),
        np.stack([tables["train"].column(d.column).to_numpy() for d in schema.dense], axis=1))}
    seen = 0
    for batch in make_dataloader(root, "train", 32, shuffle=shuffle, seed=3, shuffle_window_batches=2):
        assert batch.dense.dtype == torch.float32 and batch.dense.shape == (batch.batch_size, 3)
        for sid, row in zip(batch.sample_id.tolist(), batch.dense.numpy()):
            np.testing.assert_array_equal(row, expected[sid])
        seen += batch.batch_size
    assert seen == 230
    one = table_to_batch(tables["test"].slice(5, 9), schema)
    np.testing.assert_array_equal(one.dense[:, 2].numpy(), tables["test"].column("x2__d").to_numpy()[5:14])


def test_sparse_only_batches_have_no_dense(dense_set, tmp_path):
    root, _, _ = dense_set
    # a selection of the fields without `dense:` reads no dense column
    batch = next(iter(ParquetBatchDataset(root, "train", 16, schema=aliccp_schema())))
    assert batch.dense is None
    write_prepared(tmp_path, aliccp_schema(), {"train": 40})
    assert next(iter(ParquetBatchDataset(tmp_path, "train", 16))).dense is None
    assert "dense_stats" not in json.loads((tmp_path / "manifest.json").read_text())


def test_bad_dense_input_is_named(dense_set, tmp_path):
    root, schema, tables = dense_set
    # a shard without a dense column the schema names
    (tmp_path / "train").mkdir()
    pq.write_table(tables["train"].drop_columns(["x1__d"]), tmp_path / "train" / "part-00000.parquet")
    (tmp_path / "manifest.json").write_text((root / "manifest.json").read_text())
    with pytest.raises(ValueError, match=r"part-00000.parquet: missing column\(s\) \['x1__d'\]"):
        ParquetBatchDataset(tmp_path, "train", 16)
    # a requested dense feature the prepared set does not have
    other = aliccp_schema_with_dense(4)
    with pytest.raises(ValueError, match="dense feature 'x3'.*not among the prepared set's"):
        PreparedSet.open(root, other)
    # non-finite stored values
    values = tables["test"].column("x2__d").to_numpy().copy()
    values[3] = np.inf
    bad = tables["test"].set_column(tables["test"].schema.get_field_index("x2__d"), "x2__d", pa.array(values))
    with pytest.raises(ValueError, match="'x2__d' holds non-finite"):
        table_to_batch(bad, schema)


# ------------------------------------------------------------------------------------------ the module


def test_dense_arch_shapes_and_gradients():
    torch.manual_seed(0)
    arch = DenseFeatureArch(in_features=8, hidden=[16], out_features=6)
    x = torch.randn(5, 8, requires_grad=True)
    out = arch(x)
    assert out.shape == (5, 6) and (out >= 0).all()  # ReLU after every layer, the last included (DLRM)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in arch.parameters())
    assert DenseFeatureArch(3, [], 4)(torch.randn(2, 3)).shape == (2, 4)  # one layer
    assert sum(p.numel() for p in DenseFeatureArch(3, [], 4).parameters()) == 3 * 4 + 4
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        DenseFeatureArch(0, [4], 4)
    with pytest.raises(ValueError, match="widths must be >= 1"):
        DenseFeatureArch(2, [0], 4)


def test_dense_hidden_is_a_ranged_config_field():
    cfg = load_config(None, ["model.dense_hidden=[32, 16]"])
    assert cfg.model.dense_hidden == [32, 16]
    assert load_config(None, ["model.dense_hidden=[]"]).model.dense_hidden == []
    with pytest.raises(ConfigError, match=r"model.dense_hidden.*0 is out of range"):
        load_config(None, ["model.dense_hidden=[8, 0]"])


# ------------------------------------------------------------------------------------------ rankers


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{int(c[2])}")
def test_sparse_only_rankers_are_exactly_as_before_dense_features(case):
    """State_dict keys/shapes and fixed-seed losses of 3 Adam steps equal those recorded on main before
    dense features existed (tests/_sparse_baseline.py)."""
    recorded = json.loads(BASELINE.read_text())["cases"]
    assert len(recorded) == len(CASES)
    now = fingerprint(*case)
    before = recorded[f"{case[0]}/{case[1]}/{int(case[2])}"]
    assert now["state_dict"] == before["state_dict"]
    assert now["losses"] == pytest.approx(before["losses"], rel=1e-6, abs=0)


@pytest.mark.parametrize("arch,method", [("esmm", "base"), ("mmoe", "escm2_ips"), ("cgc", "escm2_dr"),
                                         ("ple", "dcmt")])
def test_every_ranker_joins_the_dense_block_like_one_more_field(arch, method):
    schema = tiny_dense_schema(4)
    cfg = tiny_model_config(arch, True, method=method, dense_hidden=[10])
    torch.manual_seed(0)
    model = build_model(cfg, schema, TINY_SIZES, device=CPU)
    assert model.input_dim == model.sparse_arch.output_dim + cfg.embedding_dim
    assert model.num_dense_features == 4
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("dense_arch.")}
    assert sorted(shapes.values()) == sorted([(10, 4), (10,), (cfg.embedding_dim, 10), (cfg.embedding_dim,)])
    batch = SyntheticStream(schema, TINY_SIZES, batch_size=16, seed=2).next_batch()
    loss, out = model(batch)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("dense_arch."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the scores depend on the dense values
    model.eval()
    with torch.no_grad():
        moved = CtnocvrBatch.from_labels(batch.sparse_features, batch.click, batch.conversion,
                                         weighted_features=batch.weighted_features, dense=batch.dense + 1.0)
        assert not torch.allclose(model(moved)[1]["p_ctr"], model(batch)[1]["p_ctr"])
        no_dense = CtnocvrBatch.from_labels(batch.sparse_features, batch.click, batch.conversion,
                                            weighted_features=batch.weighted_features)
        with pytest.raises(ValueError, match="built with 4 dense feature.*batch.dense is None"):
            model(no_dense)


def test_dense_ranker_forward_is_fx_traceable_and_the_batch_moves():
    from torchrec.fx import symbolic_trace

    schema = tiny_dense_schema(3)
    model = build_model(tiny_model_config("mmoe", True), schema, TINY_SIZES, device=CPU)
    batch = SyntheticStream(schema, TINY_SIZES, batch_size=8, seed=5).next_batch()
    moved = batch.to(CPU)
    assert torch.equal(moved.dense, batch.dense)
    torch.testing.assert_close(symbolic_trace(model)(moved)[0], model(batch)[0])
    with pytest.raises(ValueError, match=r"dense must be \[B, D\] with B = 8"):
        CtnocvrBatch.from_labels(batch.sparse_features, batch.click, batch.conversion, dense=torch.zeros(7, 3))


def test_evaluation_filler_batch_carries_dense_zeros():
    from ctnocvr_rec.train.evaluate import empty_batch, model_num_dense_features, model_weighted_feature_names

    schema = tiny_dense_schema(5)
    model = build_model(tiny_model_config("cgc", True), schema, TINY_SIZES, device=CPU).eval()
    assert model_num_dense_features(model) == 5
    batch = empty_batch(schema.feature_names, model_weighted_feature_names(model), model_num_dense_features(model))
    assert batch.dense.shape == (1, 5) and not batch.dense.any()
    with torch.no_grad():
        _, out = model(batch)
    assert out["p_ctr"].shape == (1,)
    assert empty_batch(["f_a"], []).dense is None


# ------------------------------------------------------------------------------------------ serving


def test_dense_program_exports_with_a_sixth_input():
    from ctnocvr_rec.serving.program import (
        DenseServingProgram,
        ServingProgram,
        example_inputs,
        export_float,
        kjt_to_inputs,
        serving_program,
    )

    schema = tiny_dense_schema(8)  # D = 8 = the export example's batch: the dims must not be tied
    torch.manual_seed(0)
    model = build_model(tiny_model_config("mmoe", True), schema, TINY_SIZES, device=CPU).eval()
    program = serving_program(model)
    assert isinstance(program, DenseServingProgram)
    inputs = example_inputs(model, 8)
    assert len(inputs) == 6 and inputs[5].shape == (8, 8)
    exported = export_float(model, inputs).module()
    batch = SyntheticStream(schema, TINY_SIZES, batch_size=13, seed=1).next_batch()
    with torch.no_grad():
        got = exported(*kjt_to_inputs(batch.sparse_features, batch.weighted_features, 13, batch.dense))
        want = model(batch)[1]
    torch.testing.assert_close(got[:, 0], want["p_ctr"], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, 3], want["p_ctnocvr"], rtol=0, atol=1e-6)
    sparse_model = build_model(tiny_model_config("ple", True), tiny_dense_schema(0), TINY_SIZES, device=CPU)
    assert type(serving_program(sparse_model)) is ServingProgram and len(example_inputs(sparse_model)) == 5


def test_exact_moments_refuse_values_whose_square_overflows():
    from ctnocvr_rec.data.dense import ExactMoments

    moments = ExactMoments()
    moments.add(np.array([1.0, 3.0]), "D1")
    assert moments.mean_std() == (2.0, 1.0)
    with pytest.raises(ValueError, match="D1: values too large to standardise"):
        moments.add(np.array([1e200]), "D1")


def _echo_scorer(tmp_path: Path):
    """A Scorer over a hand-written contract (one hash field, four dense features) whose 'program'
    returns its dense input: what the Scorer feeds the model, visible."""
    from ctnocvr_rec.serving.contract import FORMAT, ServingContract
    from ctnocvr_rec.serving.scorer import Scorer

    dense = [{"name": f"x{k}", "column": f"x{k}__d", "transform": "log1p" if k < 2 else "none",
              "standardize": k % 2 == 0, "mean": 0.5 + k, "std": 2.0} for k in range(4)]
    tree = {"format": FORMAT, "outputs": ["p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr"], "dense_features": dense,
            "features": [{"field": "101", "feature": "f_101", "group": "user", "weighted": False,
                          "weights_from_input": False, "mapping": "hash", "num_embeddings": 10, "num_buckets": 10,
                          "vocab_file": ""}]}
    return Scorer(ServingContract(tmp_path, tree), "fp32", lambda *inputs: inputs[5]), dense


def test_scorer_transforms_raw_dense_values_with_the_exported_stats(tmp_path):
    scorer, dense = _echo_scorer(tmp_path)
    raw = np.array([[0.0, 3.0, -2.0, 7.5], [10.0, 0.25, 4.0, -1.0]])
    features = {"101": [[12345], []], **{f"x{k}": raw[:, k].tolist() for k in range(4)}}
    out = scorer.score(features)  # ids="raw" -> dense_values="raw": transformed here
    got = np.stack([out[name].numpy() for name in scorer.outputs], axis=1)
    for k, d in enumerate(dense):
        np.testing.assert_array_equal(got[:, k], transform_dense(raw[:, k], d["transform"], d["standardize"],
                                                                 d["mean"], d["std"]))
    # already transformed values pass as they are (a prepared set's; the default with ids="mapped")
    features["101"] = [[3], []]
    as_is = scorer.score(features, ids="mapped")
    np.testing.assert_array_equal(np.stack([as_is[n].numpy() for n in scorer.outputs], axis=1),
                                  raw.astype(np.float32))
    with pytest.raises(ValueError, match=r"dense inputs: missing \['x3'\]"):
        scorer.score({k: v for k, v in features.items() if k != "x3"})
    with pytest.raises(ValueError, match="dense feature 'x1': expected 2 numbers"):
        scorer.score({**features, "x1": [1.0]})
    with pytest.raises(ValueError, match=r"dense: expected a \[2, 4\] array"):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        kjt = KeyedJaggedTensor(keys=["f_101"], values=torch.tensor([3]), lengths=torch.tensor([1, 0]))
        scorer.score(kjt, ids="mapped", dense=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="dense_values must be 'raw' or 'transformed'"):
        scorer.score(features, dense_values="log")
