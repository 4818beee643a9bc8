"""Rankers: the model contract, training on a synthetic stream, tracing and export."""

from __future__ import annotations

import pytest
import torch

from ctnocvr_rec.config import ModelConfig
from ctnocvr_rec.models import ARCHS, build_model
from ctnocvr_rec.models.testing import TINY_SIZES, SyntheticStream, tiny_model_config, tiny_schema

CPU = torch.device("cpu")
SIZES = TINY_SIZES
PREDICTIONS = {"p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr"}
PASSTHROUGH = {"click", "conversion", "ctnocvr", "sample_id", "request_id", "user_id"}
EXPECTED_TERMS = {
    ("esmm", False): {"ctr", "ctcvr"},
    ("esmm", True): {"ctr", "ctcvr", "ctnocvr"},
    ("mmoe", False): {"ctr", "cvr"},
    ("mmoe", True): {"ctr", "cvr", "ctnocvr", "score"},
}
for _arch in ("cgc", "ple"):
    EXPECTED_TERMS[(_arch, False)] = EXPECTED_TERMS[("mmoe", False)]
    EXPECTED_TERMS[(_arch, True)] = EXPECTED_TERMS[("mmoe", True)]

COMBOS = [(arch, flag) for arch in ARCHS for flag in (False, True)]
COMBO_IDS = [f"{a}-{'ctnocvr' if f else 'base'}" for a, f in COMBOS]


def small_cfg(arch: str, use_ctnocvr: bool, **overrides) -> ModelConfig:
    return tiny_model_config(arch, use_ctnocvr, **overrides)


@pytest.mark.parametrize("arch,use_ctnocvr", COMBOS, ids=COMBO_IDS)
def test_outputs_follow_the_model_contract(arch, use_ctnocvr):
    torch.manual_seed(0)
    model = build_model(small_cfg(arch, use_ctnocvr), tiny_schema(), SIZES, device=CPU)
    batch = SyntheticStream(tiny_schema(), SIZES, batch_size=32, seed=1).next_batch()
    loss, out = model(batch)
    terms = EXPECTED_TERMS[(arch, use_ctnocvr)]
    assert set(out) == PREDICTIONS | PASSTHROUGH | {"loss"} | {f"loss_{t}" for t in terms}
    assert loss.dim() == 0 and loss.requires_grad
    for key, value in out.items():
        assert not value.requires_grad, key
        assert value.shape == (() if key.startswith("loss") else (32,)), key
    for key in PREDICTIONS:
        assert ((out[key] > 0) & (out[key] < 1)).all(), key
    torch.testing.assert_close(out["p_ctcvr"], out["p_ctr"] * out["p_cvr"])
    if arch == "esmm" or not use_ctnocvr:
        torch.testing.assert_close(out["p_ctnocvr"], out["p_ctr"] * (1 - out["p_cvr"]))
    for key in PASSTHROUGH:
        torch.testing.assert_close(out[key], getattr(batch, key))
    assert out["loss"].item() == pytest.approx(loss.item())
    assert model.sparse_arch.embedding_bag_collection is not None
    assert model.sparse_arch.weighted_embedding_bag_collection is not None  # tiny_schema has weighted fields


def test_use_ctnocvr_adds_a_gated_task_with_its_own_tower():
    base = build_model(small_cfg("cgc", False), tiny_schema(), SIZES, device=CPU)
    plus = build_model(small_cfg("cgc", True), tiny_schema(), SIZES, device=CPU)
    assert len(base.over_arch.towers) == 2 and len(plus.over_arch.towers) == 3
    assert base.tasks == ("ctr", "cvr") and plus.tasks == ("ctr", "cvr", "ctnocvr")
    assert plus.over_arch.experts.levels[0].gate_weight.shape[0] == 3
    assert plus.over_arch.experts.levels[0].task_weight.shape[0] == 3
    no_score = build_model(small_cfg("mmoe", True, score_weight=0.0), tiny_schema(), SIZES, device=CPU)
    assert no_score.head.terms == ("ctr", "cvr", "ctnocvr")


def test_build_model_defaults_to_meta_and_rejects_unknown_arch():
    model = build_model(ModelConfig(arch="ple"), tiny_schema(), SIZES)
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(ValueError, match="model.arch must be one of"):
        build_model(ModelConfig(arch="dcn"), tiny_schema(), SIZES)


@pytest.mark.parametrize("arch,use_ctnocvr", COMBOS, ids=COMBO_IDS)
def test_every_ranker_learns_on_a_synthetic_stream(arch, use_ctnocvr):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    schema = tiny_schema()
    model = build_model(small_cfg(arch, use_ctnocvr), schema, SIZES, device=CPU)
    held_out = SyntheticStream(schema, SIZES, batch_size=2048, seed=7).next_batch()
    stream = SyntheticStream(schema, SIZES, batch_size=256, seed=7)
    stream.next_batch()  # not the held-out batch
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)

    def held_out_loss() -> float:
        with torch.no_grad():
            return model(held_out)[0].item()

    before = held_out_loss()
    for _ in range(40):
        loss, _ = model(stream.next_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    after = held_out_loss()
    assert after < 0.85 * before, (before, after)


def test_training_forward_is_fx_traceable_for_the_pipeline():
    from torchrec.fx import symbolic_trace

    model = build_model(small_cfg("mmoe", True), tiny_schema(), SIZES, device=CPU)
    batch = SyntheticStream(tiny_schema(), SIZES, batch_size=8, seed=5).next_batch()
    traced = symbolic_trace(model)
    torch.testing.assert_close(traced(batch)[0], model(batch)[0])


@pytest.mark.parametrize("arch", ["esmm", "cgc"])
def test_no_click_batch_gives_finite_loss_and_gradients(arch):
    torch.manual_seed(0)
    model = build_model(small_cfg(arch, True), tiny_schema(), SIZES, device=CPU)
    batch = SyntheticStream(tiny_schema(), SIZES, batch_size=16, seed=2).next_batch()
    zeros = torch.zeros(16)
    no_click = type(batch).from_labels(batch.sparse_features, zeros, zeros, weighted_features=batch.weighted_features)
    loss, out = model(no_click)
    loss.backward()
    assert torch.isfinite(loss)
    if "loss_cvr" in out:
        assert out["loss_cvr"].item() == 0.0
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_checkpoint_from_before_the_ebc_split_fails_loudly(tmp_path):
    """A checkpoint with every table under ``embedding_bag_collection`` (the single weighted EBC of
    before the split) does not load silently into the split model: the weighted EBC's keys are named."""
    import torch.distributed.checkpoint as dcp

    from ctnocvr_rec.train.checkpoint import CheckpointLoadError, load_model_weights

    model = build_model(small_cfg("mmoe", True), tiny_schema(), SIZES, device=CPU)
    old_layout = {
        k.replace("weighted_embedding_bag_collection", "embedding_bag_collection"): v
        for k, v in model.state_dict().items()
    }
    dcp.save({"model": old_layout}, checkpoint_id=str(tmp_path))
    # DCP's CheckpointException (a BaseException) becomes one CheckpointLoadError line naming the key;
    # verify=False: a bare DCP folder has no meta.json (with checksums) to verify against
    with pytest.raises(CheckpointLoadError, match=r"Missing key.*sparse_arch\.weighted_embedding_bag_collection"):
        load_model_weights(tmp_path, model, verify=False)


def test_evaluation_filler_batch_follows_the_split():
    """The empty stand-in batch of an exhausted rank (train/evaluate.py) puts the weighted tables'
    keys in weighted_features, found from the model itself, and runs through the model."""
    from ctnocvr_rec.train.evaluate import empty_batch, model_weighted_feature_names

    schema = tiny_schema()
    model = build_model(small_cfg("cgc", True), schema, SIZES, device=CPU).eval()
    weighted = model_weighted_feature_names(model)
    assert weighted == schema.weighted_feature_names == ["f_u_hist", "f_u_tag", "f_i_tag"]
    batch = empty_batch(schema.feature_names, weighted)
    assert batch.sparse_features.keys() == schema.unweighted_feature_names
    assert batch.sparse_features.weights_or_none() is None
    assert batch.weighted_features.keys() == weighted
    with torch.no_grad():
        _, out = model(batch)
    assert out["p_ctr"].shape == (1,) and torch.isfinite(out["loss"])
    assert empty_batch(["f_a"], []).weighted_features is None
