"""Skip fbgemm's gradient of the per-sample weights when nothing needs it.

fbgemm's table-batched embedding (TBE, the kernel behind every fused TorchRec table) computes, in the
backward of a *weighted* lookup, the gradient of each id's per-sample weight
(``split_embedding_codegen_grad_indice_weights_cpu`` / its CUDA twin) unless it is told per feature
that the weights need none (``feature_requires_grad``). TorchRec never passes that argument, so
the kernel always runs. Our weights are data (the 14-day history counts, ``log(1 + count)``) and
never require a gradient, so this work is thrown away: on the Ali-CCP-shaped benchmark
(``tools/bench_train.py``, four weighted histories of ~69 ids per row in all) it was about a third
of the weighted tables' backward on CPU.

:func:`skip_per_sample_weight_grads` adds a forward pre-hook to every TBE of a (sharded) model that
passes ``feature_requires_grad = zeros(num_features)`` exactly when the call's
``per_sample_weights`` exist and do not require a gradient. The table gradients and the fused
optimiser update are unchanged (tested bit-for-bit); weights that do require a gradient (a learned
weighting) still get it.

Example:
    >>> from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ...     ComputeDevice, EmbeddingLocation, SplitTableBatchedEmbeddingBagsCodegen)
    >>> tbe = SplitTableBatchedEmbeddingBagsCodegen([(10, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)])
    >>> skip_per_sample_weight_grads(tbe)
    1
    >>> skip_per_sample_weight_grads(tbe, enable=False)  # removes the hooks again
    1
"""

from __future__ import annotations

from typing import Any

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

_HOOK_ATTR = "_ctnocvr_weight_grad_hook"


def _no_weight_grads(module: SplitTableBatchedEmbeddingBagsCodegen, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # forward(indices, offsets, per_sample_weights=None, feature_requires_grad=None, ...)
    weights = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
    given = len(args) > 3 or kwargs.get("feature_requires_grad") is not None
    if weights is None or weights.requires_grad or given:
        return args, kwargs
    zeros = getattr(module, "_ctnocvr_no_feature_grad", None)
    if zeros is None or zeros.device != weights.device:
        zeros = torch.zeros(len(module.feature_table_map), dtype=torch.int32, device=weights.device)
        module._ctnocvr_no_feature_grad = zeros
    return args, {**kwargs, "feature_requires_grad": zeros}


def table_batched_embeddings(model: torch.nn.Module) -> list[SplitTableBatchedEmbeddingBagsCodegen]:
    """Every fbgemm TBE inside ``model``, a DMP-sharded one included.

    TorchRec's sharded collections keep their lookups in a plain list (``_lookups``), outside
    ``named_modules()``, so they are walked explicitly.
    """
    found: dict[int, SplitTableBatchedEmbeddingBagsCodegen] = {}
    stack = [model]
    seen: set[int] = set()
    while stack:
        root = stack.pop()
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            if isinstance(module, SplitTableBatchedEmbeddingBagsCodegen):
                found[id(module)] = module
            lookups = getattr(module, "_lookups", None)
            if isinstance(lookups, (list, tuple, torch.nn.ModuleList)):
                stack.extend(m for m in lookups if isinstance(m, torch.nn.Module))
    return list(found.values())


def skip_per_sample_weight_grads(model: torch.nn.Module, enable: bool = True) -> int:
    """Add (``enable``) or remove the pre-hook on every fbgemm TBE inside ``model``.

    Returns the number of TBE modules touched. Adding twice keeps one hook.
    """
    touched = 0
    for module in table_batched_embeddings(model):
        handle = getattr(module, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            delattr(module, _HOOK_ATTR)
        if enable:
            setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(_no_weight_grads, with_kwargs=True))
        touched += 1
    return touched
