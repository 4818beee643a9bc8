"""The serving program on tiny models: plain tensors in, every ranker's generic outputs out; the float
program is exported with a dynamic batch size and dynamic id counts; the int8 program stays close."""

from __future__ import annotations

import pytest
import torch

from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.models import ARCHS, build_model
from ctnocvr_rec.models.testing import TINY_SIZES, SyntheticStream, tiny_model_config, tiny_schema
from ctnocvr_rec.serving.contract import OUTPUTS
from ctnocvr_rec.serving.program import (
    ServingProgram,
    example_inputs,
    export_float,
    kjt_to_inputs,
    quantize_int8,
)

CPU = torch.device("cpu")


def tiny_ranker(arch: str = "ple", use_ctnocvr: bool = True, schema: FieldSchema | None = None,
                sizes: dict[str, int] | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_model_config(arch, use_ctnocvr), schema or tiny_schema(), sizes or TINY_SIZES,
                       device=CPU).eval()


@pytest.mark.parametrize("arch,use_ctnocvr", [(a, f) for a in ARCHS for f in (False, True)])
def test_program_returns_the_rankers_own_outputs(arch, use_ctnocvr):
    model = tiny_ranker(arch, use_ctnocvr)
    batch = SyntheticStream(tiny_schema(), TINY_SIZES, batch_size=16, seed=3).next_batch()
    with torch.no_grad():
        got = ServingProgram(model)(*kjt_to_inputs(batch.sparse_features, batch.weighted_features, 16))
        _, out = model(batch)
    assert got.shape == (16, 4)
    torch.testing.assert_close(got, torch.stack([out[c] for c in OUTPUTS], dim=1), rtol=0, atol=0)


def test_float_program_has_dynamic_batch_and_id_counts():
    model = tiny_ranker()
    program = ServingProgram(model).eval()
    exported = export_float(model, example_inputs(model, batch_size=8)).module()
    for batch_size, seed in ((1, 1), (8, 2), (300, 3)):  # 1 and > the example's 8
        batch = SyntheticStream(tiny_schema(), TINY_SIZES, batch_size=batch_size, seed=seed).next_batch()
        inputs = kjt_to_inputs(batch.sparse_features, batch.weighted_features, batch_size)
        with torch.no_grad():
            diff = (exported(*inputs) - program(*inputs)).abs().max().item()
        assert diff <= 1e-5, (batch_size, diff)
    # the id counts differ from the example's: the dynamic dims really are dynamic
    assert inputs[0].numel() != example_inputs(model, batch_size=8)[0].numel()


def test_unweighted_schema_exports_without_weighted_inputs():
    schema = FieldSchema.from_dict({"fields": [
        {"name": "u", "group": "user"}, {"name": "i", "group": "item"},
        {"name": "h", "group": "user", "multi_valued": True}]})
    sizes = {"u": 9, "i": 11, "h": 13}
    model = tiny_ranker("mmoe", True, schema, sizes)
    assert model.sparse_arch.weighted_embedding_bag_collection is None
    exported = export_float(model, example_inputs(model, batch_size=8)).module()
    batch = SyntheticStream(schema, sizes, batch_size=33, seed=9).next_batch()
    inputs = kjt_to_inputs(batch.sparse_features, None, 33)
    assert inputs[2].numel() == 0 and inputs[3].shape == (0, 1)
    with torch.no_grad():
        torch.testing.assert_close(exported(*inputs), ServingProgram(model)(*inputs), rtol=0, atol=1e-6)


def test_int8_program_is_close_and_leaves_the_ranker_float():
    model = tiny_ranker()
    scripted = quantize_int8(model)
    assert model.sparse_arch.embedding_bag_collection.embedding_bags["t_ctx"].weight.dtype == torch.float32
    batch = SyntheticStream(tiny_schema(), TINY_SIZES, batch_size=64, seed=5).next_batch()
    inputs = kjt_to_inputs(batch.sparse_features, batch.weighted_features, 64)
    with torch.no_grad():
        diff = (scripted(*inputs) - ServingProgram(model)(*inputs)).abs().max().item()
    assert 0 < diff < 1e-3  # quantised (not the float tables) and close


@pytest.mark.slow
def test_aot_package_of_the_float_program_matches(tmp_path):
    """AOTInductor compiles C++ for this CPU: slow (about a minute for this tiny model on 2 cores)."""
    from ctnocvr_rec.serving.program import compile_aot

    model = tiny_ranker("mmoe")
    exported = export_float(model, example_inputs(model, batch_size=8))
    seconds = compile_aot(exported, tmp_path / "model_aot.pt2")
    package = torch._inductor.aoti_load_package(str(tmp_path / "model_aot.pt2"))
    program = ServingProgram(model).eval()
    for batch_size, seed in ((1, 1), (300, 3)):
        batch = SyntheticStream(tiny_schema(), TINY_SIZES, batch_size=batch_size, seed=seed).next_batch()
        inputs = kjt_to_inputs(batch.sparse_features, batch.weighted_features, batch_size)
        with torch.no_grad():
            assert (package(*inputs) - program(*inputs)).abs().max().item() <= 1e-5
    assert seconds > 0
