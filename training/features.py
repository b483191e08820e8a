"""Latent pre-storage: each modality's frozen-backbone features computed once into a memory-mapped datasets cache.

Alt-MoE's connector only ever sees one pooled vector per sample, and the backbones are frozen, so features are
computed once (batched, with a progress bar) and every training step afterwards reads them from Arrow files instead
of running the backbones. The cache key covers everything that changes the features — the backbone's config and
source/revision, the pooling, the processor's settings and the data — so changing any of them recomputes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import datasets
import numpy as np
import torch

from .data import SAMPLE_RATE, read_wav

# What the processor takes for each modality's raw column.
PROCESSOR_ARGUMENT = {"text": "text", "vision": "images", "audio": "audio"}


def features_home() -> Path:
    return Path(os.environ.get("MULTIMODAL_MOE_HOME", Path.home() / ".cache" / "multimodal_moe")) / "features"


def feature_cache_key(model, processor, modality: str, dataset: datasets.Dataset, column: str) -> str:
    """A hash of everything that determines `<modality>_features` for this data set."""
    config = model.config
    part = {"text": processor.tokenizer, "vision": processor.image_processor, "audio": processor.feature_extractor}[modality]
    part_settings = part.to_dict() if hasattr(part, "to_dict") else {"name": getattr(part, "name_or_path", ""),
                                                                       "vocab_size": len(part)}
    key = {
        "modality": modality,
        "backbone": config.backbone_config(modality).to_dict(),
        "source": config.backbone_sources.get(modality),
        "feature_layers": config.feature_layers,
        "token_pooling": config.token_pooling[modality],
        "processor": part_settings,
        "text_template": processor.text_template if modality == "text" else None,
        "data": dataset._fingerprint,
        "column": column,
        "weights": _weights_digest(model.backbones[modality]),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _weights_digest(module: torch.nn.Module) -> str:
    # A cheap fingerprint of the weights: a fine-tuned or re-converted backbone with the same config must not reuse
    # the cache. Summing a few values per tensor is enough to tell checkpoints apart, and takes milliseconds.
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        h.update(name.encode())
        h.update(np.asarray(flat[:: max(1, flat.numel() // 64)].float().cpu()).tobytes())
    return h.hexdigest()[:16]


def precompute_features(
    model,
    processor,
    dataset: datasets.Dataset,
    columns: dict[str, str],
    *,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    keep_columns: tuple[str, ...] = ("id", "text", "name"),
) -> datasets.Dataset:
    """Add a `<modality>_features` column for every `{modality: raw column}` in `columns`.

    Each modality is cached in its own Arrow file under `cache_dir` (default `$MULTIMODAL_MOE_HOME/features`), so
    changing the text backbone leaves the image features alone. Returns a memory-mapped data set with the feature
    columns plus `keep_columns` that exist.
    """
    cache_dir = Path(cache_dir or features_home())
    cache_dir.mkdir(parents=True, exist_ok=True)
    for modality, column in columns.items():
        if modality not in model.config.modalities:
            raise ValueError(f"unknown modality {modality!r}: this model has {model.config.modalities}")
        if column not in dataset.column_names:
            raise ValueError(f"column {column!r} for {modality} is not in the data set ({dataset.column_names})")
    model.eval()
    device = next(model.parameters()).device
    parts = [dataset.select_columns([c for c in keep_columns if c in dataset.column_names])]
    for modality, column in columns.items():
        key = feature_cache_key(model, processor, modality, dataset, column)

        @torch.no_grad()
        def encode(batch, modality=modality, column=column):
            raw = batch[column]
            kwargs = {PROCESSOR_ARGUMENT[modality]: raw}
            if modality == "audio":
                kwargs = {"audio": [_as_waveform(a) for a in raw], "sampling_rate": SAMPLE_RATE}
            inputs = {k: v.to(device) for k, v in processor(**kwargs).items()}
            feats = model.get_backbone_features(modality, **inputs)
            return {f"{modality}_features": feats.float().cpu().numpy()}

        # datasets writes the Arrow file under a temp name and moves it into place: an interrupted run leaves no
        # half-written cache, and `load_from_cache_file` picks up a finished one.
        part = dataset.map(
            encode,
            batched=True,
            batch_size=batch_size,
            remove_columns=dataset.column_names,
            cache_file_name=str(cache_dir / f"{modality}-{key}.arrow"),
            new_fingerprint=key,
            load_from_cache_file=True,
            desc=f"{modality} features",
        )
        parts.append(part)
    return datasets.concatenate_datasets(parts, axis=1)


def _as_waveform(audio) -> np.ndarray:
    if isinstance(audio, dict) and "array" in audio:
        return np.asarray(audio["array"], dtype=np.float32)
    if isinstance(audio, dict) or isinstance(audio, (bytes, str)):
        return read_wav(audio)
    return np.asarray(audio, dtype=np.float32)


def feature_statistics(dataset: datasets.Dataset, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of a modality's pre-stored features (use the training split only)."""
    x = torch.tensor(np.asarray(dataset.with_format("numpy")[f"{modality}_features"]), dtype=torch.float32)
    return x.mean(0), x.std(0)
