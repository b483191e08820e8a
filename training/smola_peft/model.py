# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""`SMoLAModel`: the peft tuner that puts Omni-SMoLA soft mixtures of low-rank experts on a model's linears."""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ...modeling.smola_layers import SOFT_MIXTURE_MERGE_ERROR, resolve_modality_ids, set_forward_modality_ids
from .layer import SMoLALayer, SMoLAPeftLinear


def _tokens_shape(args, kwargs):
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[:2]
    return args[0].shape[:2] if args and isinstance(args[0], torch.Tensor) else None


class SMoLAModel(BaseTuner):
    """Creates an Omni-SMoLA model (arXiv 2312.00968) from a transformers model.

    The wrapped model's forward (through `PeftModel`, `PeftModelForCausalLM` or directly) accepts `modality_ids`
    (batch, seq): the modality of each token (index into the non-shared expert groups); without it every group is
    active. Adapters can't be merged: the expert weights depend on each token's input.
    """

    prefix: str = "smola_"
    tuner_layer_cls = SMoLALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, *args, **kwargs):
        super().__init__(model, config, adapter_name, *args, **kwargs)
        if getattr(self.model, "_smola_hook", None) is None:
            # `PeftModel.forward` calls the transformers model itself: take `modality_ids` out of its kwargs there
            self.model._smola_hook = self.model.register_forward_pre_hook(self._modality_pre_hook, with_kwargs=True)

    @staticmethod
    def _modality_pre_hook(module, args, kwargs):
        ids = kwargs.pop("modality_ids", None)
        if ids is not None:
            ids = resolve_modality_ids(ids, _tokens_shape(args, kwargs))
        set_forward_modality_ids(module, ids)
        return args, kwargs

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, SMoLAPeftLinear):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, torch.nn.Linear):
            raise TypeError(f"SMoLA only adapts torch.nn.Linear layers, got {type(base).__name__} at {current_key}")
        new_module = SMoLAPeftLinear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def forward(self, *args, modality_ids: Optional[torch.Tensor] = None, **kwargs):
        # `PeftModelForCausalLM.forward` lands here and calls the model's `forward` (the pre-hook doesn't run)
        if modality_ids is not None:
            modality_ids = resolve_modality_ids(modality_ids, _tokens_shape(args, kwargs))
        set_forward_modality_ids(self.model, modality_ids)
        return self.model.forward(*args, **kwargs)

    def _check_merge_allowed(self):
        raise NotImplementedError(SOFT_MIXTURE_MERGE_ERROR)

    def merge_adapter(self, *args, **kwargs) -> None:
        raise NotImplementedError(SOFT_MIXTURE_MERGE_ERROR)

    def unload(self) -> torch.nn.Module:
        if getattr(self.model, "_smola_hook", None) is not None:
            self.model._smola_hook.remove()
            self.model._smola_hook = None
        return super().unload()


__all__ = ["SMoLAModel"]
