# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Helpers shared by the configuration files (Hub-safe: copied with any config that imports them)."""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


def check_modality(modality: str, known) -> None:
    if modality not in known:
        raise ValueError(f"unknown modality {modality!r}: this model has {list(known)}")


def as_sub_config(name: str, value) -> PreTrainedConfig | None:
    """A sub-config from a config object, a dict carrying `model_type`, or None."""
    if value is None or isinstance(value, PreTrainedConfig):
        return value
    if not isinstance(value, dict) or "model_type" not in value:
        raise ValueError(f"{name} must be a PreTrainedConfig or a dict with a 'model_type', got {type(value).__name__}")
    value = dict(value)
    return CONFIG_MAPPING[value.pop("model_type")](**value)
