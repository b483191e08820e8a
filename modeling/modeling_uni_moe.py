# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Uni-MoE (arXiv 2405.11273): a unified multimodal LLM whose dense FFNs are sparse mixtures of SwiGLU experts.

Data flow: placeholders in `input_ids` (expanded by `UniMoEProcessor`) -> frozen encoders (CLIP-vision / DINOv2 /
SigLIP for images and video frames, the Whisper encoder for speech) -> one connector per modality (LLaVA MLP or a
small Q-Former) -> features scattered into the token embeddings -> decoder layers (attention -> router -> experts) ->
logits, plus the auxiliary routing losses.

Hub-safe: imports only torch, transformers, safetensors and the flat files next to it.
"""

from __future__ import annotations

import copy
import glob
import os
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils.generic import can_return_tuple

from .configuration_uni_moe import MODALITIES, UniMoEConfig
from .moe_layers import (
    MoERouter,
    SwiGLUExperts,
    load_balancing_loss,
    modality_expert_loss,
    modality_kl_loss,
    router_z_loss,
)

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (forward keyword, output field, generate's
# model_kwargs). Checkpoints carry this file to users on either side of the rename, so it speaks the installed name.
CACHE_KEY = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _pop_cache(cache, kwargs: dict):
    """The KV cache passed under either name (`cache`, or `past_key_values` before transformers 5.24)."""
    old = kwargs.pop("past_key_values", None)
    return cache if cache is not None else old


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class UniMoEModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    router_logits (`tuple(torch.FloatTensor)`):
        One fp32 tensor of shape `(batch_size * sequence_length, num_experts)` per MoE layer.
    image_hidden_states, video_hidden_states, audio_hidden_states (`torch.FloatTensor`, *optional*):
        Connector outputs of shape `(num_items, tokens_per_item, hidden_size)` scattered into the sequence.
    """

    router_logits: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    video_hidden_states: torch.Tensor | None = None
    audio_hidden_states: torch.Tensor | None = None


@dataclass
class UniMoECausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor`, *optional*): `lm_loss + aux_loss`, returned when `labels` are given.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
    cache / past_key_values (`Cache`, *optional*): the KV cache (named after the installed transformers version).
    lm_loss (`torch.FloatTensor`, *optional*): next-token cross-entropy.
    aux_loss (`torch.FloatTensor`, *optional*): sum over the auxiliary losses of coefficient * loss.
    balance_loss, z_loss, modality_expert_loss, modality_kl_loss (`torch.FloatTensor`, *optional*):
        Each auxiliary loss before its coefficient, averaged over the MoE layers (non-padding tokens only). Computed
        when `labels` are given or `output_router_logits=True`.
    router_logits (`tuple(torch.FloatTensor)`, *optional*): see [`UniMoEModelOutputWithPast`], when
        `output_router_logits=True`.
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    modality_expert_loss: torch.Tensor | None = None
    modality_kl_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    video_hidden_states: torch.Tensor | None = None
    audio_hidden_states: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Connectors
# ---------------------------------------------------------------------------------------------------------------------
class UniMoEMLPConnector(nn.Module):
    """LLaVA-1.5 projector: Linear -> GELU -> Linear, one LLM token per encoder token.

    With `merge_size` k > 1, k x k neighbouring patches (`grid` set: vision) or k consecutive frames (`grid` None:
    audio) are first normalised and concatenated into one token, as Qwen2-VL's patch merger and SLAM-ASR's projector
    do: k^2 (or k) times fewer LLM tokens, every encoder feature still seen (a Q-Former learns slower from scratch).
    """

    def __init__(self, encoder_hidden_size: int, hidden_size: int, hidden_act: str = "gelu", merge_size: int = 1,
                 grid: int | None = None):
        super().__init__()
        self.merge_size, self.grid = merge_size, grid
        self.norm = nn.LayerNorm(encoder_hidden_size) if merge_size > 1 else None
        merged = encoder_hidden_size * (merge_size**2 if grid else merge_size)
        self.linear_1 = nn.Linear(merged, hidden_size)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def merge(self, encoder_states: torch.Tensor) -> torch.Tensor:
        # (items, encoder tokens, d) -> (items, encoder tokens / k^2 (vision) or / k (audio), k^2 d or k d)
        items, tokens, d = encoder_states.shape
        k = self.merge_size
        if self.grid is None:
            return encoder_states.reshape(items, tokens // k, k * d)
        g = self.grid
        x = encoder_states.reshape(items, g // k, k, g // k, k, d)  # (items, block row, row, block col, col, d)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(items, (g // k) ** 2, k * k * d)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        # (items, encoder tokens, encoder hidden) -> (items, LLM tokens, hidden)
        if self.merge_size > 1:
            encoder_states = self.merge(self.norm(encoder_states))
        return self.linear_2(self.act(self.linear_1(encoder_states)))


class UniMoEQFormerLayer(nn.Module):
    """Pre-norm block: queries self-attend, cross-attend to the encoder states, then an MLP."""

    def __init__(self, hidden_size: int, num_heads: int, hidden_act: str = "gelu"):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(hidden_size)
        self.self_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(hidden_size)
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size), ACT2FN[hidden_act], nn.Linear(4 * hidden_size, hidden_size)
        )

    def forward(self, queries: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        # queries: (items, queries, d); encoder_states: (items, encoder tokens, d)
        x = self.self_attn_norm(queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        x = self.cross_attn_norm(queries)
        queries = queries + self.cross_attn(x, encoder_states, encoder_states, need_weights=False)[0]
        return queries + self.mlp(self.mlp_norm(queries))


class UniMoEQFormerConnector(nn.Module):
    """Learnable queries cross-attending to the encoder states: a fixed number of LLM tokens per input.

    A small stand-in for Uni-MoE's Q-Formers (the official speech one is a Whisper decoder run on 50 queries per 30 s
    chunk): `num_layers` blocks of [`UniMoEQFormerLayer`], then a projection to the LLM width.
    """

    def __init__(
        self,
        encoder_hidden_size: int,
        hidden_size: int,
        num_query_tokens: int,
        qformer_hidden_size: int,
        num_layers: int,
        num_heads: int,
        hidden_act: str = "gelu",
    ):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer_hidden_size))
        self.encoder_norm = nn.LayerNorm(encoder_hidden_size)
        self.input_proj = nn.Linear(encoder_hidden_size, qformer_hidden_size)
        self.layers = nn.ModuleList(
            [UniMoEQFormerLayer(qformer_hidden_size, num_heads, hidden_act) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(qformer_hidden_size)
        self.output_proj = nn.Linear(qformer_hidden_size, hidden_size)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        encoder_states = self.input_proj(self.encoder_norm(encoder_states))  # (items, encoder tokens, d)
        queries = self.query_tokens.expand(encoder_states.shape[0], -1, -1)  # (items, queries, d)
        for layer in self.layers:
            queries = layer(queries, encoder_states)
        return self.output_proj(self.norm(queries))  # (items, queries, hidden)


def _build_connector(config: UniMoEConfig, modality: str) -> nn.Module:
    kind = config.vision_connector_type if modality == "vision" else config.audio_connector_type
    encoder_hidden = config.encoder_hidden_size(modality)
    hidden = config.text_config.hidden_size
    if kind == "mlp":
        if modality == "vision":
            grid = (config.vision_image_size or config.vision_config.image_size) // config.vision_config.patch_size
            return UniMoEMLPConnector(encoder_hidden, hidden, config.connector_hidden_act, config.vision_merge_size,
                                      grid)
        return UniMoEMLPConnector(encoder_hidden, hidden, config.connector_hidden_act, config.audio_merge_size)
    num_queries = config.vision_num_query_tokens if modality == "vision" else config.audio_num_query_tokens
    return UniMoEQFormerConnector(
        encoder_hidden,
        hidden,
        num_queries,
        config.qformer_hidden_size or hidden,
        config.qformer_num_layers,
        config.qformer_num_heads,
        config.connector_hidden_act,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Sparse MoE FFN
# ---------------------------------------------------------------------------------------------------------------------
class UniMoESparseMoeBlock(nn.Module):
    """Drop-in replacement of a decoder layer's `mlp`: bias-free fp32 router, top-k, softmax over the k (Mixtral
    style), then E SwiGLU experts stored as 3D parameters and run through transformers' experts interface.

    The router logits of the last forward are kept on `self.router_logits` (read and cleared by [`UniMoEModel`]):
    the HF decoder layers around this block only pass hidden states through.
    """

    def __init__(self, config: UniMoEConfig):
        super().__init__()
        text_config = config.text_config
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = MoERouter(text_config.hidden_size, config.num_experts, config.num_experts_per_tok, "topk_softmax")
        # `config` (not text_config) carries `_experts_implementation`: one switch on the top model picks the kernel.
        self.experts = SwiGLUExperts(
            config, config.num_experts, text_config.hidden_size, config.moe_intermediate_size, text_config.hidden_act
        )
        self.router_logits: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)  # (tokens, hidden)
        router_logits, top_k_weights, top_k_index = self.gate(flat)  # (tokens, experts), (tokens, k), (tokens, k)
        self.router_logits = router_logits
        out = self.experts(flat, top_k_index, top_k_weights)  # (tokens, hidden)
        return out.reshape(batch_size, seq_len, hidden_dim)


# ---------------------------------------------------------------------------------------------------------------------
# Pre-trained model
# ---------------------------------------------------------------------------------------------------------------------
class UniMoEPreTrainedModel(PreTrainedModel):
    config_class = UniMoEConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "audio", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UniMoESparseMoeBlock", "UniMoEQFormerConnector"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides this by looking for "@use_experts_implementation" in the model class's own module; our
        # experts are decorated in moe_layers.py, so the heuristic would wrongly say no (and force eager).
        return True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives (model, info)
        # Loading swaps in new parameters (built on the meta device), which forgets the encoders' requires_grad=False.
        if model.config.freeze_encoders:
            for module in model.modules():
                if isinstance(module, UniMoEModel):
                    module.freeze_encoders()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` keeps one Auto class per model class, so `auto_map` would only name the last one
        # registered; list every Auto class a Uni-MoE checkpoint loads through with `trust_remote_code=True`.
        if self._auto_class is not None:
            module = self.__class__.__module__.split(".")[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = f"{module}.UniMoEModel"
            for auto_cls in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
                auto_map[auto_cls] = f"{module}.UniMoEForConditionalGeneration"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SwiGLUExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MoERouter):
            router_std = self.config.router_init_std if self.config.router_init_std is not None else std
            init.normal_(module.weight, mean=0.0, std=router_std)
        elif isinstance(module, UniMoEQFormerConnector):
            init.normal_(module.query_tokens, mean=0.0, std=std)

    @torch.no_grad()
    def initialize_weights(self):
        super().initialize_weights()
        # The MoE blocks live inside the HF decoder, a sub-model whose own `_init_weights` is dispatched to them first
        # and knows nothing of routers or 3D experts. Initialize them here; parameters loaded from a checkpoint carry
        # `_is_hf_initialized` and are left alone by `init.*`.
        for module in self.modules():
            if isinstance(module, (SwiGLUExperts, MoERouter)):
                self._init_weights(module)


# ---------------------------------------------------------------------------------------------------------------------
# Base model
# ---------------------------------------------------------------------------------------------------------------------
class UniMoEModel(UniMoEPreTrainedModel):
    """Encoders + connectors + the sparse-MoE decoder (an HF `AutoModel` decoder whose chosen `mlp`s are replaced)."""

    def __init__(self, config: UniMoEConfig):
        super().__init__(config)
        self.vision_tower = self.vision_connector = None
        self.audio_tower = self.audio_connector = None
        for sub_config in (config.text_config, config.vision_config, config.audio_config):
            _drop_experts_implementation(sub_config)
        if config.vision_config is not None:
            self.vision_tower = AutoModel.from_config(config.vision_config)
            self.vision_connector = _build_connector(config, "vision")
        if config.audio_config is not None:
            # Only the encoder of Whisper is used.
            self.audio_tower = WhisperEncoder(config.audio_config)
            self.audio_connector = _build_connector(config, "audio")
        self.language_model = AutoModel.from_config(config.text_config)
        if getattr(config.text_config, "mlp_bias", False):
            raise ValueError("text_config.mlp_bias=True is not supported: the SwiGLU experts are bias-free")
        for idx in config.moe_layer_indices:
            self.language_model.layers[idx].mlp = UniMoESparseMoeBlock(config)
        if config.freeze_encoders:
            self.freeze_encoders()
        self.post_init()

    # -- helpers -------------------------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @property
    def moe_blocks(self) -> list[UniMoESparseMoeBlock]:
        return [self.language_model.layers[i].mlp for i in self.config.moe_layer_indices]

    def freeze_encoders(self):
        for tower in (self.vision_tower, self.audio_tower):
            if tower is not None:
                tower.requires_grad_(False)

    def _encoder_grad(self) -> bool:
        # Frozen encoders run without autograd: no activations kept for them.
        return torch.is_grad_enabled() and not self.config.freeze_encoders

    def modality_ids(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """Per-token modality index (0 text, 1 image, 2 video, 3 audio: `MODALITIES`), from the placeholder ids."""
        ids = torch.zeros_like(input_ids)
        for modality, token_id in self.config.placeholder_token_ids().items():
            ids = ids.masked_fill(input_ids == token_id, MODALITIES.index(modality))
        return ids

    # -- modality features ---------------------------------------------------------------------------------------------
    def _require(self, tower, name: str, arg: str):
        if tower is None:
            raise ValueError(f"this model has no {name} encoder ({name}_config is None): it can't take `{arg}`")

    def _vision_encoder_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: (images, 3, H, W) -> (images, encoder tokens, encoder hidden)
        kwargs = {}
        cfg = self.config
        resized = cfg.vision_image_size not in (None, cfg.vision_config.image_size)
        if resized and cfg.vision_config.model_type != "dinov2":
            kwargs["interpolate_pos_encoding"] = True  # DINOv2 always interpolates; CLIP / SigLIP do on request
        with torch.set_grad_enabled(self._encoder_grad()):
            out = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True, **kwargs)
        states = out.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default" and self.config.vision_has_cls:
            states = states[:, 1:]  # drop CLS (LLaVA's "default")
        return states

    def get_image_encoder_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> the frozen encoder's states the connector reads: (images, encoder tokens, d)."""
        self._require(self.vision_tower, "vision", "pixel_values")
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (images, 3, H, W), got shape {tuple(pixel_values.shape)}")
        return self._vision_encoder_states(pixel_values)

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, image_encoder_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(images, 3, H, W), or pre-stored `get_image_encoder_states` -> (images, image_seq_length, hidden)."""
        if image_encoder_states is None:
            image_encoder_states = self.get_image_encoder_states(pixel_values)
        else:
            self._require(self.vision_tower, "vision", "image_encoder_states")
            self._check_states("image", image_encoder_states, self.config.vision_connector_input_length)
        return self.vision_connector(image_encoder_states.to(self.vision_connector_dtype))

    def get_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """(videos, frames, 3, H, W) -> (videos, video_seq_length, hidden): frames encoded, then mean-pooled."""
        self._require(self.vision_tower, "vision", "pixel_values_videos")
        if pixel_values_videos.ndim != 5:
            raise ValueError(
                f"pixel_values_videos must be (videos, frames, 3, H, W), got shape {tuple(pixel_values_videos.shape)}"
            )
        videos, frames = pixel_values_videos.shape[:2]
        states = self._vision_encoder_states(pixel_values_videos.flatten(0, 1))  # (videos * frames, tokens, d)
        states = states.reshape(videos, frames, *states.shape[1:]).mean(dim=1)  # (videos, tokens, d)
        return self.vision_connector(states.to(self.vision_connector_dtype))

    def get_audio_encoder_states(self, input_features: torch.Tensor) -> torch.Tensor:
        """(clips, mel bins, frames) -> the frozen encoder's states the connector reads: (clips, encoder frames, d)."""
        self._require(self.audio_tower, "audio", "input_features")
        max_frames = self.config.audio_max_frames
        if input_features.ndim != 3:
            raise ValueError(
                f"input_features must be (clips, mel bins, frames), got shape {tuple(input_features.shape)}"
            )
        if input_features.shape[-1] > max_frames:
            raise ValueError(
                f"audio longer than supported: input_features has {input_features.shape[-1]} frames but the "
                f"{self.config.audio_config.model_type} encoder takes at most {max_frames} "
                f"({max_frames / 100:g} s at Whisper's 10 ms hop); split longer audio into several <audio> clips"
            )
        if input_features.shape[-1] < max_frames:
            raise ValueError(
                f"input_features has {input_features.shape[-1]} frames, the encoder needs exactly {max_frames}: "
                "pad the audio with the feature extractor (UniMoEProcessor does)"
            )
        with torch.set_grad_enabled(self._encoder_grad()):
            out = self.audio_tower(input_features.to(self.audio_tower.dtype), output_hidden_states=True)
        layer = self.config.audio_feature_layer
        return out.last_hidden_state if layer == -1 else out.hidden_states[layer]

    def get_audio_features(
        self, input_features: torch.Tensor | None = None, audio_encoder_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(clips, mel bins, frames), or pre-stored `get_audio_encoder_states` -> (clips, audio_seq_length, hidden).
        One encoder window per clip."""
        if audio_encoder_states is None:
            audio_encoder_states = self.get_audio_encoder_states(input_features)
        else:
            self._require(self.audio_tower, "audio", "audio_encoder_states")
            self._check_states("audio", audio_encoder_states, self.config.audio_config.max_source_positions)
        return self.audio_connector(audio_encoder_states.to(self.audio_connector_dtype))

    def _check_states(self, modality: str, states: torch.Tensor, tokens: int) -> None:
        d = self.config.encoder_hidden_size(modality)
        if states.ndim != 3 or tuple(states.shape[1:]) != (tokens, d):
            want = f"(items, {tokens}, {d})"
            raise ValueError(f"{modality}_encoder_states must be {want} (get_{modality}_encoder_states' output), "
                             f"got shape {tuple(states.shape)}")

    @property
    def vision_connector_dtype(self):
        return next(self.vision_connector.parameters()).dtype

    @property
    def audio_connector_dtype(self):
        return next(self.audio_connector.parameters()).dtype

    def _scatter(
        self, inputs_embeds: torch.Tensor, input_ids: torch.LongTensor, modality: str, features: torch.Tensor
    ) -> torch.Tensor:
        """Writes `features` (items, tokens_per_item, hidden) at the placeholder positions, checking the counts."""
        token_id = self.config.placeholder_token_ids().get(modality)
        if token_id is None:
            raise ValueError(f"config.{modality}_token_id is not set: can't place {modality} features")
        mask = input_ids == token_id  # (batch, seq)
        n_tokens = int(mask.sum())
        n_items, per_item = features.shape[:2]
        if n_tokens != n_items * per_item:
            tag = f"<{modality}>"
            if n_tokens % per_item:
                raise ValueError(
                    f"{modality} token count mismatch: input_ids hold {n_tokens} {tag} tokens, not a multiple of the "
                    f"{per_item} tokens per {modality}; expand each {tag} into {per_item} tokens (UniMoEProcessor does)"
                )
            n_placeholders = n_tokens // per_item
            relation = "more" if n_items > n_placeholders else "fewer"
            raise ValueError(
                f"{relation} {modality} inputs ({n_items}) than {tag} placeholders ({n_placeholders}, i.e. {n_tokens} "
                f"tokens of {per_item}) in input_ids"
            )
        features = features.to(inputs_embeds.device, inputs_embeds.dtype).reshape(-1, inputs_embeds.shape[-1])
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), features)

    # -- forward -------------------------------------------------------------------------------------------------------
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        image_encoder_states: torch.FloatTensor | None = None,
        audio_encoder_states: torch.FloatTensor | None = None,
        **kwargs,
    ) -> UniMoEModelOutputWithPast:
        r"""
        image_encoder_states (`torch.FloatTensor` of shape `(images, encoder tokens, encoder hidden)`, *optional*):
            Pre-stored outputs of the frozen vision encoder (`get_image_encoder_states`), instead of `pixel_values`.
        audio_encoder_states (`torch.FloatTensor` of shape `(clips, encoder frames, encoder hidden)`, *optional*):
            Pre-stored outputs of the frozen audio encoder (`get_audio_encoder_states`), instead of `input_features`.
        """
        cache = _pop_cache(cache, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (batch, seq, hidden)

        # Each modality's input: raw media through its frozen encoder, or that encoder's pre-stored states.
        media = {
            "image": ("pixel_values", pixel_values, image_encoder_states),
            "video": ("pixel_values_videos", pixel_values_videos, None),
            "audio": ("input_features", input_features, audio_encoder_states),
        }
        encode = {"image": self.get_image_features, "video": self.get_video_features, "audio": self.get_audio_features}
        # Decoding steps after a multimodal prefill see no media: their features are already in the KV cache.
        decoding = cache is not None and cache.get_seq_length() > 0
        features = {}
        for modality, (name, raw, stored) in media.items():
            if raw is not None and stored is not None:
                raise ValueError(f"pass either `{name}` or `{modality}_encoder_states`, not both")
            if raw is not None or stored is not None:
                if input_ids is None:
                    raise ValueError(f"`{name}` needs `input_ids` to locate the <{modality}> placeholders")
                stored_kw = {f"{modality}_encoder_states": stored} if stored is not None else {}
                features[modality] = encode[modality](raw, **stored_kw)
                inputs_embeds = self._scatter(inputs_embeds, input_ids, modality, features[modality])
            elif input_ids is not None and not decoding:
                token_id = self.config.placeholder_token_ids().get(modality)
                if token_id is not None and bool((input_ids == token_id).any()):
                    raise ValueError(f"input_ids contain <{modality}> placeholder tokens but no `{name}` was given")

        for block in self.moe_blocks:
            block.router_logits = None
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_KEY: cache},
            **kwargs,
        )
        router_logits = []
        for block in self.moe_blocks:
            router_logits.append(block.router_logits)
            block.router_logits = None  # don't keep the graph alive between steps

        return UniMoEModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_KEY: outputs[CACHE_KEY] if CACHE_KEY in outputs else None},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=tuple(router_logits),
            image_hidden_states=features.get("image"),
            video_hidden_states=features.get("video"),
            audio_hidden_states=features.get("audio"),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Causal LM head
# ---------------------------------------------------------------------------------------------------------------------
_DENSE_FFN_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


class UniMoEForConditionalGeneration(UniMoEPreTrainedModel, GenerationMixin):
    """[`UniMoEModel`] with the LM head, the auxiliary routing losses and `generate()`.

    ```python
    >>> model = UniMoEForConditionalGeneration.from_pretrained_parts(
    ...     "HuggingFaceTB/SmolLM2-135M-Instruct", "facebook/dinov2-small", "openai/whisper-tiny.en",
    ...     num_experts=4, num_experts_per_tok=2, tokenizer=tokenizer)  # upcycled: text logits == the dense LLM's
    >>> inputs = processor(text="<image> What is in the picture?", images=[image])
    >>> model.generate(**inputs, max_new_tokens=20)
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: UniMoEConfig):
        super().__init__(config)
        self.model = UniMoEModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # A placeholder is never a valid next token (and one generated mid-answer would have no media to hold).
        placeholders = sorted(config.placeholder_token_ids().values())
        if placeholders and getattr(self, "generation_config", None) is not None:
            self.generation_config.suppress_tokens = placeholders

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    # -- auxiliary losses ----------------------------------------------------------------------------------------------
    def compute_aux_losses(
        self,
        router_logits: tuple[torch.Tensor, ...],
        modality_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each auxiliary loss averaged over the MoE layers, on non-padding tokens, plus `aux_loss` = sum coef * loss.

        router_logits: per MoE layer, (batch * seq, experts); modality_ids: (batch, seq); attention_mask: (batch,
        past + seq) 2D, its last `seq` columns mark the tokens of this forward.
        """
        cfg = self.config
        if not router_logits:  # a dense model (moe_layers=[]): no router, no auxiliary loss
            zero = torch.zeros((), device=self.lm_head.weight.device)
            return dict.fromkeys(("balance_loss", "z_loss", "modality_expert_loss", "modality_kl_loss", "aux_loss"), zero)
        logits0 = router_logits[0]
        keep = None
        if attention_mask is not None and attention_mask.ndim == 2:
            seq_len = logits0.shape[0] // attention_mask.shape[0]
            keep = attention_mask[:, -seq_len:].reshape(-1).to(logits0.device).bool()  # (batch * seq,)
        mods = (
            modality_ids.reshape(-1).to(logits0.device)
            if modality_ids is not None
            else torch.zeros(logits0.shape[0], dtype=torch.long, device=logits0.device)
        )
        targets = torch.zeros(len(MODALITIES), cfg.num_experts, dtype=torch.bool, device=logits0.device)
        for modality, experts in cfg.modality_expert_map.items():
            targets[MODALITIES.index(modality), experts] = True

        totals = {"balance_loss": 0.0, "z_loss": 0.0, "modality_expert_loss": 0.0, "modality_kl_loss": 0.0}
        for logits in router_logits:
            layer_mods = mods
            if keep is not None:
                logits, layer_mods = logits[keep], mods[keep]
            top_k_index = logits.topk(cfg.num_experts_per_tok, dim=-1).indices
            totals["balance_loss"] = totals["balance_loss"] + load_balancing_loss(logits, top_k_index, cfg.num_experts)
            totals["z_loss"] = totals["z_loss"] + router_z_loss(logits)
            totals["modality_expert_loss"] = totals["modality_expert_loss"] + modality_expert_loss(
                logits, layer_mods, targets, cfg.modality_expert_loss_type
            )
            totals["modality_kl_loss"] = totals["modality_kl_loss"] + modality_kl_loss(
                logits, layer_mods, len(MODALITIES)
            )
        losses = {name: value / len(router_logits) for name, value in totals.items()}
        losses["aux_loss"] = (
            cfg.router_aux_loss_coef * losses["balance_loss"]
            + cfg.router_z_loss_coef * losses["z_loss"]
            + cfg.modality_expert_loss_coef * losses["modality_expert_loss"]
            + cfg.modality_kl_loss_coef * losses["modality_kl_loss"]
        )
        return losses

    # -- forward -------------------------------------------------------------------------------------------------------
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_encoder_states: torch.FloatTensor | None = None,
        audio_encoder_states: torch.FloatTensor | None = None,
        **kwargs,
    ) -> UniMoECausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets (shifted inside the loss); -100 is ignored. Mask the placeholder positions with -100.
        output_router_logits (`bool`, *optional*):
            Return the routers' logits; the auxiliary losses are computed whenever this is set or labels are given.
        image_encoder_states, audio_encoder_states (`torch.FloatTensor`, *optional*):
            Pre-stored frozen-encoder outputs instead of `pixel_values` / `input_features` (see [`UniMoEModel`]).
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        cache = _pop_cache(cache, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            input_features=input_features,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            image_encoder_states=image_encoder_states,
            audio_encoder_states=audio_encoder_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])  # (batch, kept positions, vocab)

        lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        aux = {}
        if labels is not None or output_router_logits:
            modality_ids = self.model.modality_ids(input_ids) if input_ids is not None else None
            aux = self.compute_aux_losses(outputs.router_logits, modality_ids, attention_mask)
        loss = None
        if lm_loss is not None:
            loss = lm_loss + aux["aux_loss"].to(lm_loss.device)

        return UniMoECausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux.get("aux_loss"),
            balance_loss=aux.get("balance_loss"),
            z_loss=aux.get("z_loss"),
            modality_expert_loss=aux.get("modality_expert_loss"),
            modality_kl_loss=aux.get("modality_kl_loss"),
            logits=logits,
            **{CACHE_KEY: outputs[CACHE_KEY] if CACHE_KEY in outputs else None},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
            image_hidden_states=outputs.image_hidden_states,
            video_hidden_states=outputs.video_hidden_states,
            audio_hidden_states=outputs.audio_hidden_states,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids,
        inputs_embeds=None,
        pixel_values=None,
        pixel_values_videos=None,
        input_features=None,
        attention_mask=None,
        is_first_iteration=False,
        image_encoder_states=None,
        audio_encoder_states=None,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        # Media only enter the prefill step; later steps read their features from the KV cache.
        media = {"pixel_values": pixel_values, "pixel_values_videos": pixel_values_videos,
                 "input_features": input_features, "image_encoder_states": image_encoder_states,
                 "audio_encoder_states": audio_encoder_states}
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update(media)
        else:
            for key in media:
                model_inputs.pop(key, None)
        return model_inputs

    # -- building from pretrained parts --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained_parts(
        cls,
        llm: str | os.PathLike,
        vision: str | os.PathLike | None = None,
        audio: str | os.PathLike | None = None,
        *,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        tokenizer=None,
        upcycle_noise: float = 0.0,
        dtype: torch.dtype = torch.float32,
        seed: int | None = 0,
        audio_window_seconds: int | None = None,
        **config_kwargs,
    ) -> "UniMoEForConditionalGeneration":
        """Upcycles a dense LLM into a Uni-MoE model and copies the pretrained encoders in.

        Every dense FFN of an MoE layer is copied into each of its experts (plus N(0, upcycle_noise^2) noise per
        copy); attention, norms, embeddings and the LM head are copied as they are; routers and connectors are freshly
        initialized (routers small: `router_init_std`). With `upcycle_noise=0` every expert equals the dense FFN and
        the top-k weights sum to 1, so text-only logits equal the dense LLM's.

        Args:
            llm, vision, audio: local folders (or Hub ids) of a dense Llama/Qwen2/Mistral causal LM, a vision encoder
                (CLIP / SigLIP full or vision-only checkpoints, DINOv2), a Whisper checkpoint.
            tokenizer (*optional*): the LLM's tokenizer. Placeholder tokens `<image>`, `<video>`, `<audio>` (for the
                modalities given) are added to it in place and their ids used; without it they take fresh ids appended
                after the LLM's vocabulary. The embedding matrix grows to cover the new ids.
            audio_window_seconds (*optional*): shortens Whisper's 30 s window to this many seconds by keeping its first
                positional embeddings (whisper.cpp's `audio_ctx`); short clips then cost a fraction of a 30 s window.
                Pair it with a feature extractor whose `chunk_length` is the same.
            config_kwargs: any other [`UniMoEConfig`] argument (connector types, moe_layers, loss coefficients...).
        """
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        dense = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype)
        vision_model = _load_vision_encoder(vision, dtype) if vision is not None else None
        audio_encoder = _load_audio_encoder(audio, dtype) if audio is not None else None
        audio_state = audio_encoder.state_dict() if audio_encoder is not None else None
        if audio_window_seconds is not None:
            limit = audio_encoder.config.max_source_positions if audio_encoder is not None else 0
            if not 1 <= int(audio_window_seconds) * 50 <= limit:
                raise ValueError(f"audio_window_seconds={audio_window_seconds} needs a Whisper encoder with at least "
                                 "that many seconds of positions")
            positions = int(audio_window_seconds) * 50  # 100 mel frames/s, halved by Whisper's stride-2 conv
            audio_encoder.config.max_source_positions = positions
            audio_state["embed_positions.weight"] = audio_state["embed_positions.weight"][:positions]

        # Placeholder ids: the tokenizer's (added in place) or fresh ids after the vocabulary.
        wanted = (["image", "video"] if vision is not None else []) + (["audio"] if audio is not None else [])
        vocab_size = dense.config.vocab_size
        token_ids = {}
        if tokenizer is not None:
            tokens = [f"<{m}>" for m in wanted]
            new = [t for t in tokens if t not in tokenizer.get_vocab()]
            if new:
                tokenizer.add_tokens(new, special_tokens=True)
            token_ids = {m: tokenizer.convert_tokens_to_ids(f"<{m}>") for m in wanted}
            new_vocab = max(vocab_size, len(tokenizer))
        else:
            token_ids = {m: vocab_size + i for i, m in enumerate(wanted)}
            new_vocab = vocab_size + len(wanted)

        config = UniMoEConfig(
            text_config=dense.config.to_dict(),
            vision_config=vision_model.config.to_dict() if vision_model is not None else None,
            audio_config=audio_encoder.config.to_dict() if audio_encoder is not None else None,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            upcycle_noise=upcycle_noise,
            image_token_id=token_ids.get("image"),
            video_token_id=token_ids.get("video"),
            audio_token_id=token_ids.get("audio"),
            **config_kwargs,
        )
        if config.moe_intermediate_size != dense.config.intermediate_size:
            raise ValueError(
                f"upcycling needs expert_intermediate_size == the dense intermediate_size "
                f"({dense.config.intermediate_size}), got {config.moe_intermediate_size}"
            )
        model = cls(config).to(dtype)

        # Decoder: every parameter of the dense model except the FFNs that became MoE blocks.
        dense_state = dense.model.state_dict()
        missing, unexpected = model.model.language_model.load_state_dict(dense_state, strict=False)
        moe_layers = set(config.moe_layer_indices)
        bad_missing = [k for k in missing if not re.match(r"layers\.(\d+)\.mlp\.(gate|experts)\.", k)]
        bad_unexpected = [
            k for k in unexpected if not ((m := _DENSE_FFN_KEY.search(k)) and int(m.group(1)) in moe_layers)
        ]
        if bad_missing or bad_unexpected:
            raise RuntimeError(
                f"dense LLM doesn't match the MoE decoder: missing {bad_missing}, unexpected {bad_unexpected}"
            )
        model.load_dense_ffns_into_experts(dense_state, noise_std=upcycle_noise, generator=generator)
        with torch.no_grad():
            model.lm_head.weight.copy_(dense.lm_head.weight)
            if vision_model is not None:
                model.model.vision_tower.load_state_dict(vision_model.state_dict())
            if audio_encoder is not None:
                model.model.audio_tower.load_state_dict(audio_state)
        if getattr(dense, "generation_config", None) is not None:
            # Keep the LLM's generation defaults (eos of its chat format...), never generating a placeholder.
            model.generation_config = copy.deepcopy(dense.generation_config)
            model.generation_config.suppress_tokens = sorted(config.placeholder_token_ids().values()) or None
        del dense, vision_model, audio_encoder
        if new_vocab > vocab_size:
            # mean_resizing: new rows start at the mean embedding, keeping the old tokens' logits unchanged.
            model.resize_token_embeddings(new_vocab, mean_resizing=True)
        model.tie_weights()
        return model

    @torch.no_grad()
    def load_dense_ffns_into_experts(
        self,
        state_dict: dict[str, torch.Tensor],
        experts: list[int] | None = None,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        """Copies the dense FFN weights of `state_dict` (keys `...layers.{i}.mlp.{gate,up,down}_proj.weight`, any
        prefix) into the given experts (default: all) of every MoE layer, adding N(0, noise_std^2) noise per copy."""
        ffns: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            if m := _DENSE_FFN_KEY.search(key):
                ffns.setdefault(int(m.group(1)), {})[m.group(2)] = value
        experts = list(range(self.config.num_experts)) if experts is None else experts
        for layer_idx, block in zip(self.config.moe_layer_indices, self.model.moe_blocks):
            parts = ffns.get(layer_idx, {})
            if len(parts) != 3:
                raise ValueError(
                    f"no dense FFN (gate_proj, up_proj, down_proj) for MoE layer {layer_idx} in the source"
                )
            gate_up = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=0)  # (2I, H)
            down = parts["down_proj"]  # (H, I)
            if gate_up.shape != block.experts.gate_up_proj.shape[1:] or down.shape != block.experts.down_proj.shape[1:]:
                raise ValueError(
                    f"layer {layer_idx}: dense FFN shapes {tuple(gate_up.shape)}/{tuple(down.shape)} don't match the "
                    f"experts' {tuple(block.experts.gate_up_proj.shape[1:])}/{tuple(block.experts.down_proj.shape[1:])}"
                )
            for e in experts:
                for target, source in ((block.experts.gate_up_proj, gate_up), (block.experts.down_proj, down)):
                    value = source.to(target.device, torch.float32)
                    if noise_std > 0:
                        value = value + noise_std * torch.randn(value.shape, generator=generator).to(value.device)
                    target[e].copy_(value.to(target.dtype))

    def init_experts_from(self, sources: list, noise_std: float = 0.0, seed: int | None = 0) -> None:
        """Initializes expert i of every MoE layer from `sources[i]`: the per-modality dense FFNs of Uni-MoE's stage 2.

        Each source is a state dict, an `nn.Module` or a folder of `*.safetensors` files, holding at least the dense
        FFNs (`...layers.{i}.mlp.{gate,up,down}_proj.weight`, any prefix). `len(sources)` must equal `num_experts`
        (repeat a source to give it several experts).
        """
        if len(sources) != self.config.num_experts:
            raise ValueError(
                f"init_experts_from needs one source per expert ({self.config.num_experts}), got {len(sources)}"
            )
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for expert_idx, source in enumerate(sources):
            self.load_dense_ffns_into_experts(
                _ffn_state_dict(source), experts=[expert_idx], noise_std=noise_std, generator=generator
            )


def _drop_experts_implementation(sub_config) -> None:
    # `experts_implementation` given to the Uni-MoE config (or to from_pretrained) propagates to every sub-config, but
    # the HF decoder and encoders built from them have no experts of their own (ours are in moe_layers.py, driven by
    # the top config) and refuse an explicit "grouped_mm": let them pick their default.
    if sub_config is not None and sub_config._experts_implementation not in (None, "eager"):
        sub_config._experts_implementation = None


def _ffn_state_dict(source) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        from safetensors import safe_open

        out = {}
        files = sorted(glob.glob(os.path.join(str(source), "*.safetensors")))
        if not files:
            raise ValueError(f"no *.safetensors file in {source}")
        for path in files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if _DENSE_FFN_KEY.search(key):
                        out[key] = f.get_tensor(key)
        return out
    raise ValueError(f"expert source must be a state dict, an nn.Module or a folder, got {type(source).__name__}")


def _load_vision_encoder(path, dtype) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(path)
    # Full CLIP / SigLIP checkpoints: keep the vision tower only.
    config = getattr(config, "vision_config", None) or config
    return MODEL_MAPPING[type(config)].from_pretrained(path, dtype=dtype)


def _load_audio_encoder(path, dtype) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "whisper":
        raise ValueError(f"audio encoder must be a Whisper checkpoint, got model_type {config.model_type!r}")
    return AutoModel.from_pretrained(path, dtype=dtype).get_encoder()


__all__ = ["UniMoEForConditionalGeneration", "UniMoEModel", "UniMoEPreTrainedModel", "UniMoESparseMoeBlock"]
