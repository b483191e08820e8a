# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Omni-SMoLA building blocks (arXiv 2312.00968): soft mixtures of low-rank experts on a frozen linear layer.

Hub-safe: imports only torch, and is copied next to any checkpoint whose modeling file imports it.

- `smola_mixture`: the functional core, y_delta = scaling * sum_g sum_i w_{g,i}(x) * B_{g,i} A_{g,i} x, computed with
  no Python loop over experts: every A stacked as one (E*r, in) weight (one matmul, the router's rows fused into it),
  each expert's rank block scaled by its soft weight, every B stacked as one (out, E*r) weight (one matmul).
- `SMoLALinear`: a frozen `nn.Linear` plus that mixture. Experts are organised in groups (for example "text",
  "vision", "multimodal"). Router softmax runs over the experts of each group separately. A token of modality m uses
  group m plus the shared groups ("multimodal"); without modality ids every group is active. Per token, hence safe
  for causal decoding. B starts at zero, so a fresh layer equals its base exactly.
- `SoftMoESlots`: the slot-based Soft MoE of Puigcerver et al. (dispatch = softmax over tokens per slot, combine =
  softmax over slots per token) with low-rank experts. It mixes every token of a sequence into every slot, so it is
  only for bidirectional token sets (image tokens, a connector's inputs) and refuses causal use.
- `smola_modality_ids`: a context manager that hands per-token modality ids to every SMoLA layer of a model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


DEFAULT_EXPERT_GROUPS = ("text", "vision", "multimodal")
DEFAULT_SHARED_GROUPS = ("multimodal",)


def modality_group_table(expert_groups: Sequence[str], shared_groups: Sequence[str]) -> torch.Tensor:
    """(modalities, groups) bool table: row m = the groups a token of modality m uses.

    Modalities are the non-shared groups in order (modality id 0 = the first one, "text" by default); each uses its
    own group plus every shared group.
    """
    groups = list(expert_groups)
    if len(set(groups)) != len(groups) or not groups:
        raise ValueError(f"expert_groups must be non-empty and unique, got {groups}")
    unknown = [g for g in shared_groups if g not in groups]
    if unknown:
        raise ValueError(f"shared_groups {unknown} are not in expert_groups {groups}")
    shared = torch.tensor([g in shared_groups for g in groups])
    modalities = [i for i, g in enumerate(groups) if g not in shared_groups]
    if not modalities:  # only shared groups: one modality that uses all of them
        return shared[None].clone()
    table = shared[None].repeat(len(modalities), 1)
    table[torch.arange(len(modalities)), torch.tensor(modalities)] = True
    return table


def smola_mixture(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    num_groups: int,
    scaling: float,
    group_mask: torch.Tensor | None = None,
    dropout: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft mixture of low-rank experts, without a Python loop over experts.

    x: (..., in); router_weight: (E, in) with E = groups * experts_per_group, expert e in group e // experts_per_group;
    lora_A: (E * r, in), rows [e*r, (e+1)*r) are expert e's A; lora_B: (out, E * r); group_mask: (..., groups) bool,
    the groups active for each token (None: all). Returns (delta (..., out), router_logits (..., E) in fp32).
    """
    num_experts = router_weight.shape[0]
    rank = lora_A.shape[0] // num_experts
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    if dropout is None or (isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)):
        # router and every A in one matmul
        both = F.linear(x2, torch.cat([router_weight.to(x2.dtype), lora_A.to(x2.dtype)]))  # (tokens, E + E*r)
        router_logits, h = both.split([num_experts, num_experts * rank], dim=-1)
    else:
        router_logits = F.linear(x2, router_weight.to(x2.dtype))
        h = F.linear(dropout(x2), lora_A.to(x2.dtype))  # (tokens, E*r)
    router_logits = router_logits.float()
    # softmax over the experts of each group separately
    weights = router_logits.view(-1, num_groups, num_experts // num_groups).softmax(dim=-1)  # (tokens, G, n)
    if group_mask is not None:
        weights = weights * group_mask.reshape(-1, num_groups, 1).to(weights.dtype)
    weights = (weights * scaling).view(-1, num_experts, 1).to(h.dtype)  # scaling folded into the weights
    h = (h.view(-1, num_experts, rank) * weights).view(-1, num_experts * rank)  # each rank block scaled
    delta = F.linear(h, lora_B.to(h.dtype))  # (tokens, out): every B in one matmul
    return delta.view(*lead, -1), router_logits.view(*lead, num_experts)


def init_smola_parameters(router_weight, lora_A, lora_B, router_std: float = 0.02) -> None:
    """A: LoRA's kaiming-uniform per expert block; B: zeros (the layer starts as its base); router: small normal."""
    with torch.no_grad():
        in_features = lora_A.shape[1]
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
        lora_A.uniform_(-bound, bound)
        lora_B.zero_()
        router_weight.normal_(0.0, router_std)


class SMoLALinear(nn.Module):
    """y = W x + b + scaling * sum_g sum_i w_{g,i}(x) B_{g,i} A_{g,i} x on a frozen `nn.Linear`.

    Args:
        base_layer: the frozen linear (its parameters get `requires_grad=False`).
        expert_groups: names of the expert groups, e.g. ("text", "vision", "multimodal").
        shared_groups: groups every token uses ("multimodal"); the others are the modalities, in order.
        num_experts: experts per group. r: rank of every expert. alpha: scaling = alpha / r.
        dropout: dropout on the experts' input (LoRA style; the router sees the clean input).

    Modality ids (`(...)` integers matching x's leading dims, id m = the m-th non-shared group) are passed to forward
    or set for a whole model with `smola_modality_ids(model, ids)`.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        expert_groups: Sequence[str] = DEFAULT_EXPERT_GROUPS,
        shared_groups: Sequence[str] = DEFAULT_SHARED_GROUPS,
        num_experts: int = 4,
        r: int = 4,
        alpha: float = 8.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if num_experts < 1 or r < 1:
            raise ValueError(f"num_experts and r must be positive, got {num_experts} and {r}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.expert_groups, self.shared_groups = list(expert_groups), list(shared_groups)
        self.num_groups, self.num_experts, self.r = len(self.expert_groups), num_experts, r
        self.scaling = alpha / r
        total = self.num_groups * num_experts
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
        if not dtype.is_floating_point:  # quantized base: keep the adapter in fp32
            dtype = torch.float32
        self.router = nn.Parameter(torch.empty(total, self.in_features, device=device, dtype=dtype))
        self.lora_A = nn.Parameter(torch.empty(total * r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, total * r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        modality_group_table(self.expert_groups, self.shared_groups)  # validates the groups
        # not a buffer: transformers builds models on the meta device and a non-persistent buffer would stay empty
        self._modality_tables: dict[torch.device, torch.Tensor] = {}
        self.modality_ids: torch.Tensor | None = None  # set by `smola_modality_ids`
        self.reset_parameters()

    def reset_parameters(self):
        init_smola_parameters(self.router, self.lora_A, self.lora_B)

    @property
    def weight(self):  # code that inspects `layer.weight` (dtype, device) keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def group_mask(self, modality_ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        if modality_ids is None:
            return None
        modality_ids = resolve_modality_ids(modality_ids, x.shape[:-1])
        table = self._modality_tables.get(x.device)
        if table is None:
            table = modality_group_table(self.expert_groups, self.shared_groups).to(x.device)
            self._modality_tables[x.device] = table
        return table[modality_ids.to(x.device).long()]  # (..., G)

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        result = self.base_layer(x)
        ids = modality_ids if modality_ids is not None else self.modality_ids
        delta, _ = smola_mixture(
            x, self.router, self.lora_A, self.lora_B, self.num_groups, self.scaling, self.group_mask(ids, x),
            self.dropout if isinstance(self.dropout, nn.Dropout) else None,
        )
        return result + delta.to(result.dtype)

    def merge(self, *args, **kwargs):
        raise NotImplementedError(SOFT_MIXTURE_MERGE_ERROR)

    def extra_repr(self) -> str:
        return (
            f"groups={self.expert_groups}, shared={self.shared_groups}, experts_per_group={self.num_experts}, "
            f"r={self.r}, scaling={self.scaling}"
        )


SOFT_MIXTURE_MERGE_ERROR = (
    "SMoLA adapters can't be merged into the base weights: the expert weights w(x) are computed from each token's "
    "input (a soft mixture), so sum_i w_i(x) B_i A_i is not one fixed matrix. Keep the adapter unmerged (or save it "
    "with save_pretrained and load it with the base model)."
)


def resolve_modality_ids(modality_ids: torch.Tensor | None, tokens: Sequence[int]) -> torch.Tensor | None:
    """Modality ids for a forward over `tokens` = (batch, seq) positions.

    Ids of the same shape are used as they are. Ids longer than the input come from a prompt during cached
    decoding (generate() passes the prompt's ids at every step): the new tokens were generated, so they are text,
    modality 0.
    """
    if modality_ids is None:
        return None
    tokens = tuple(tokens)
    if tuple(modality_ids.shape) == tokens:
        return modality_ids
    if modality_ids.dim() == 2 and modality_ids.shape[0] == tokens[0] and tokens[1] < modality_ids.shape[1]:
        return torch.zeros(tokens, dtype=torch.long, device=modality_ids.device)
    raise ValueError(f"modality_ids has shape {tuple(modality_ids.shape)}, the input has {tokens} tokens")


def _smola_layers(model: nn.Module) -> list[nn.Module]:
    # A SMoLA layer holds ids (a tensor or None); `UniMoEModel.modality_ids` is a method and must not be overwritten.
    return [m for m in model.modules() if hasattr(m, "modality_ids") and not callable(m.modality_ids)]


def set_forward_modality_ids(model: nn.Module, modality_ids: torch.Tensor | None) -> None:
    """Called at the start of a model's forward with the `modality_ids` it was given (maybe None).

    Ids given to a forward stay on the layers after it returns, so activation checkpointing recomputes the layers
    with the same ids during backward; the next forward replaces them (a forward without ids clears ids a previous
    forward set, and leaves alone ids set by an enclosing `smola_modality_ids`).
    """
    for layer in _smola_layers(model):
        if modality_ids is not None:
            layer.modality_ids, layer._ids_from_forward = modality_ids, True
        elif getattr(layer, "_ids_from_forward", False):
            layer.modality_ids, layer._ids_from_forward = None, False


@contextmanager
def smola_modality_ids(model: nn.Module, modality_ids: torch.Tensor | None):
    """Within the block, every SMoLA layer of `model` routes with these per-token modality ids.

    For calls that can't take a `modality_ids` argument (peft's `generate`). With activation checkpointing, run the
    backward inside the block too (the recomputation reads the ids).
    """
    layers = _smola_layers(model)
    for layer in layers:
        layer.modality_ids, layer._ids_from_forward = modality_ids, False
    try:
        yield
    finally:
        for layer in layers:
            layer.modality_ids = None


class SoftMoESlots(nn.Module):
    """Slot-based Soft MoE (Puigcerver et al., 2023) with low-rank experts, for bidirectional token sets.

    logits = X Phi (batch, tokens, slots); dispatch D = softmax over tokens (per slot); slot inputs = D^T X;
    expert e processes its `slots_per_expert` slots: B_e A_e x; combine C = softmax over slots (per token);
    output = C (expert outputs). Every output token depends on every input token: never use it in causal decoding
    (forward(causal=True) raises). Padding (attention_mask == 0) is excluded from the slots and gets zero output.
    B starts at zero.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 4, slots_per_expert: int = 1, r: int = 4):
        super().__init__()
        self.num_experts, self.slots_per_expert, self.r = num_experts, slots_per_expert, r
        self.slot_embeddings = nn.Parameter(torch.randn(in_features, num_experts * slots_per_expert) / in_features**0.5)
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features).uniform_(-1, 1) / in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r))

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        if causal:
            raise ValueError(
                "SoftMoESlots mixes every token into every slot (dispatch is a softmax over the whole sequence), so "
                "future tokens would leak into earlier positions; use SMoLALinear (per-token) for causal decoding."
            )
        # x: (batch, tokens, in)
        logits = torch.einsum("btd,ds->bts", x, self.slot_embeddings.to(x.dtype)).float()
        if attention_mask is not None:
            keep = attention_mask.bool()[..., None]  # (batch, tokens, 1)
            dispatch = logits.masked_fill(~keep, float("-inf")).softmax(dim=1)  # over tokens, per slot
            dispatch = torch.nan_to_num(dispatch)  # an all-padding row
        else:
            dispatch = logits.softmax(dim=1)
        combine = logits.softmax(dim=-1)  # over slots, per token
        slots = torch.einsum("bts,btd->bsd", dispatch.to(x.dtype), x)  # (batch, slots, in)
        slots = slots.view(x.shape[0], self.num_experts, self.slots_per_expert, -1)
        h = torch.einsum("bepd,erd->bepr", slots, self.lora_A.to(x.dtype))
        out = torch.einsum("bepr,eor->bepo", h, self.lora_B.to(x.dtype)).flatten(1, 2)  # (batch, slots, out)
        y = torch.einsum("bts,bso->bto", combine.to(x.dtype), out)
        if attention_mask is not None:
            y = y * keep.to(y.dtype)
        return y


__all__ = [
    "DEFAULT_EXPERT_GROUPS",
    "DEFAULT_SHARED_GROUPS",
    "SMoLALinear",
    "SOFT_MIXTURE_MERGE_ERROR",
    "SoftMoESlots",
    "init_smola_parameters",
    "modality_group_table",
    "resolve_modality_ids",
    "set_forward_modality_ids",
    "smola_mixture",
    "smola_modality_ids",
]
