# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Mixture-of-Experts building blocks shared by every architecture of the package.

Hub-safe: this file imports only torch and transformers, and is copied next to any checkpoint whose modeling file
imports it (`from .moe_layers import ...`).

- `MoERouter`: bias-free linear gate with fp32 logits and the two top-k variants found in the seed papers.
- `MLPExperts` / `SwiGLUExperts`: E experts stored as 3D parameters and run through transformers' experts interface
  (`config._experts_implementation` = "eager" | "batched_mm" | "grouped_mm" | any registered backend), so one
  switch picks the kernel. The eager path below is the reference every other backend is tested against.
- `load_balancing_loss` / `router_z_loss`: the auxiliary losses, written for (tokens, experts) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation


ROUTING_MODES = ("topk_softmax", "softmax_topk")


class MoERouter(nn.Module):
    """Bias-free linear gate. Logits are computed in fp32 because bf16 softmax over experts ties too often.

    routing_mode:
      - "topk_softmax": top-k on the logits, softmax over the k selected (Mixtral, Uni-MoE). Weights sum to 1.
      - "softmax_topk": softmax over all experts, then keep the k largest *without* renormalising (the official
        Alt-MoE / M3-JEPA code). Weights sum to <= 1, so the router can scale the whole expert contribution down.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, routing_mode: str = "topk_softmax"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if routing_mode not in ROUTING_MODES:
            raise ValueError(f"routing_mode must be one of {ROUTING_MODES}, got {routing_mode!r}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.routing_mode = routing_mode
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # hidden_states: (tokens, hidden)
        router_logits = F.linear(hidden_states.float(), self.weight.float())  # (tokens, experts), fp32
        if self.routing_mode == "topk_softmax":
            top_logits, top_k_index = router_logits.topk(self.top_k, dim=-1)  # (tokens, k)
            top_k_weights = top_logits.softmax(dim=-1)
        else:
            probs = router_logits.softmax(dim=-1)
            top_k_weights, top_k_index = probs.topk(self.top_k, dim=-1)  # (tokens, k), not renormalised
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index


@use_experts_implementation(has_gate=False, has_bias=True)
class MLPExperts(nn.Module):
    """E two-layer MLP experts, Linear(H, I) -> act -> Linear(I, H) with biases (the Alt-MoE connector's experts).

    Weights follow transformers' experts layout, (experts, out_features, in_features).
    """

    def __init__(self, config, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu"):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj_bias = nn.Parameter(torch.zeros(num_experts, intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        # Eager reference: loop over the experts that received tokens (at most E iterations, not one per token).
        final = torch.zeros_like(hidden_states)  # (tokens, hidden)
        # unbind once (see SwiGLUExperts): indexing `param[e]` would build a full-size zero gradient per expert
        up, up_bias = self.up_proj.unbind(0), self.up_proj_bias.unbind(0)
        down, down_bias = self.down_proj.unbind(0), self.down_proj_bias.unbind(0)
        for expert_idx in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == expert_idx)
            x = F.linear(hidden_states[token_idx], up[expert_idx], up_bias[expert_idx])
            x = F.linear(self.act_fn(x), down[expert_idx], down_bias[expert_idx])
            final.index_add_(0, token_idx, (x * top_k_weights[token_idx, slot, None]).to(final.dtype))
        return final


@use_experts_implementation(has_gate=True, has_bias=False)
class SwiGLUExperts(nn.Module):
    """E SwiGLU experts (Llama/Mistral FFNs): down(act(gate(x)) * up(x)), gate and up stored concatenated.

    gate_up_proj: (experts, 2 * intermediate, hidden), down_proj: (experts, hidden, intermediate).
    """

    def __init__(self, config, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)  # (tokens, hidden)
        # unbind once: its backward stacks the per-expert grads in one tensor, where `param[e]` would materialise a
        # full-size zero gradient per expert (3x slower at 64 experts on CPU).
        gate_up_proj, down_proj = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        for expert_idx in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == expert_idx)
            gate, up = F.linear(hidden_states[token_idx], gate_up_proj[expert_idx]).chunk(2, dim=-1)
            x = F.linear(self.act_fn(gate) * up, down_proj[expert_idx])
            final.index_add_(0, token_idx, (x * top_k_weights[token_idx, slot, None]).to(final.dtype))
        return final


def load_balancing_loss(router_logits: torch.Tensor, top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard balance loss: E * sum_e f_e * P_e.

    f_e: fraction of (token, slot) assignments that went to expert e; P_e: mean router probability of expert e.
    Equals 1 for perfectly uniform routing and grows as routing collapses.
    """
    # router_logits: (tokens, experts); top_k_index: (tokens, k)
    probs = router_logits.float().softmax(dim=-1)
    counts = F.one_hot(top_k_index, num_experts).float().sum(dim=(0, 1))  # (experts,)
    fraction = counts / top_k_index.numel()
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small and fp32-stable."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


def expert_usage(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of routed (token, slot) assignments per expert, shape (experts,), sums to 1."""
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).float()
    return counts / counts.sum().clamp_min(1)


def modality_expert_loss(
    router_logits: torch.Tensor, modality_ids: torch.Tensor, target_experts: torch.Tensor, loss_type: str = "l1"
) -> torch.Tensor:
    """Pushes each modality's tokens toward configured experts (the Uni-MoE 8-expert version's modality loss).

    router_logits: (tokens, experts); modality_ids: (tokens,) integers in [0, M); target_experts: (M, experts) bool,
    row m = the set S_m of experts modality m is pushed toward (an all-False row leaves that modality unconstrained).
    With p_t = softmax(router_logits[t]) and mass_t = sum_{e in S_m(t)} p_t,e:
      - "l1": mean_t (1 - mass_t), the probability mass routed outside S_m(t) (= half the L1 distance from p_t to the
        nearest distribution supported on S_m(t));
      - "ce": mean_t -log(mass_t).
    The mean runs over constrained tokens only; 0 when there are none.
    """
    probs = router_logits.float().softmax(dim=-1)  # (tokens, experts)
    token_targets = target_experts.to(probs.device)[modality_ids]  # (tokens, experts) bool
    constrained = token_targets.any(dim=-1)  # (tokens,)
    if not bool(constrained.any()):
        return probs.sum() * 0.0
    mass = (probs * token_targets).sum(dim=-1)[constrained]  # (constrained tokens,)
    if loss_type == "l1":
        return (1.0 - mass).mean()
    if loss_type == "ce":
        return -mass.clamp_min(torch.finfo(mass.dtype).tiny).log().mean()
    raise ValueError(f"loss_type must be 'l1' or 'ce', got {loss_type!r}")


def modality_kl_loss(router_logits: torch.Tensor, modality_ids: torch.Tensor, num_modalities: int) -> torch.Tensor:
    """KL divergence between modalities' mean routing distributions.

    P_m = mean over the tokens of modality m of softmax(router_logits), shape (experts,). Returns the mean over ordered
    pairs (m, n), m != n, of modalities present in `modality_ids`, of KL(P_m || P_n) = sum_e P_m,e (log P_m,e - log
    P_n,e); 0 when fewer than two modalities are present. Minimising it aligns the modalities' routing; maximising it
    (a negative coefficient) separates them.
    """
    probs = router_logits.float().softmax(dim=-1)  # (tokens, experts)
    one_hot = F.one_hot(modality_ids.long(), num_modalities).to(probs.dtype)  # (tokens, M)
    counts = one_hot.sum(dim=0)  # (M,)
    present = counts > 0
    if int(present.sum()) < 2:
        return probs.sum() * 0.0
    mean_probs = (one_hot.T @ probs)[present] / counts[present, None]  # (present M, experts)
    log_p = mean_probs.clamp_min(torch.finfo(mean_probs.dtype).tiny).log()
    # kl[m, n] = sum_e P_m,e * (log P_m,e - log P_n,e)
    kl = (mean_probs * log_p).sum(dim=-1, keepdim=True) - mean_probs @ log_p.T  # (present M, present M)
    k = kl.shape[0]
    return (kl.sum() - kl.diagonal().sum()) / (k * (k - 1))
