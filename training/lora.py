"""Optional LoRA (peft) on the last layers of Alt-MoE's backbones (the official code: r=4, alpha 16, dropout 0.1 on
q/v of the last three layers). With LoRA on, backbone features change every step, so pre-stored features go stale:
`AltMoETrainer` refuses the feature cache and trains from raw inputs through `RawPairCollator`."""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model

# q/v projections under the names the supported backbones use (Llama/Qwen/DINOv2/Whisper: q_proj; BERT: query).
QV_MODULES = ["q_proj", "v_proj", "query", "value"]


def add_backbone_lora(model, modality: str, *, r: int = 4, alpha: int = 16, dropout: float = 0.1,
                      last_n_layers: int = 3, target_modules=None):
    """Inject LoRA adapters into the last `last_n_layers` transformer layers of one backbone; only they train."""
    if modality not in model.config.modalities:
        raise ValueError(f"unknown modality {modality!r}: this model has {model.config.modalities}")
    config = model.config.backbone_config(modality)
    num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "encoder_layers", None)
    if not num_layers or not 1 <= last_n_layers <= num_layers:
        raise ValueError(f"last_n_layers must be in [1, {num_layers}] for the {modality} backbone, got {last_n_layers}")
    lora = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules or QV_MODULES,
        layers_to_transform=list(range(num_layers - last_n_layers, num_layers)), layers_pattern=["layer", "layers"],
    )
    backbone = model.backbones[modality]
    inject_adapter_in_model(lora, backbone)
    for name, param in backbone.named_parameters():
        param.requires_grad = "lora_" in name
    model.config.freeze_backbones = False  # the backbone now trains: a connector-only save would lose the adapters
    return model


class RawPairCollator:
    """Runs the processor on raw paired rows, for training with trainable backbones (no feature cache)."""

    def __init__(self, processor, columns: dict[str, str], sampling_rate: int = 16_000):
        self.processor, self.columns, self.sampling_rate = processor, columns, sampling_rate

    def __call__(self, rows):
        kwargs = {}
        if "text" in self.columns:
            kwargs["text"] = [r[self.columns["text"]] for r in rows]
        if "vision" in self.columns:
            kwargs["images"] = [r[self.columns["vision"]].convert("RGB") for r in rows]
        if "audio" in self.columns:
            kwargs["audio"] = [r[self.columns["audio"]] for r in rows]
            kwargs["sampling_rate"] = self.sampling_rate
        return dict(self.processor(**kwargs))
