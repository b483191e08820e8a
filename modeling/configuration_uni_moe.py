# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Uni-MoE configuration (arXiv 2405.11273): frozen modality encoders, connectors, and an LLM with sparse MoE FFNs."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig

from .configuration_common import as_sub_config as _as_config
from .configuration_common import check_modality


# Index of each modality in the per-token modality ids (`UniMoEForConditionalGeneration.modality_ids`).
MODALITIES = ("text", "image", "video", "audio")
CONNECTOR_TYPES = ("mlp", "qformer")
VISION_MODEL_TYPES = ("clip_vision_model", "dinov2", "siglip_vision_model")
AUDIO_MODEL_TYPES = ("whisper",)
TEXT_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Vision encoders that prepend a CLS token to the patch tokens.
_VISION_HAS_CLS = {"clip_vision_model": True, "dinov2": True, "siglip_vision_model": False}


class UniMoEConfig(PreTrainedConfig):
    r"""
    Configuration of [`UniMoEForConditionalGeneration`]: an LLM of the Llama / Qwen2 / Mistral families whose dense
    FFNs are replaced by sparse mixtures of SwiGLU experts, fed with the outputs of frozen modality encoders through one
    connector per modality.

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            The LLM (`llama`, `qwen2` or `mistral`). A dict must carry `model_type`.
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Image / video encoder: `clip_vision_model`, `dinov2` or `siglip_vision_model`. Videos are encoded frame by
            frame and the encoder features are mean-pooled over frames.
        audio_config (`dict` or `PreTrainedConfig`, *optional*):
            Speech / audio encoder: `whisper` (only its encoder is built).
        vision_connector_type, audio_connector_type (`str`, defaults to "mlp" and "qformer"):
            "mlp" (Linear -> GELU -> Linear, LLaVA-1.5; one LLM token per encoder token) or "qformer" (learnable
            queries cross-attending to the encoder states; `*_num_query_tokens` LLM tokens per input).
        vision_num_query_tokens (`int`, defaults to 32), audio_num_query_tokens (`int`, defaults to 50):
            Query count of a Q-Former connector (the official code uses 50 per 30-second speech chunk).
        vision_merge_size (`int`, defaults to 1), audio_merge_size (`int`, defaults to 1):
            For an "mlp" connector: merge k x k neighbouring patches (vision, Qwen2-VL's patch merger) or k consecutive
            frames (audio, SLAM-ASR's downsampling projector) into one LLM token by concatenation, so an input takes
            k^2 (or k) times fewer LLM tokens. 1 keeps one LLM token per encoder token (LLaVA).
        qformer_hidden_size (`int`, *optional*): width of the Q-Former, defaults to the LLM's hidden size.
        qformer_num_layers (`int`, defaults to 2), qformer_num_heads (`int`, defaults to 8): Q-Former depth / heads.
        connector_hidden_act (`str`, defaults to "gelu"): activation of both connector types.
        vision_feature_layer (`int`, defaults to -2): hidden-state index taken from the vision encoder (LLaVA: -2).
        vision_image_size (`int`, *optional*): input resolution given to the vision encoder when it differs from
            `vision_config.image_size` (DINOv2 interpolates its position embeddings: the zoo's DINOv2 has image_size
            518 but its processor crops 224). Sets the image token count.
        vision_feature_select_strategy (`str`, defaults to "default"): "default" drops the CLS token (if the encoder
            has one), "full" keeps it.
        audio_feature_layer (`int`, defaults to -1): hidden-state index taken from the audio encoder.
        moe_layers (`str` or `list[int]`, defaults to "all"): which decoder layers get a sparse MoE FFN: "all", or
            "interval" (every `moe_layer_interval`-th layer, starting at `moe_layer_offset`), or an explicit list. An
            empty list keeps every FFN dense: the dense multimodal model of Uni-MoE's stages 1 and 2.
        moe_layer_interval (`int`, defaults to 1), moe_layer_offset (`int`, defaults to 0): see `moe_layers`.
        num_experts (`int`, defaults to 4), num_experts_per_tok (`int`, defaults to 2): expert count and top-k.
        expert_intermediate_size (`int`, *optional*): width of each SwiGLU expert, defaults to the LLM's
            `intermediate_size` (required for upcycling).
        router_aux_loss_coef (`float`, defaults to 0.01): coefficient of the Switch/GShard balance loss.
        router_z_loss_coef (`float`, defaults to 0.0): coefficient of the ST-MoE router z-loss.
        modality_expert_map (`dict[str, list[int]]`, *optional*): for each modality of `MODALITIES`, the experts its
            tokens are pushed toward by the modality-expert loss, e.g. `{"text": [0], "image": [1], "audio": [2, 3]}`.
            Modalities not listed are not constrained.
        modality_expert_loss_type (`str`, defaults to "l1"): "l1" or "ce", see [`moe_layers.modality_expert_loss`]:
            with p the router softmax of a token of modality m and S_m its target experts, "l1" is 1 - sum_{e in S_m}
            p_e (the probability mass routed outside S_m, = half the L1 distance from p to the nearest distribution on
            S_m) and "ce" is -log(sum_{e in S_m} p_e); both averaged over the constrained tokens.
        modality_expert_loss_coef (`float`, defaults to 0.0): its coefficient.
        modality_kl_loss_coef (`float`, defaults to 0.0): coefficient of the modality KL loss, see
            [`moe_layers.modality_kl_loss`]: the mean over ordered pairs (m, n), m != n, of modalities present in the
            batch of KL(P_m || P_n), P_m being the mean router softmax over the tokens of modality m. A positive
            coefficient pulls the modalities' routing together; a negative one pushes them apart (specialisation).
        router_init_std (`float`, *optional*): std of the router's normal init, defaults to `initializer_range`.
        upcycle_noise (`float`, defaults to 0.0): std of the Gaussian noise added to each expert copy when upcycling
            a dense FFN (absolute, in weight units; 0 keeps every expert equal to the dense FFN).
        image_token_id, video_token_id, audio_token_id (`int`, *optional*): placeholder ids in the LLM vocabulary.
        freeze_encoders (`bool`, defaults to True): the modality encoders never receive gradients unless False.
        output_router_logits (`bool`, defaults to False): return the routers' logits (and always the aux losses).
        initializer_range (`float`, defaults to 0.02).

    The number of placeholder tokens per image / video / audio clip is derived, not stored: see `image_seq_length`,
    `video_seq_length` and `audio_seq_length`.
    """

    model_type = "uni_moe"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig, "audio_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        audio_config=None,
        vision_connector_type: str = "mlp",
        audio_connector_type: str = "qformer",
        vision_num_query_tokens: int = 32,
        audio_num_query_tokens: int = 50,
        vision_merge_size: int = 1,
        audio_merge_size: int = 1,
        qformer_hidden_size: int | None = None,
        qformer_num_layers: int = 2,
        qformer_num_heads: int = 8,
        connector_hidden_act: str = "gelu",
        vision_feature_layer: int = -2,
        vision_image_size: int | None = None,
        vision_feature_select_strategy: str = "default",
        audio_feature_layer: int = -1,
        moe_layers: str | list[int] = "all",
        moe_layer_interval: int = 1,
        moe_layer_offset: int = 0,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        expert_intermediate_size: int | None = None,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.0,
        modality_expert_map: dict | None = None,
        modality_expert_loss_type: str = "l1",
        modality_expert_loss_coef: float = 0.0,
        modality_kl_loss_coef: float = 0.0,
        router_init_std: float | None = None,
        upcycle_noise: float = 0.0,
        image_token_id: int | None = None,
        video_token_id: int | None = None,
        audio_token_id: int | None = None,
        freeze_encoders: bool = True,
        output_router_logits: bool = False,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool | None = None,
        **kwargs,
    ):
        text_config = text_config if text_config is not None else {"model_type": "llama"}
        self.text_config = _as_config("text_config", text_config)
        self.vision_config = _as_config("vision_config", vision_config)
        self.audio_config = _as_config("audio_config", audio_config)
        self.vision_connector_type = vision_connector_type
        self.audio_connector_type = audio_connector_type
        self.vision_num_query_tokens = vision_num_query_tokens
        self.audio_num_query_tokens = audio_num_query_tokens
        self.vision_merge_size = vision_merge_size
        self.audio_merge_size = audio_merge_size
        self.qformer_hidden_size = qformer_hidden_size
        self.qformer_num_layers = qformer_num_layers
        self.qformer_num_heads = qformer_num_heads
        self.connector_hidden_act = connector_hidden_act
        self.vision_feature_layer = vision_feature_layer
        self.vision_image_size = vision_image_size
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.audio_feature_layer = audio_feature_layer
        self.moe_layers = moe_layers if isinstance(moe_layers, str) else [int(i) for i in moe_layers]
        self.moe_layer_interval = moe_layer_interval
        self.moe_layer_offset = moe_layer_offset
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.expert_intermediate_size = expert_intermediate_size
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.modality_expert_map = {str(k): [int(e) for e in v] for k, v in (modality_expert_map or {}).items()}
        self.modality_expert_loss_type = modality_expert_loss_type
        self.modality_expert_loss_coef = modality_expert_loss_coef
        self.modality_kl_loss_coef = modality_kl_loss_coef
        self.router_init_std = router_init_std
        self.upcycle_noise = upcycle_noise
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.audio_token_id = audio_token_id
        self.freeze_encoders = freeze_encoders
        self.output_router_logits = output_router_logits
        self.initializer_range = initializer_range
        # The LM head shares the LLM's embedding exactly when the source LLM ties them (SmolLM2 does, Llama-2 doesn't).
        self.tie_word_embeddings = (
            bool(getattr(self.text_config, "tie_word_embeddings", False))
            if tie_word_embeddings is None
            else tie_word_embeddings
        )
        super().__init__(**kwargs)
        self.validate_uni_moe()

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        """The non-text modalities this model has an encoder for."""
        found = []
        if self.vision_config is not None:
            found += ["image", "video"]
        if self.audio_config is not None:
            found.append("audio")
        return found

    @property
    def moe_intermediate_size(self) -> int:
        return self.expert_intermediate_size or self.text_config.intermediate_size

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the decoder layers whose FFN is a sparse MoE block."""
        n = self.text_config.num_hidden_layers
        if self.moe_layers == "all":
            return list(range(n))
        if self.moe_layers == "interval":
            return list(range(self.moe_layer_offset, n, self.moe_layer_interval))
        return sorted(self.moe_layers)

    @property
    def vision_has_cls(self) -> bool:
        return _VISION_HAS_CLS.get(getattr(self.vision_config, "model_type", None), False)

    @property
    def image_seq_length(self) -> int | None:
        """Placeholder tokens per image: the connector's output token count."""
        if self.vision_config is None:
            return None
        if self.vision_connector_type == "qformer":
            return self.vision_num_query_tokens
        return self.vision_connector_input_length // self.vision_merge_size**2

    @property
    def vision_connector_input_length(self) -> int:
        """Encoder tokens per image the vision connector reads (CLS dropped under the "default" strategy)."""
        drop_cls = self.vision_has_cls and self.vision_feature_select_strategy == "default"
        return self.vision_encoder_seq_length - int(drop_cls)

    @property
    def video_seq_length(self) -> int | None:
        """Placeholder tokens per video: frames are pooled, so a video takes as many tokens as an image."""
        return self.image_seq_length

    @property
    def audio_seq_length(self) -> int | None:
        """Placeholder tokens per audio clip (one encoder window, 30 s for Whisper)."""
        if self.audio_config is None:
            return None
        if self.audio_connector_type == "qformer":
            return self.audio_num_query_tokens
        return self.audio_config.max_source_positions // self.audio_merge_size

    @property
    def vision_encoder_seq_length(self) -> int:
        """Tokens the vision encoder outputs per image (patches, plus CLS where the encoder has one)."""
        cfg = self.vision_config
        return ((self.vision_image_size or cfg.image_size) // cfg.patch_size) ** 2 + int(self.vision_has_cls)

    @property
    def audio_max_frames(self) -> int:
        """Mel frames one audio-encoder window takes (Whisper: 2 x max_source_positions = 3000, i.e. 30 s)."""
        return 2 * self.audio_config.max_source_positions

    def _validate_merge_sizes(self) -> None:
        for modality, kind, k in (("vision", self.vision_connector_type, self.vision_merge_size),
                                  ("audio", self.audio_connector_type, self.audio_merge_size)):
            cfg = getattr(self, f"{modality}_config")
            if cfg is None or k == 1:
                continue
            if kind != "mlp":
                raise ValueError(f"{modality}_merge_size={k} needs {modality}_connector_type='mlp', got {kind!r}")
            if modality == "vision":
                grid = (self.vision_image_size or cfg.image_size) // cfg.patch_size
                if self.vision_has_cls and self.vision_feature_select_strategy == "full":
                    raise ValueError("vision_merge_size > 1 merges the patch grid: it can't keep the CLS token "
                                     "(use vision_feature_select_strategy='default')")
                if grid % k:
                    raise ValueError(f"vision_merge_size={k} must divide the {grid}x{grid} patch grid")
            elif cfg.max_source_positions % k:
                raise ValueError(f"audio_merge_size={k} must divide the {cfg.max_source_positions} encoder frames")

    def encoder_hidden_size(self, modality: str) -> int:
        cfg = self.vision_config if modality in ("image", "video", "vision") else self.audio_config
        for name in ("hidden_size", "d_model"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        raise ValueError(f"can't tell the feature width of the {modality} encoder ({cfg.model_type})")

    def placeholder_token_ids(self) -> dict[str, int]:
        """{modality: placeholder id} for the modalities this model has an encoder for."""
        ids = {"image": self.image_token_id, "video": self.video_token_id, "audio": self.audio_token_id}
        return {m: ids[m] for m in self.modalities if ids[m] is not None}

    # ----------------------------------------------------------------------------------------------------------------
    def validate_uni_moe(self):
        text_type = self.text_config.model_type
        if text_type not in TEXT_MODEL_TYPES:
            raise ValueError(f"text_config must be one of {TEXT_MODEL_TYPES} (a SwiGLU decoder), got {text_type!r}")
        if self.vision_config is not None and self.vision_config.model_type not in VISION_MODEL_TYPES:
            raise ValueError(
                f"vision_config must be one of {VISION_MODEL_TYPES}, got {self.vision_config.model_type!r}"
            )
        if self.audio_config is not None and self.audio_config.model_type not in AUDIO_MODEL_TYPES:
            raise ValueError(f"audio_config must be one of {AUDIO_MODEL_TYPES}, got {self.audio_config.model_type!r}")
        for name in ("vision_connector_type", "audio_connector_type"):
            if getattr(self, name) not in CONNECTOR_TYPES:
                raise ValueError(f"{name} must be one of {CONNECTOR_TYPES}, got {getattr(self, name)!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' or 'full', got "
                f"{self.vision_feature_select_strategy!r}"
            )
        for name in ("num_experts", "vision_num_query_tokens", "audio_num_query_tokens", "qformer_num_layers",
                     "qformer_num_heads", "moe_layer_interval", "vision_merge_size", "audio_merge_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        self._validate_merge_sizes()
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}"
            )
        qformer_hidden = self.qformer_hidden_size or self.text_config.hidden_size
        uses_qformer = (self.vision_config is not None and self.vision_connector_type == "qformer") or (
            self.audio_config is not None and self.audio_connector_type == "qformer"
        )
        if uses_qformer and qformer_hidden % self.qformer_num_heads:
            raise ValueError(
                f"qformer_hidden_size ({qformer_hidden}) must be divisible by qformer_num_heads "
                f"({self.qformer_num_heads})"
            )
        if isinstance(self.moe_layers, str) and self.moe_layers not in ("all", "interval"):
            raise ValueError(
                f"moe_layers must be 'all', 'interval' or a list of layer indices, got {self.moe_layers!r}"
            )
        n_layers = self.text_config.num_hidden_layers
        if any(not 0 <= i < n_layers for i in self.moe_layer_indices):
            raise ValueError(f"moe layers {self.moe_layer_indices} must be a subset of range({n_layers})")
        if self.moe_layers == "interval" and not self.moe_layer_indices:
            raise ValueError(f"moe_layer_offset {self.moe_layer_offset} leaves no MoE layer in range({n_layers})")
        for modality, experts in self.modality_expert_map.items():
            check_modality(modality, MODALITIES)
            if not experts or any(not 0 <= e < self.num_experts for e in experts):
                raise ValueError(
                    f"modality_expert_map[{modality!r}] must list experts in range({self.num_experts}), got {experts}"
                )
        if self.modality_expert_loss_type not in ("l1", "ce"):
            raise ValueError(f"modality_expert_loss_type must be 'l1' or 'ce', got {self.modality_expert_loss_type!r}")
        if self.upcycle_noise < 0:
            raise ValueError(f"upcycle_noise must be >= 0, got {self.upcycle_noise}")
        ids = [i for i in (self.image_token_id, self.video_token_id, self.audio_token_id) if i is not None]
        if len(set(ids)) != len(ids):
            raise ValueError(f"image/video/audio token ids must differ, got {ids}")


__all__ = ["UniMoEConfig"]
