# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Alt-MoE configuration (arXiv 2409.05929): frozen unimodal backbones joined by one multi-directional MoE connector."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig

from .configuration_common import as_sub_config as _as_config
from .configuration_common import check_modality


MODALITIES = ("text", "vision", "audio")
TOKEN_POOLINGS = ("mean", "cls", "last")
REGRESSION_LOSSES = ("smooth_l1", "mse")


class AltMoEConfig(PreTrainedConfig):
    r"""
    Configuration of [`AltMoEModel`]. Two or more of `text_config`, `vision_config` and `audio_config` name the frozen
    backbones (any transformers config: Llama/Qwen2/BERT for text, DINOv2/ViT/CLIP-vision for vision, Whisper/
    wav2vec2 for audio); the rest configures the shared connector.

    Args:
        text_config, vision_config, audio_config (`dict` or `PreTrainedConfig`, *optional*):
            Backbone configs. A dict must carry `model_type`.
        feature_layers (`int`, defaults to 2):
            Backbone features are the mean of the last `feature_layers` hidden states (the official code uses 2).
        token_pooling (`dict[str, str]`, *optional*):
            Per modality, how tokens are pooled into one vector: "mean" (masked mean), "cls" (first token) or "last"
            (last non-padding token). Defaults to "mean" for every modality.
        hidden_size (`int`, defaults to 512): width of the shared connector space.
        num_experts (`int`, defaults to 8), num_experts_per_tok (`int`, defaults to 2): the shared expert pool.
        expert_intermediate_size (`int`, defaults to 1024): hidden width inside each MLP expert.
        routing_mode (`str`, defaults to "softmax_topk"): "softmax_topk" (official code: softmax over all experts,
            top-k, not renormalised) or "topk_softmax" (Mixtral style).
        projection_dim (`int`, defaults to 256): width of the shared contrastive (retrieval) space.
        regression_loss ("smooth_l1" | "mse"), regression_weight, contrastive_weight: per-direction loss terms.
        contrastive_temperature (`float`, defaults to 0.05), learnable_temperature (`bool`): InfoNCE temperature.
        router_aux_loss_coef, router_z_loss_coef: coefficients of the balance and z losses (0 disables).
        freeze_backbones (`bool`, defaults to True): backbones never receive gradients unless this is False.
        backbone_sources (`dict[str, dict]`, *optional*): per modality `{"name_or_path": ..., "revision": ...}`,
            recorded by `from_backbones` and used to reassemble a connector-only checkpoint.
        connector_only (`bool`): set by `save_pretrained(..., connector_only=True)`; the checkpoint then holds no
            backbone weights and `from_pretrained` loads them from `backbone_sources`.
    """

    model_type = "alt_moe"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig, "audio_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        audio_config=None,
        feature_layers: int = 2,
        token_pooling: dict | None = None,
        hidden_size: int = 512,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        expert_intermediate_size: int = 1024,
        hidden_act: str = "gelu",
        routing_mode: str = "softmax_topk",
        dropout: float = 0.1,
        projection_dim: int = 256,
        regression_loss: str = "smooth_l1",
        regression_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        contrastive_temperature: float = 0.05,
        learnable_temperature: bool = False,
        router_aux_loss_coef: float = 0.0,
        router_z_loss_coef: float = 0.0,
        freeze_backbones: bool = True,
        backbone_sources: dict | None = None,
        connector_only: bool = False,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.text_config = _as_config("text_config", text_config)
        self.vision_config = _as_config("vision_config", vision_config)
        self.audio_config = _as_config("audio_config", audio_config)
        self.feature_layers = feature_layers
        self.token_pooling = {m: "mean" for m in self.modalities} | dict(token_pooling or {})
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.expert_intermediate_size = expert_intermediate_size
        self.hidden_act = hidden_act
        self.routing_mode = routing_mode
        self.dropout = dropout
        self.projection_dim = projection_dim
        self.regression_loss = regression_loss
        self.regression_weight = regression_weight
        self.contrastive_weight = contrastive_weight
        self.contrastive_temperature = contrastive_temperature
        self.learnable_temperature = learnable_temperature
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.freeze_backbones = freeze_backbones
        self.backbone_sources = dict(backbone_sources or {})
        self.connector_only = connector_only
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate_alt_moe()

    @property
    def modalities(self) -> list[str]:
        """The modalities that have a backbone, in canonical order."""
        return [m for m in MODALITIES if getattr(self, f"{m}_config", None) is not None]

    @property
    def directions(self) -> list[tuple[str, str]]:
        """Every ordered (source, target) pair; its index is the direction embedding's row."""
        return [(s, t) for s in self.modalities for t in self.modalities if s != t]

    def backbone_config(self, modality: str) -> PreTrainedConfig:
        check_modality(modality, self.modalities)
        return getattr(self, f"{modality}_config")

    def feature_size(self, modality: str) -> int:
        """Width of the pooled backbone features of a modality."""
        cfg = self.backbone_config(modality)
        for name in ("hidden_size", "d_model", "dim"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        raise ValueError(f"can't tell the feature width of the {modality} backbone ({cfg.model_type})")

    def validate_alt_moe(self):
        if len(self.modalities) < 2:
            raise ValueError(
                f"Alt-MoE needs backbones for at least two modalities of {MODALITIES}, got {self.modalities or 'none'}"
            )
        for name in ("hidden_size", "num_experts", "expert_intermediate_size", "projection_dim", "feature_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}"
            )
        if self.routing_mode not in ("topk_softmax", "softmax_topk"):
            raise ValueError(f"routing_mode must be 'topk_softmax' or 'softmax_topk', got {self.routing_mode!r}")
        if self.regression_loss not in REGRESSION_LOSSES:
            raise ValueError(f"regression_loss must be one of {REGRESSION_LOSSES}, got {self.regression_loss!r}")
        for modality, pooling in self.token_pooling.items():
            check_modality(modality, self.modalities)
            if pooling not in TOKEN_POOLINGS:
                raise ValueError(f"token_pooling[{modality!r}] must be one of {TOKEN_POOLINGS}, got {pooling!r}")
        for modality in self.backbone_sources:
            check_modality(modality, self.modalities)
        if not self.contrastive_temperature > 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")


__all__ = ["AltMoEConfig"]
