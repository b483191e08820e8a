# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Omni-SMoLA configuration (arXiv 2312.00968): a frozen causal LM whose linear layers get soft mixtures of
low-rank experts."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig

from .configuration_common import as_sub_config as _as_config


class OmniSMoLAConfig(PreTrainedConfig):
    r"""
    Configuration of [`OmniSMoLAForConditionalGeneration`].

    Args:
        base_config (`dict` or `PreTrainedConfig`): config of the wrapped causal LM (any `AutoModelForCausalLM`
            architecture). A dict must carry `model_type`.
        target_modules (`list[str]`): names (last component) of the linear layers that get SMoLA experts.
        expert_groups (`list[str]`, defaults to ["text", "vision", "multimodal"]): expert groups.
        shared_groups (`list[str]`, defaults to ["multimodal"]): groups every token uses. The other groups are the
            modalities: `modality_ids` value m selects the m-th of them (0 = "text" by default; generated tokens are
            modality 0).
        num_experts (`int`, defaults to 4): experts per group.
        smola_r (`int`, defaults to 4), smola_alpha (`float`, defaults to 8.0), smola_dropout (`float`): rank,
            scaling numerator (scaling = alpha / r) and input dropout of every expert.
        base_name_or_path (`str`, *optional*): where the base weights came from (recorded by `from_base`).
    """

    model_type = "omni_smola"
    sub_configs = {"base_config": AutoConfig}

    def __init__(
        self,
        base_config=None,
        target_modules: list[str] | None = None,
        expert_groups: list[str] | None = None,
        shared_groups: list[str] | None = None,
        num_experts: int = 4,
        smola_r: int = 4,
        smola_alpha: float = 8.0,
        smola_dropout: float = 0.0,
        base_name_or_path: str | None = None,
        **kwargs,
    ):
        self.base_config = _as_config("base_config", base_config)
        self.target_modules = list(target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"])
        self.expert_groups = list(expert_groups or ["text", "vision", "multimodal"])
        self.shared_groups = list(["multimodal"] if shared_groups is None else shared_groups)
        self.num_experts = num_experts
        self.smola_r = smola_r
        self.smola_alpha = smola_alpha
        self.smola_dropout = smola_dropout
        self.base_name_or_path = base_name_or_path
        if self.base_config is not None:
            for name in ("vocab_size", "hidden_size", "tie_word_embeddings"):
                if name not in kwargs and hasattr(self.base_config, name):
                    kwargs[name] = getattr(self.base_config, name)
        super().__init__(**kwargs)
        self.validate_omni_smola()

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        # generation (caches, vocab) reads the wrapped causal LM's text config
        if self.base_config is None:
            return self
        return self.base_config.get_text_config(decoder=decoder, encoder=encoder)

    def validate_omni_smola(self):
        for name in ("num_experts", "smola_r"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if len(set(self.expert_groups)) != len(self.expert_groups):
            raise ValueError(f"expert_groups must be unique, got {self.expert_groups}")
        unknown = [g for g in self.shared_groups if g not in self.expert_groups]
        if unknown:
            raise ValueError(f"shared_groups {unknown} are not in expert_groups {self.expert_groups}")
        if not 0.0 <= self.smola_dropout < 1.0:
            raise ValueError(f"smola_dropout must be in [0, 1), got {self.smola_dropout}")


__all__ = ["OmniSMoLAConfig"]
