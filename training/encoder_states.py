"""Pre-stored encoder states: the frozen encoders of a Uni-MoE-style model run once per data set, not once per step.

Uni-MoE's vision and audio encoders never train (stages 1-3 all keep them frozen), yet every epoch of every stage
would run them again on the same images and clips. `prestore_encoder_states` computes what the connectors read
(`get_image_encoder_states` / `get_audio_encoder_states`) once, batched and with a progress bar, into an Arrow file
under `$MULTIMODAL_MOE_HOME/features` (float16), keyed on everything that changes them: the encoder's config and
weights, the feature layer, the processor's settings and the data. `UniMoEDataCollator` then feeds the stored states
(`image_encoder_states` / `audio_encoder_states`) instead of pixels and mel frames. The same idea as Alt-MoE's latent
pre-storage (`features.py`), one level earlier: the connector still sees every encoder token.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import torch

from .data.tasks import load_audio
from .features import _weights_digest, features_home

STATE_COLUMNS = {"image": "image_states", "audio": "audio_states"}


def _encoders(model):
    """The module holding the encoders (a Uni-MoE base model, also inside a peft or DDP wrapper) and its towers."""
    inner = next((m for m in model.modules() if hasattr(m, "get_image_encoder_states")), None)
    if inner is None:
        raise ValueError(f"{type(model).__name__} has no get_image_encoder_states / get_audio_encoder_states")
    return inner, {"image": inner.vision_tower, "audio": inner.audio_tower}


def encoder_states_key(model, processor, dataset: datasets.Dataset, modality: str,
                       autocast_dtype: torch.dtype | None = None) -> str:
    """A hash of everything that determines the stored `modality` states of `dataset`."""
    inner, towers = _encoders(model)
    cfg = inner.config
    part = processor.image_processor if modality == "image" else processor.feature_extractor
    key = {
        "modality": modality,
        "encoder": (cfg.vision_config if modality == "image" else cfg.audio_config).to_dict(),
        "layer": cfg.vision_feature_layer if modality == "image" else cfg.audio_feature_layer,
        "select": cfg.vision_feature_select_strategy if modality == "image" else None,
        "image_size": cfg.vision_image_size if modality == "image" else None,
        "processor": part.to_dict(),
        "weights": _weights_digest(towers[modality]),
        "data": dataset._fingerprint,
        "autocast": str(autocast_dtype),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def prestore_encoder_states(model, processor, dataset: datasets.Dataset, *, batch_size: int = 16,
                            cache_dir=None, autocast_dtype: torch.dtype | None = None,
                            desc: str = "encoder states") -> datasets.Dataset:
    """`dataset` (conversation rows with `images` / `audio` lists, see `data/tasks.py`) with those raw media columns
    replaced by `image_states` (items, encoder tokens, d) and `audio_states` (clips, encoder frames, d), float16.

    Rows without an image (or clip) hold an empty (0, tokens, d) array, so data sets of different tasks concatenate.
    `autocast_dtype`: run the encoders under autocast (bfloat16 on a CPU with AMX is ~3x faster than float32).
    """
    inner, towers = _encoders(model)
    modalities = [m for m in ("image", "audio") if towers[m] is not None]
    if any(p.requires_grad for m in modalities for p in towers[m].parameters()):
        raise ValueError("the encoders have trainable parameters: their outputs change during training, so they "
                         "can't be pre-stored (freeze them, or train from raw media)")
    cfg = inner.config
    shapes = {"image": (cfg.vision_connector_input_length, cfg.encoder_hidden_size("image")) if cfg.vision_config
              else None,
              "audio": (cfg.audio_config.max_source_positions, cfg.encoder_hidden_size("audio")) if cfg.audio_config
              else None}
    device = next(inner.parameters()).device
    cache_dir = Path(cache_dir or features_home())
    cache_dir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({
        **{k: v for k, v in dataset.features.items() if k not in ("images", "audio")},
        **{STATE_COLUMNS[m]: datasets.Array3D(shape=(None, *shapes[m]), dtype="float16") for m in modalities},
    })

    @torch.no_grad()
    def encode(batch):
        out = {}
        for m in modalities:
            items = batch["images" if m == "image" else "audio"]
            flat = [x for row in items for x in (row or [])]
            states = np.zeros((0, *shapes[m]), np.float16)
            if flat:
                # the processors outside autocast (Whisper's log-mel goes through numpy, which has no bfloat16)
                if m == "image":
                    inputs = processor.image_processor([im.convert("RGB") for im in flat], return_tensors="pt")
                    inputs, run = inputs["pixel_values"], inner.get_image_encoder_states
                else:
                    inputs = processor._audio_features([load_audio(a) for a in flat], None)
                    run = inner.get_audio_encoder_states
                with torch.autocast(device.type, autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    states = run(inputs.to(device))
                states = states.float().cpu().numpy().astype(np.float16)
            counts = np.cumsum([0] + [len(row or []) for row in items])
            out[STATE_COLUMNS[m]] = [states[a:b] for a, b in zip(counts[:-1], counts[1:])]
        return out

    # One cache file per data set and encoder weights; datasets writes it under a temporary name and renames it, so an
    # interrupted run leaves nothing half-written and the next run picks the finished file up.
    keys = "-".join(encoder_states_key(model, processor, dataset, m, autocast_dtype) for m in modalities)
    key = hashlib.sha256(keys.encode()).hexdigest()[:20]
    modes = {m: towers[m].training for m in modalities}
    for m in modalities:
        towers[m].eval()  # no dropout in what is stored
    try:
        return dataset.map(
            encode,
            batched=True,
            batch_size=batch_size,
            remove_columns=[c for c in ("images", "audio") if c in dataset.column_names],
            features=features,
            cache_file_name=str(cache_dir / f"encoder-states-{key}.arrow"),
            new_fingerprint=key,
            load_from_cache_file=True,
            desc=desc,
        )
    finally:
        for m in modalities:
            towers[m].train(modes[m])


def as_training_format(dataset: datasets.Dataset) -> datasets.Dataset:
    """Stored states read as numpy arrays (the rest as Python objects) by the collator."""
    columns = [c for c in STATE_COLUMNS.values() if c in dataset.column_names]
    return dataset.with_format("numpy", columns=columns, output_all_columns=True) if columns else dataset


__all__ = ["STATE_COLUMNS", "as_training_format", "encoder_states_key", "prestore_encoder_states"]
