"""Gated mixture-of-experts extraction: MMoE, CGC and PLE as one parameterised module.

One :class:`ExtractionLevel` is a CGC layer (Tang et al. 2020; paper Sec. 2.3, eqs. 3-4): ``T`` tasks,
``m_k`` task-specific experts per task and ``m_s`` shared experts. Task ``k``'s gate is a one-layer
softmax over its own ``m_k`` experts followed by the ``m_s`` shared ones (the selection matrix
``S_k`` of eq. 4), and its output is ``f^k(x) = Softmax(W_g^k x) S_k(x)`` (eq. 3). The three
architectures are settings of the same module:

=========  ==================  ====================  =========================================
arch       task experts m_k    shared experts m_s    levels
=========  ==================  ====================  =========================================
MMoE       0                   ``num_experts``       1 (one softmax gate per task over all experts)
CGC        ``m_k``             ``m_s``               1
PLE        ``m_k``             ``m_s``               L; levels 1..L-1 also have a shared gate over
                                                     all experts, whose output feeds the next
                                                     level's shared experts
=========  ==================  ====================  =========================================

Speed: the experts are never run as a Python loop of small matmuls. At the first level every expert
sees the same input, so the first layer of *all* experts is one GEMM ``x @ [d, E*h]``; at later PLE
levels the task experts are one ``bmm`` over tasks and the shared experts one GEMM; deeper expert
layers are one ``baddbmm`` over experts with weights stacked as ``[E, h_in, h_out]``. Gates are one
GEMM (first level) or one ``bmm``, and mixing is one ``bmm`` with a block-masked gate matrix.

All counts are plain Python ints fixed at construction, so the module is fx-traceable
(``TrainPipelineSparseDist``) and exportable.

Example::

    mmoe = ExpertExtraction(in_features=414, num_tasks=3, num_task_experts=0, num_shared_experts=8,
                            expert_hidden=[16])
    cgc = ExpertExtraction(414, num_tasks=3, num_task_experts=4, num_shared_experts=4, expert_hidden=[16])
    ple = ExpertExtraction(414, 3, 4, 4, expert_hidden=[16], num_levels=2)
    h = cgc(x)            # x [B, 414] -> h [B, 3, 16]; h[:, k] feeds task k's tower
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def _uniform_(tensor: torch.Tensor, fan_in: int) -> None:
    """nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


class ExtractionLevel(nn.Module):
    """One CGC level: task-specific + shared experts, a softmax gate per task, optional shared gate.

    Args:
        in_features: width ``d`` of the level's input(s).
        num_tasks: ``T``.
        num_task_experts: ``m_k`` experts per task (0 for MMoE).
        num_shared_experts: ``m_s`` experts shared by all tasks.
        expert_hidden: layer widths of every expert MLP (ReLU after each layer); output width is
            the last entry.
        shared_input: True at the first level, where every expert and gate reads the same ``x``.
        shared_gate: True at intermediate PLE levels: also produce the shared branch's output
            through a softmax gate over all ``T*m_k + m_s`` experts.
        device: parameter device (``meta`` allowed; :meth:`reset_parameters` initialises).
        compute_align: at the first level, the GEMMs reading ``x`` run with their inner dim
            zero-padded to a multiple of this (same result, faster kernels; 1 disables). Parameters
            keep their true shapes.

    Call: ``forward(x_tasks, x_shared)`` with ``x_tasks`` ``[B, d]`` (``shared_input``) or
    ``[B, T, d]``, and ``x_shared`` ``[B, d]``. Returns ``(task_out [B, T, h], task_gates
    [B, T, m_k + m_s], shared_out [B, h] | None, shared_gate [B, T*m_k + m_s] | None)``.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_task_experts: int,
        num_shared_experts: int,
        expert_hidden: Sequence[int],
        shared_input: bool = True,
        shared_gate: bool = False,
        device: torch.device | None = None,
        compute_align: int = 16,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if num_task_experts < 0 or num_shared_experts < 0 or num_task_experts + num_shared_experts < 1:
            raise ValueError(
                "each task needs at least one expert: got num_task_experts="
                f"{num_task_experts}, num_shared_experts={num_shared_experts}"
            )
        if not expert_hidden or any(int(h) <= 0 for h in expert_hidden):
            raise ValueError(f"expert_hidden must be non-empty positive widths, got {list(expert_hidden)}")
        self.in_features = int(in_features)
        self.num_tasks = int(num_tasks)
        self.num_task_experts = int(num_task_experts)
        self.num_shared_experts = int(num_shared_experts)
        self.num_experts = self.num_tasks * self.num_task_experts + self.num_shared_experts
        self.expert_hidden = [int(h) for h in expert_hidden]
        self.out_features = self.expert_hidden[-1]
        self.shared_input = bool(shared_input)
        self.has_shared_gate = bool(shared_gate)
        self.compute_align = max(1, int(compute_align))
        d, t, mk, ms, h1 = self.in_features, self.num_tasks, self.num_task_experts, self.num_shared_experts, self.expert_hidden[0]
        kw = {"device": device}

        # First expert layer, kept per group so later PLE levels can feed each task its own input.
        self.task_weight = nn.Parameter(torch.empty(t, d, mk * h1, **kw)) if mk else None
        self.task_bias = nn.Parameter(torch.empty(t, mk * h1, **kw)) if mk else None
        self.shared_weight = nn.Parameter(torch.empty(d, ms * h1, **kw)) if ms else None
        self.shared_bias = nn.Parameter(torch.empty(ms * h1, **kw)) if ms else None
        # Deeper expert layers: one [E, h_in, h_out] stack per layer.
        self.deep_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(self.num_experts, a, b, **kw)) for a, b in zip(self.expert_hidden, self.expert_hidden[1:])]
        )
        self.deep_biases = nn.ParameterList(
            [nn.Parameter(torch.empty(self.num_experts, 1, b, **kw)) for b in self.expert_hidden[1:]]
        )
        # Gates (eq. 3): W_g^k is [d, m_k + m_s] per task.
        g = mk + ms
        self.gate_weight = nn.Parameter(torch.empty(t, d, g, **kw))
        self.gate_bias = nn.Parameter(torch.empty(t, g, **kw))
        self.shared_gate_weight = nn.Parameter(torch.empty(d, self.num_experts, **kw)) if shared_gate else None
        self.shared_gate_bias = nn.Parameter(torch.empty(self.num_experts, **kw)) if shared_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.in_features
        for p in (self.task_weight, self.task_bias, self.shared_weight, self.shared_bias, self.gate_weight,
                  self.gate_bias, self.shared_gate_weight, self.shared_gate_bias):
            if p is not None:
                _uniform_(p, d)
        for w, b, fan_in in zip(self.deep_weights, self.deep_biases, self.expert_hidden):
            _uniform_(w, fan_in)
            _uniform_(b, fan_in)

    @property
    def _inner_pad(self) -> int:
        """Zero columns added to ``x`` (and rows to the weights) in the first-level GEMMs.

        The products, and the gradients of every real entry, are unchanged (the extra terms are
        0 * 0); only the GEMM shapes change. Why: the backward GEMM ``grad [B, N] @ weight.T`` writes
        a ``[B, K]`` result, and with K = 414 (23 fields x 18) it ran at ~100 GFLOP/s on this
        project's CPU against ~130 for K = 416."""
        return -self.in_features % self.compute_align

    def _shared_input_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First level: every expert's first layer and every task's gate read the same ``x``: one GEMM
        ``[B, d] @ [d, E*h1]`` for the experts and one ``[B, d] @ [d, T*g]`` for the gates, on ``x``
        zero-padded once (see :attr:`_inner_pad`). (One GEMM for both was slower at wide sizes:
        splitting its ``[B, E*h1 + T*g]`` output leaves strided views for the ReLU and a concatenation
        in the backward.) Returns (expert pre-activations ``[B, E, h1]``, task experts first; gate
        logits ``[B, T, g]``)."""
        t, mk, h1 = self.num_tasks, self.num_task_experts, self.expert_hidden[0]
        g = mk + self.num_shared_experts
        weights: list[torch.Tensor] = []
        biases: list[torch.Tensor] = []
        if self.task_weight is not None and self.task_bias is not None:
            weights.append(self.task_weight.permute(1, 0, 2).reshape(self.in_features, t * mk * h1))
            biases.append(self.task_bias.reshape(t * mk * h1))
        if self.shared_weight is not None and self.shared_bias is not None:
            weights.append(self.shared_weight)
            biases.append(self.shared_bias)
        expert_weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=1)
        expert_bias = biases[0] if len(biases) == 1 else torch.cat(biases, dim=0)
        gate_weight = self.gate_weight.permute(1, 0, 2).reshape(self.in_features, t * g)
        pad = self._inner_pad
        if pad:  # a config-fixed int: no shape-dependent branch under fx tracing
            x = nn.functional.pad(x, (0, pad))
            expert_weight = nn.functional.pad(expert_weight, (0, 0, 0, pad))
            gate_weight = nn.functional.pad(gate_weight, (0, 0, 0, pad))
        expert_pre = torch.addmm(expert_bias, x, expert_weight).unflatten(1, (self.num_experts, h1))
        gate_logits = torch.addmm(self.gate_bias.reshape(t * g), x, gate_weight).unflatten(1, (t, g))
        return expert_pre, gate_logits

    def _task_input_layers(self, x_tasks: torch.Tensor, x_shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Later PLE levels: task ``k``'s experts and gate read ``x_tasks[:, k]``, the shared experts
        ``x_shared``. Returns (expert pre-activations ``[B, E, h1]``, gate logits ``[B, T, g]``)."""
        t, mk, ms, h1 = self.num_tasks, self.num_task_experts, self.num_shared_experts, self.expert_hidden[0]
        parts: list[torch.Tensor] = []
        per_task = x_tasks.transpose(0, 1)  # [T, B, d]
        if self.task_weight is not None and self.task_bias is not None:
            # One bmm over tasks, [T, B, m_k*h1].
            task_pre = torch.baddbmm(self.task_bias.unsqueeze(1), per_task, self.task_weight)
            parts.append(task_pre.transpose(0, 1).reshape(-1, t * mk, h1))
        if self.shared_weight is not None and self.shared_bias is not None:
            parts.append(torch.addmm(self.shared_bias, x_shared, self.shared_weight).unflatten(1, (ms, h1)))
        expert_pre = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        gate_logits = torch.baddbmm(self.gate_bias.unsqueeze(1), per_task, self.gate_weight).transpose(0, 1)
        return expert_pre, gate_logits

    def forward(
        self, x_tasks: torch.Tensor, x_shared: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        t, mk = self.num_tasks, self.num_task_experts
        if self.shared_input:
            expert_pre, gate_logits = self._shared_input_layers(x_tasks)
        else:
            expert_pre, gate_logits = self._task_input_layers(x_tasks, x_shared)
        experts = torch.relu(expert_pre)  # [B, E, h1]
        if len(self.deep_weights) > 0:
            hidden = experts.transpose(0, 1)  # [E, B, h]
            for w, b in zip(self.deep_weights, self.deep_biases):
                hidden = torch.relu(torch.baddbmm(b, hidden, w))
            experts = hidden.transpose(0, 1)  # [B, E, h_last]

        gates = torch.softmax(gate_logits, dim=-1)  # [B, T, m_k + m_s]
        if mk:
            # Spread each task's gate over all E experts (zeros on the other tasks' experts) so the
            # mixing is one bmm [B, T, E] @ [B, E, h]: the selection S_k of eq. 4 as a block mask.
            block = torch.eye(t, dtype=gates.dtype, device=gates.device).view(1, t, t, 1)
            own = (gates[:, :, :mk].unsqueeze(2) * block).flatten(2)  # [B, T, T*m_k]
            mixing = torch.cat([own, gates[:, :, mk:]], dim=2) if self.num_shared_experts else own
        else:
            mixing = gates
        task_out = torch.bmm(mixing, experts)  # [B, T, h]

        shared_out: torch.Tensor | None = None
        shared_gate: torch.Tensor | None = None
        if self.shared_gate_weight is not None and self.shared_gate_bias is not None:
            shared_gate = torch.softmax(torch.addmm(self.shared_gate_bias, x_shared, self.shared_gate_weight), dim=-1)
            shared_out = torch.bmm(shared_gate.unsqueeze(1), experts).squeeze(1)
        return task_out, gates, shared_out, shared_gate


class ExpertExtraction(nn.Module):
    """MMoE / CGC / PLE: ``num_levels`` stacked :class:`ExtractionLevel` s.

    Args:
        in_features: input width ``d``.
        num_tasks: ``T`` (2 for CTR+CVR, 3 with CTnoCVR).
        num_task_experts: ``m_k`` (0 gives MMoE).
        num_shared_experts: ``m_s`` (MMoE: its number of experts).
        expert_hidden: layer widths of each expert (paper sweep: {16, 8, 4} units).
        num_levels: 1 = MMoE/CGC; >1 = PLE (intermediate levels carry a shared gate).
        device: parameter device.

    Call: ``x`` ``[B, d]`` -> ``[B, T, expert_hidden[-1]]`` (row ``[:, k]`` is task k's ``f^k(x)``).
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_task_experts: int,
        num_shared_experts: int,
        expert_hidden: Sequence[int],
        num_levels: int = 1,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.num_tasks = int(num_tasks)
        self.out_features = int(expert_hidden[-1])
        levels = []
        width = int(in_features)
        for level in range(num_levels):
            levels.append(
                ExtractionLevel(
                    width,
                    num_tasks,
                    num_task_experts,
                    num_shared_experts,
                    expert_hidden,
                    shared_input=level == 0,
                    shared_gate=level < num_levels - 1,
                    device=device,
                )
            )
            width = levels[-1].out_features
        self.levels = nn.ModuleList(levels)

    def forward_with_gates(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``x`` ``[B, d]`` -> (``[B, T, h]``, task gates per level ``[B, T, m_k+m_s]``,
        shared gates of the intermediate levels ``[B, T*m_k+m_s]``)."""
        task_gates: list[torch.Tensor] = []
        shared_gates: list[torch.Tensor] = []
        x_tasks, x_shared = x, x
        for level in self.levels:
            out, gates, shared_out, shared_gate = level(x_tasks, x_shared)
            task_gates.append(gates)
            if shared_out is not None and shared_gate is not None:
                shared_gates.append(shared_gate)
                x_shared = shared_out
            x_tasks = out
        return x_tasks, task_gates, shared_gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_gates(x)[0]
