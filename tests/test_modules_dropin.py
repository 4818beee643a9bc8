"""The README's drop-in snippet: torchrec's DLRM gains CTR/CVR/CTnoCVR tasks in a few lines."""

from __future__ import annotations

import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnocvr_rec.modules import CtnocvrHead, MultiTaskOverArch


def _dlrm(embedding_dim: int = 8) -> DLRM:
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=embedding_dim, num_embeddings=50, feature_names=[f])
        for f in ("user", "item", "ctx")
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=torch.device("cpu")),
        dense_in_features=4,
        dense_arch_layer_sizes=[16, embedding_dim],
        over_arch_layer_sizes=[16, 1],
    )


def _batch(batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 50, (3 * batch_size,), generator=gen)
    kjt = KeyedJaggedTensor(keys=["user", "item", "ctx"], values=ids, lengths=torch.ones(3 * batch_size, dtype=torch.int32))
    dense = torch.randn(batch_size, 4, generator=gen)
    item = ids[batch_size : 2 * batch_size]
    click = (item % 3 == 0).float()  # learnable: depends on the item id
    conversion = click * (item % 2 == 0).float()
    return dense, kjt, click, conversion


def test_dlrm_gains_the_ctnocvr_task_in_a_few_lines():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    dlrm = _dlrm()

    # --- the snippet (docs/dropin.md) -----------------------------------------------------------
    num_sparse, dim = 3, 8
    over_in = dim + num_sparse * (num_sparse - 1) // 2 + num_sparse  # DLRM's over-arch input width
    dlrm.over_arch = MultiTaskOverArch(over_in, num_tasks=3, num_task_experts=2, num_shared_experts=2,
                                       expert_hidden=[16], tower_hidden=[32, 16])  # CGC over CTR/CVR/CTnoCVR
    head = CtnocvrHead("tower", {"ctr": 1.0, "cvr": 0.5, "ctnocvr": 1.0, "score": 0.01})

    dense, kjt, click, conversion = _batch(256, gen)
    logits = dlrm(dense, kjt)  # [B, 3]
    loss, out = head(logits[:, 0], logits[:, 1], logits[:, 2], click, conversion)
    # ---------------------------------------------------------------------------------------------

    assert logits.shape == (256, 3)
    assert set(out) >= {"p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr", "loss_ctr", "loss_cvr", "loss_ctnocvr", "loss_score"}
    loss.backward()
    assert dlrm.sparse_arch.embedding_bag_collection.embedding_bags["t_item"].weight.grad.abs().max() > 0

    # and it trains
    optimizer = torch.optim.Adam(list(dlrm.parameters()), lr=0.01)
    held_out = _batch(1024, torch.Generator().manual_seed(99))

    def held_out_loss() -> float:
        with torch.no_grad():
            lg = dlrm(held_out[0], held_out[1])
            return head(lg[:, 0], lg[:, 1], lg[:, 2], held_out[2], held_out[3])[0].item()

    before = held_out_loss()
    for _ in range(30):
        dense, kjt, click, conversion = _batch(256, gen)
        logits = dlrm(dense, kjt)
        loss, _ = head(logits[:, 0], logits[:, 1], logits[:, 2], click, conversion)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out_loss() < 0.8 * before
