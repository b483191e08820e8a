# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Omni-SMoLA (arXiv 2312.00968): any causal LM, frozen, with soft mixtures of low-rank experts on its linears.

`OmniSMoLAForConditionalGeneration` builds the base causal LM from `config.base_config` and replaces every linear
named in `config.target_modules` by a `SMoLALinear` (base + grouped soft mixture of low-rank experts). The whole
model is a regular `PreTrainedModel`: `save_pretrained` writes this file, `smola_layers.py` and the configuration,
so `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without multimodal_moe installed.
Hub-safe: imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers import initialization as init

from .configuration_omni_smola import OmniSMoLAConfig
from .smola_layers import SMoLALinear, resolve_modality_ids, set_forward_modality_ids


def _build_base(config) -> PreTrainedModel:
    """The wrapped model from its config: a causal LM, or else an image-text-to-text (LLaVA-style) model."""
    try:
        return AutoModelForCausalLM.from_config(config)
    except ValueError:
        return AutoModelForImageTextToText.from_config(config)


def _replace_target_linears(model: nn.Module, config: OmniSMoLAConfig) -> list[str]:
    targets = set(config.target_modules)
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                layer = SMoLALinear(
                    child, config.expert_groups, config.shared_groups, config.num_experts, config.smola_r,
                    config.smola_alpha, config.smola_dropout,
                )
                setattr(module, child_name, layer)
                replaced.append(f"{name}.{child_name}" if name else child_name)
    if not replaced:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} in the base model")
    return replaced


class OmniSMoLAPreTrainedModel(PreTrainedModel):
    config_class = OmniSMoLAConfig
    base_model_prefix = "smola"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, SMoLALinear):
            bound = 1.0 / module.in_features**0.5
            init.uniform_(module.lora_A, -bound, bound)
            init.zeros_(module.lora_B)
            init.normal_(module.router, mean=0.0, std=0.02)
        elif isinstance(getattr(self, "language_model", None), PreTrainedModel):
            self.language_model._init_weights(module)


class OmniSMoLAForConditionalGeneration(OmniSMoLAPreTrainedModel, GenerationMixin):
    """A frozen causal LM with Omni-SMoLA experts; forward takes optional per-token `modality_ids`.

    ```python
    >>> model = OmniSMoLAForConditionalGeneration.from_base("HuggingFaceTB/SmolLM2-135M", num_experts=4, smola_r=4)
    >>> out = model(input_ids, modality_ids=modality_ids, labels=input_ids)   # 0 = text, 1 = vision (default groups)
    >>> model.generate(input_ids, modality_ids=modality_ids, max_new_tokens=20)  # generated tokens are modality 0
    ```
    """

    def __init__(self, config: OmniSMoLAConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if language_model is None:
            language_model = _build_base(config.base_config)
        else:  # one config object, so `set_attn_implementation` and friends reach the wrapped model
            config.base_config = language_model.config
        self.language_model = language_model
        self.smola_layer_names = _replace_target_linears(self.language_model, config)
        self.post_init()
        self.freeze_base()

    def freeze_base(self):
        """Only the SMoLA routers and experts train."""
        for name, param in self.named_parameters():
            param.requires_grad_(name.rsplit(".", 1)[-1] in ("router", "lora_A", "lora_B"))

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    @classmethod
    def from_base(cls, model_or_path, base_kwargs: dict | None = None, **smola_kwargs):
        """Wrap a causal LM (a model or a path / Hub id) with fresh SMoLA experts; starts equal to the base."""
        if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
            name = str(model_or_path)
            try:
                model_or_path = AutoModelForCausalLM.from_pretrained(name, **(base_kwargs or {}))
            except ValueError:  # not a causal LM: a LLaVA-style image-text-to-text model
                model_or_path = AutoModelForImageTextToText.from_pretrained(name, **(base_kwargs or {}))
            smola_kwargs.setdefault("base_name_or_path", name)
        # a copy: PreTrainedModel.__init__ adjusts its sub-configs, which must not touch the live base model
        config = OmniSMoLAConfig(base_config=copy.deepcopy(model_or_path.config), **smola_kwargs)
        dtype = next(model_or_path.parameters()).dtype
        # post_init doesn't re-initialise weights (transformers 5), so the wrapped model keeps its pretrained ones
        model = cls(config, language_model=model_or_path)
        return model.to(dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        r"""
        The KV cache goes through `**kwargs` under whichever name the installed transformers uses (`cache`, or
        `past_key_values` before 5.24).

        modality_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*): per-token modality (index into the
            non-shared `expert_groups`); without it every expert group is active for every token.
        """
        kwargs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **kwargs,
        )
        if modality_ids is not None:
            modality_ids = resolve_modality_ids(
                modality_ids, (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            )
        # kept on the layers after this call, so activation checkpointing recomputes with the same ids
        set_forward_modality_ids(self, modality_ids)
        return self.language_model(**kwargs)


__all__ = ["OmniSMoLAForConditionalGeneration", "OmniSMoLAPreTrainedModel"]
