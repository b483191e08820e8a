# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""peft tuner layer of Omni-SMoLA. The math is `smola_mixture` of the Hub-safe `modeling/smola_layers.py` (shared
with `OmniSMoLAForConditionalGeneration`); this file only adds peft's multi-adapter bookkeeping."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...modeling.smola_layers import (
    SMoLALinear,
    SOFT_MIXTURE_MERGE_ERROR,
    SoftMoESlots,
    init_smola_parameters,
    modality_group_table,
    resolve_modality_ids,
    smola_mixture,
    smola_modality_ids,
)


class SMoLALayer(BaseTunerLayer):
    adapter_layer_names = ("smola_router", "smola_A", "smola_B")
    other_param_names = ("smola_r", "smola_scaling", "smola_groups", "smola_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.smola_router = nn.ParameterDict({})
        self.smola_A = nn.ParameterDict({})
        self.smola_B = nn.ParameterDict({})
        self.smola_dropout = nn.ModuleDict({})
        self.smola_r, self.smola_scaling, self.smola_groups = {}, {}, {}
        self.modality_ids: torch.Tensor | None = None  # set by `smola_modality_ids`
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SMoLA only adapts nn.Linear layers, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        groups, shared = list(config.expert_groups), list(config.shared_groups)
        table = modality_group_table(groups, shared)
        total = len(groups) * config.num_experts
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        factory = dict(device=weight.device, dtype=dtype)
        self.smola_router[adapter_name] = nn.Parameter(torch.empty(total, self.in_features, **factory))
        self.smola_A[adapter_name] = nn.Parameter(torch.empty(total * config.r, self.in_features, **factory))
        self.smola_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, total * config.r, **factory))
        init_smola_parameters(self.smola_router[adapter_name], self.smola_A[adapter_name], self.smola_B[adapter_name])
        self.smola_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.smola_r[adapter_name] = config.r
        self.smola_scaling[adapter_name] = config.alpha / config.r
        self.smola_groups[adapter_name] = table
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)


class SMoLAPeftLinear(nn.Module, SMoLALayer):
    """A frozen `nn.Linear` plus one soft mixture of low-rank experts per active adapter."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        SMoLALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(SOFT_MIXTURE_MERGE_ERROR)

    def unmerge(self) -> None:  # nothing is ever merged
        return None

    def get_delta_weight(self, adapter) -> torch.Tensor:
        raise NotImplementedError(SOFT_MIXTURE_MERGE_ERROR)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        ids = self.modality_ids
        ids = resolve_modality_ids(ids, x.shape[:-1])  # longer ids during cached decoding: new tokens are text
        for name in self.active_adapters:
            if name not in self.smola_A:
                continue
            table = self.smola_groups[name].to(x.device)
            mask = None if ids is None else table[ids.to(x.device).long()]
            dropout = self.smola_dropout[name]
            delta, _ = smola_mixture(
                x, self.smola_router[name], self.smola_A[name], self.smola_B[name], table.shape[1],
                self.smola_scaling[name], mask, dropout if isinstance(dropout, nn.Dropout) else None,
            )
            result = result + delta.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "smola." + super().__repr__()


__all__ = ["SMoLALayer", "SMoLALinear", "SMoLAPeftLinear", "SoftMoESlots", "smola_modality_ids"]
