# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Alt-MoE (arXiv 2409.05929): one shared multi-directional MoE connector between frozen unimodal backbones.

Data flow for one direction (source -> target):

    source input -> frozen backbone -> pooled features (batch, feat_s)      # or pre-stored `<modality>_features`
      -> standardise -> input_proj[source] + direction_embedding[source->target]   (batch, hidden)
      -> router[target] -> top-k of the shared MLP experts -> residual + LayerNorm (batch, hidden)
      -> regression_head[target]  : predicted target features   (batch, feat_t)   -> SmoothL1 / MSE
      -> contrastive_head[target] : query embedding             (batch, proj)     -> InfoNCE against
    target features -> standardise -> candidate_proj[target]   : candidate embedding (batch, proj)

Everything after the backbones works on one pooled vector per sample, which is what makes pre-storing features and
real-time retrieval possible. Hub-safe: imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_alt_moe import AltMoEConfig, check_modality
from .moe_layers import MLPExperts, MoERouter, expert_usage, load_balancing_loss, router_z_loss


# Which forward kwargs carry each modality's raw input (the first one present is used).
MODALITY_INPUTS = {
    "text": ("input_ids",),
    "vision": ("pixel_values",),
    "audio": ("input_features", "input_values"),
}
MODALITY_MASKS = {"text": "attention_mask", "vision": None, "audio": "audio_attention_mask"}


@dataclass
class AltMoEConnectorOutput(ModelOutput):
    """
    hidden_states (`torch.FloatTensor` of shape `(batch, hidden)`): connector output after the experts.
    router_logits (`torch.FloatTensor` of shape `(batch, experts)`): fp32 gate logits of the target's router.
    top_k_index (`torch.LongTensor` of shape `(batch, k)`): experts each sample was routed to.
    """

    hidden_states: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    top_k_index: torch.LongTensor | None = None


@dataclass
class AltMoEOutput(ModelOutput):
    """
    Output of [`AltMoEModel`] for one direction.

    loss: weighted sum of the terms below (when `return_loss` and both sides are given).
    regression_loss / contrastive_loss / aux_loss / z_loss: the individual terms (unweighted).
    query_embeds (`(batch, projection_dim)`): L2-normalised source-side embeddings in the shared space.
    candidate_embeds (`(batch, projection_dim)`): L2-normalised target-side embeddings.
    logits_per_query (`(batch, batch)`): scaled similarities between every query and every candidate.
    predicted_features (`(batch, feat_target)`): regression prediction of the standardised target features.
    target_features (`(batch, feat_target)`): the standardised target features.
    router_logits (`(batch, experts)`), expert_usage (`(experts,)`): routing of this batch.
    """

    loss: torch.FloatTensor | None = None
    regression_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    query_embeds: torch.FloatTensor | None = None
    candidate_embeds: torch.FloatTensor | None = None
    logits_per_query: torch.FloatTensor | None = None
    predicted_features: torch.FloatTensor | None = None
    target_features: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    expert_usage: torch.FloatTensor | None = None


class AltMoEFeatureStandardizer(nn.Module):
    """Per-dimension standardisation of a backbone's pooled features.

    Raw causal-LM features have a few huge dimensions; without standardising them (statistics from the training set,
    set by `AltMoEModel.set_feature_statistics`) every mapping *into* the text space stays near chance. Stored as
    buffers so a saved model carries its statistics. Starts as the identity.
    """

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class AltMoEConnector(nn.Module):
    """The shared multi-directional MoE connector: per-modality input projections, a direction embedding, one router
    per target (multi-gate) over a single pool of MLP experts, and per-target regression / contrastive heads."""

    def __init__(self, config: AltMoEConfig):
        super().__init__()
        self.config = config
        modalities, hidden = config.modalities, config.hidden_size
        self.direction_index = {d: i for i, d in enumerate(config.directions)}
        self.input_proj = nn.ModuleDict({m: nn.Linear(config.feature_size(m), hidden) for m in modalities})
        self.direction_embeddings = nn.Embedding(len(config.directions), hidden)
        self.routers = nn.ModuleDict(
            {
                m: MoERouter(hidden, config.num_experts, config.num_experts_per_tok, config.routing_mode)
                for m in modalities
            }
        )
        self.experts = MLPExperts(
            config, config.num_experts, hidden, config.expert_intermediate_size, config.hidden_act
        )
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(hidden)
        self.regression_heads = nn.ModuleDict({m: nn.Linear(hidden, config.feature_size(m)) for m in modalities})
        self.contrastive_heads = nn.ModuleDict({m: nn.Linear(hidden, config.projection_dim) for m in modalities})
        self.candidate_proj = nn.ModuleDict(
            {m: nn.Linear(config.feature_size(m), config.projection_dim) for m in modalities}
        )

    def forward(self, source: str, target: str, source_features: torch.Tensor) -> AltMoEConnectorOutput:
        # source_features: (batch, feat_s), already standardised
        direction = torch.tensor(self.direction_index[(source, target)], device=source_features.device)
        hidden = self.input_proj[source](source_features) + self.direction_embeddings(direction)  # (batch, hidden)
        router_logits, top_k_weights, top_k_index = self.routers[target](hidden)  # (batch, experts), (batch, k) x2
        expert_out = self.experts(self.dropout(hidden), top_k_index, top_k_weights)  # (batch, hidden)
        hidden = self.norm(hidden + expert_out)
        return AltMoEConnectorOutput(hidden_states=hidden, router_logits=router_logits, top_k_index=top_k_index)


class AltMoEPreTrainedModel(PreTrainedModel):
    config_class = AltMoEConfig
    base_model_prefix = "alt_moe"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # for the backbones, when they are unfrozen (LoRA)
    _no_split_modules = ["AltMoEConnector"]
    _supports_sdpa = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides this by looking for "@use_experts_implementation" in the model's own module; our
        # experts live in moe_layers.py, so the heuristic can't see them.
        return True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, MLPExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, MoERouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, AltMoEFeatureStandardizer):
            init.zeros_(module.mean)
            init.ones_(module.std)
        elif isinstance(module, AltMoEConnector):
            init.normal_(module.direction_embeddings.weight, mean=0.0, std=std)
        elif isinstance(module, AltMoEModel):
            init.constant_(module.logit_scale, torch.log(torch.tensor(1.0 / self.config.contrastive_temperature)))
        elif isinstance(module, nn.Linear) and not _inside_backbone(self, module):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and not _inside_backbone(self, module):
            init.ones_(module.weight)
            init.zeros_(module.bias)


def _inside_backbone(model: nn.Module, module: nn.Module) -> bool:
    backbones = getattr(model, "backbones", None)
    if backbones is None:
        return False
    ids = getattr(model, "_backbone_module_ids", None)
    if ids is None:
        ids = {id(m) for m in backbones.modules()}
        model._backbone_module_ids = ids
    return id(module) in ids


def _backbone_from_config(config) -> nn.Module:
    """The feature extractor of a backbone config: the base model, or its encoder for encoder-decoders (Whisper)."""
    if not getattr(config, "is_encoder_decoder", False):
        return AutoModel.from_config(config)
    # Build only the encoder: find its class on a weightless (meta) copy of the full model.
    with torch.device("meta"):
        encoder_cls = type(AutoModel.from_config(config).get_encoder())
    return encoder_cls(config)


def load_backbone(modality: str, name_or_path: str, revision: str | None = None, **kwargs) -> nn.Module:
    """Load a pretrained backbone for a modality from a Hub id or a local folder (the encoder for encoder-decoders,
    the vision tower of a CLIP/SigLIP-style dual encoder)."""
    config = AutoConfig.from_pretrained(name_or_path, revision=revision, **kwargs)
    sub = {"vision": "vision_config", "text": "text_config", "audio": "audio_config"}[modality]
    if getattr(config, sub, None) is not None and config.model_type in ("clip", "siglip", "siglip2", "clap"):
        # A dual encoder: keep only this modality's tower (e.g. CLIPVisionModel from a CLIP checkpoint).
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        tower_cls = MODEL_MAPPING[type(getattr(config, sub))]
        return tower_cls.from_pretrained(name_or_path, revision=revision, **kwargs)
    model = AutoModel.from_pretrained(name_or_path, revision=revision, **kwargs)
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    return model


class AltMoEModel(AltMoEPreTrainedModel):
    """Frozen backbones + the shared MoE connector. See the module docstring for the data flow.

    Typical use:

        model = AutoModel.from_pretrained("org/alt-moe", trust_remote_code=True)
        queries = model.get_query_embeddings("text", "vision", **processor(text=["a red apple"]))
        candidates = model.get_candidate_embeddings("vision", **processor(images=images))
        best = (queries @ candidates.T).topk(5).indices
    """

    def __init__(self, config: AltMoEConfig):
        super().__init__(config)
        self.backbones = nn.ModuleDict({m: _backbone_from_config(config.backbone_config(m)) for m in config.modalities})
        self.standardizers = nn.ModuleDict(
            {m: AltMoEFeatureStandardizer(config.feature_size(m)) for m in config.modalities}
        )
        self.connector = AltMoEConnector(config)
        self.logit_scale = nn.Parameter(
            torch.log(torch.tensor(1.0 / config.contrastive_temperature)),
            requires_grad=config.learnable_temperature,
        )
        self.post_init()
        if config.freeze_backbones:
            self.backbones.requires_grad_(False)
        if config.connector_only:
            # The checkpoint holds no backbone weights: from_pretrained loads them from backbone_sources.
            self._keys_to_ignore_on_load_missing = set(self._keys_to_ignore_on_load_missing or ()) | {r"backbones\."}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbones(
        cls,
        text: str | None = None,
        vision: str | None = None,
        audio: str | None = None,
        *,
        revisions: dict[str, str] | None = None,
        sources: dict[str, dict] | None = None,
        audio_window_seconds: float | None = None,
        **config_kwargs,
    ) -> "AltMoEModel":
        """Build an untrained Alt-MoE model around pretrained backbones (Hub ids or local folders).

        `sources` overrides what is recorded in `config.backbone_sources` (e.g. the Hub id of a local copy), which a
        connector-only checkpoint uses to reassemble the model.

        `audio_window_seconds` shortens a Whisper encoder's 30 s window (keeping its first positional embeddings, as
        whisper.cpp's `audio_ctx` does): a 2 s clip then costs a fraction of a 30 s window. Pair it with a feature
        extractor built with the same `chunk_length`.
        """
        revisions = revisions or {}
        names = {m: n for m, n in (("text", text), ("vision", vision), ("audio", audio)) if n is not None}
        backbones = {m: load_backbone(m, str(n), revisions.get(m)) for m, n in names.items()}
        recorded = {m: {"name_or_path": str(n), "revision": revisions.get(m)} for m, n in names.items()}
        recorded.update(sources or {})
        configs = {m: b.config for m, b in backbones.items()}
        if audio_window_seconds is not None:
            configs["audio"] = _shorten_whisper_window(configs.get("audio"), audio_window_seconds)
        config = AltMoEConfig(
            **{f"{m}_config": c for m, c in configs.items()}, backbone_sources=recorded, **config_kwargs
        )
        model = cls(config)
        for modality, backbone in backbones.items():
            _copy_backbone_weights(model.backbones[modality], backbone)
        return model

    def save_pretrained(self, save_directory, *args, connector_only: bool = False, **kwargs):
        """`connector_only=True` saves everything but the frozen backbones (a few MB instead of GB) and records where
        to get them: `from_pretrained` reassembles the full model from `config.backbone_sources`."""
        if not connector_only:
            return super().save_pretrained(save_directory, *args, **kwargs)
        missing = [m for m in self.config.modalities if m not in self.config.backbone_sources]
        if missing:
            raise ValueError(f"connector-only save needs config.backbone_sources for {missing}; build with from_backbones")
        if not self.config.freeze_backbones:
            raise ValueError("connector-only save drops the backbones, but they were trained (freeze_backbones=False)")
        state_dict = {k: v for k, v in self.state_dict().items() if not k.startswith("backbones.")}
        self.config.connector_only = True
        try:
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        finally:
            self.config.connector_only = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # safetensors only: a pickle checkpoint (pytorch_model.bin) could run arbitrary code when unpickled.
        kwargs.setdefault("use_safetensors", True)
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:  # safetensors' own errors ("HeaderTooLarge") don't say which file is bad
            if "safetensors" in type(error).__module__ or "deserializ" in str(error):
                raise OSError(
                    f"{pretrained_model_name_or_path}: corrupt or truncated safetensors checkpoint ({error})"
                ) from error
            raise
        if model.config.connector_only:
            for modality, source in model.config.backbone_sources.items():
                where = source.get("local_path")
                if not (where and os.path.isdir(where)):
                    where = source["name_or_path"]
                backbone = load_backbone(modality, where, source.get("revision"))
                _copy_backbone_weights(model.backbones[modality], backbone)
                model.backbones[modality].to(model.dtype)
            model.config.connector_only = False
        return model

    def set_feature_statistics(self, modality: str, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6):
        """Standardise a modality's pooled features with these per-dimension statistics (from the training set)."""
        check_modality(modality, self.config.modalities)
        standardizer = self.standardizers[modality]
        if mean.shape != standardizer.mean.shape or std.shape != standardizer.std.shape:
            raise ValueError(
                f"{modality} statistics must have shape {tuple(standardizer.mean.shape)}, "
                f"got mean {tuple(mean.shape)} and std {tuple(std.shape)}"
            )
        standardizer.mean.copy_(mean)
        standardizer.std.copy_(std.clamp_min(eps))

    # ------------------------------------------------------------------ features
    def get_backbone_features(self, modality: str, **inputs) -> torch.Tensor:
        """Pooled features of a modality's frozen backbone, shape (batch, feature_size): the mean of the last
        `config.feature_layers` hidden states, pooled over tokens as `config.token_pooling[modality]` says.
        These are what pre-storage caches."""
        check_modality(modality, self.config.modalities)
        names = [n for n in MODALITY_INPUTS[modality] if inputs.get(n) is not None]
        if not names:
            raise ValueError(
                f"no input for modality {modality!r}: pass {' or '.join(MODALITY_INPUTS[modality])} "
                f"(or pre-computed {modality}_features)"
            )
        backbone = self.backbones[modality]
        mask_name = MODALITY_MASKS[modality]
        mask = inputs.get(mask_name) if mask_name else None
        kwargs = {names[0]: inputs[names[0]]}
        if modality == "text" and mask is not None:
            kwargs["attention_mask"] = mask
        outputs = backbone(**kwargs, output_hidden_states=True, return_dict=True)
        layers = outputs.hidden_states[-self.config.feature_layers :]
        hidden = torch.stack(layers).mean(0)  # (batch, tokens, feat)
        return _pool_tokens(hidden, _token_mask(backbone, mask, hidden), self.config.token_pooling[modality])

    def _features(self, modality: str, inputs: dict) -> torch.Tensor:
        """Standardised pooled features: pre-computed `<modality>_features` if given, else from the backbone."""
        features = inputs.get(f"{modality}_features")
        if features is None:
            features = self.get_backbone_features(modality, **inputs)
        expected = self.config.feature_size(modality)
        if features.dim() != 2 or features.shape[-1] != expected:
            raise ValueError(
                f"{modality}_features must have shape (batch, {expected}) for this model's {modality} backbone, "
                f"got {tuple(features.shape)}"
            )
        return self.standardizers[modality](features.to(self.standardizers[modality].mean.dtype))

    # ------------------------------------------------------------------ retrieval API
    def get_query_embeddings(self, source: str, target: str, **inputs) -> torch.Tensor:
        """L2-normalised embeddings of `source` inputs as queries for `target` candidates, (batch, projection_dim)."""
        self._check_direction(source, target)
        hidden = self.connector(source, target, self._features(source, inputs)).hidden_states
        return F.normalize(self.connector.contrastive_heads[target](hidden), dim=-1)

    def get_candidate_embeddings(self, modality: str, **inputs) -> torch.Tensor:
        """L2-normalised embeddings of `modality` inputs as retrieval candidates, (batch, projection_dim).
        Queries from any other modality are compared with these by a dot product."""
        check_modality(modality, self.config.modalities)
        return F.normalize(self.connector.candidate_proj[modality](self._features(modality, inputs)), dim=-1)

    def _check_direction(self, source: str, target: str):
        check_modality(source, self.config.modalities)
        check_modality(target, self.config.modalities)
        if source == target:
            raise ValueError(f"source and target must differ, got {source!r} -> {target!r}")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        source: str,
        target: str,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        text_features: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        audio_features: torch.FloatTensor | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> AltMoEOutput:
        """One direction (source -> target). Inputs are raw (`input_ids`, `pixel_values`, `input_features`, ...) or
        pooled backbone features (`text_features`, `vision_features`, `audio_features`). With both sides given and
        `return_loss`, returns the direction's loss: regression + InfoNCE + router auxiliary terms."""
        self._check_direction(source, target)
        inputs = {k: v for k, v in locals().items() if k not in ("self", "source", "target", "kwargs", "return_loss")}
        config = self.config

        source_features = self._features(source, inputs)  # (batch, feat_s)
        out = self.connector(source, target, source_features)
        predicted = self.connector.regression_heads[target](out.hidden_states)  # (batch, feat_t)
        query = F.normalize(self.connector.contrastive_heads[target](out.hidden_states), dim=-1)  # (batch, proj)
        usage = expert_usage(out.top_k_index, config.num_experts)

        has_target = inputs.get(f"{target}_features") is not None or any(
            inputs.get(n) is not None for n in MODALITY_INPUTS[target]
        )
        if not has_target:
            return AltMoEOutput(
                query_embeds=query, predicted_features=predicted, router_logits=out.router_logits, expert_usage=usage
            )

        target_features = self._features(target, inputs)  # (batch, feat_t)
        if target_features.shape[0] != source_features.shape[0]:
            raise ValueError(
                f"{source} and {target} batches must pair up: got {source_features.shape[0]} and "
                f"{target_features.shape[0]} samples"
            )
        candidate = F.normalize(self.connector.candidate_proj[target](target_features), dim=-1)  # (batch, proj)
        return alt_moe_loss(
            config, query, candidate, predicted, target_features, self.logit_scale, out.router_logits,
            out.top_k_index, return_loss=return_loss,
        )


def alt_moe_loss(
    config: AltMoEConfig,
    query: torch.Tensor,
    candidate: torch.Tensor,
    predicted: torch.Tensor,
    target_features: torch.Tensor,
    logit_scale: torch.Tensor,
    router_logits: torch.Tensor | None = None,
    top_k_index: torch.Tensor | None = None,
    return_loss: bool = True,
) -> AltMoEOutput:
    """One direction's loss: regression of the (standardised) target features + symmetric InfoNCE between queries
    and candidates + the router's balance and z losses, weighted by the config. Shared with the linear baseline."""
    # query, candidate: (batch, proj), L2-normalised; predicted, target_features: (batch, feat_t)
    logits = logit_scale.exp().clamp(max=100) * query @ candidate.T  # (batch, batch)
    usage = expert_usage(top_k_index, config.num_experts) if top_k_index is not None else None
    loss = regression = contrastive = aux = z = None
    if return_loss:
        regression_fn = F.smooth_l1_loss if config.regression_loss == "smooth_l1" else F.mse_loss
        regression = regression_fn(predicted, target_features.detach())
        labels = torch.arange(logits.shape[0], device=logits.device)
        # Symmetric InfoNCE: each query must find its candidate and each candidate its query.
        contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss = config.regression_weight * regression + config.contrastive_weight * contrastive
        if router_logits is not None:
            aux = load_balancing_loss(router_logits, top_k_index, config.num_experts)
            z = router_z_loss(router_logits)
            loss = loss + config.router_aux_loss_coef * aux + config.router_z_loss_coef * z
    return AltMoEOutput(
        loss=loss,
        regression_loss=regression,
        contrastive_loss=contrastive,
        aux_loss=aux,
        z_loss=z,
        query_embeds=query,
        candidate_embeds=candidate,
        logits_per_query=logits,
        predicted_features=predicted,
        target_features=target_features,
        router_logits=router_logits,
        expert_usage=usage,
    )


def _shorten_whisper_window(config, seconds: float):
    if config is None or config.model_type != "whisper":
        raise ValueError("audio_window_seconds applies to a Whisper audio backbone")
    if not float(seconds).is_integer():
        raise ValueError(f"audio_window_seconds must be whole seconds (the feature extractor's chunk_length), got {seconds}")
    positions = int(seconds) * 50  # Whisper: 100 mel frames/s, halved by the stride-2 conv
    if not 1 <= positions <= config.max_source_positions:
        raise ValueError(f"audio_window_seconds must be in (0, {config.max_source_positions / 50:g}], got {seconds}")
    config = copy.deepcopy(config)
    config.max_source_positions = positions
    return config


def _copy_backbone_weights(target: nn.Module, source: nn.Module):
    """Load a pretrained backbone's weights; a shortened Whisper window keeps the first positional embeddings."""
    state, own = source.state_dict(), target.state_dict()
    for key, value in state.items():
        if key.endswith("embed_positions.weight") and key in own and own[key].shape[0] < value.shape[0]:
            state[key] = value[: own[key].shape[0]]
    target.load_state_dict(state)


def _token_mask(backbone: nn.Module, mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
    """Bring an input-level mask to the backbone's output length (audio encoders downsample their frames)."""
    if mask is None or mask.shape[-1] == hidden.shape[1]:
        return mask
    if hasattr(backbone, "_get_feat_extract_output_lengths"):  # wav2vec2-style convolutional front ends
        lengths = backbone._get_feat_extract_output_lengths(mask.sum(-1))
    elif mask.shape[-1] % hidden.shape[1] == 0:  # Whisper: a stride-2 conv halves 3000 frames to 1500
        stride = mask.shape[-1] // hidden.shape[1]
        lengths = (mask.sum(-1) + stride - 1) // stride
    else:
        raise ValueError(f"can't align a mask of length {mask.shape[-1]} to {hidden.shape[1]} backbone tokens")
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    return (positions[None, :] < lengths[:, None]).to(mask.dtype)


def _pool_tokens(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    # hidden: (batch, tokens, feat); mask: (batch, tokens) with 1 for real tokens
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = hidden.new_ones(hidden.shape[:2])
    mask = mask.to(hidden.dtype)
    if pooling == "last":
        # the last real token of each row, whichever side the padding is on
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(mask)
        last = (positions * mask).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


__all__ = ["AltMoEModel", "AltMoEPreTrainedModel", "AltMoEOutput"]
