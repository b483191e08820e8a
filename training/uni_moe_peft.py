# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""LoRA / QLoRA for Uni-MoE (peft).

Uni-MoE's stage 3 trains the routers and the connectors fully and the rest of the LLM through LoRA. Here:

- `uni_moe_lora_config`: LoRA on every `nn.Linear` of the decoder (attention q/k/v/o, dense FFN gate/up/down) named
  explicitly, plus `target_parameters` for the 3D expert weights of every MoE layer (`mlp.experts.gate_up_proj`,
  `mlp.experts.down_proj`). peft wraps each such parameter in a `lora.ParamWrapper` that holds one rank-`r` adapter
  *per expert* (lora_A: `(r * E, in)`, lora_B: `(out, r * E)`) and adds the delta through a temporary
  parametrization during the forward, so the experts kernel sees `W + BA` without any change to our code. The routers
  (`mlp.gate`), encoders, connectors, embeddings and `lm_head` never get LoRA.
- `add_uni_moe_lora`: `get_peft_model` with that config; `trainable=("router", "connectors")` trains those modules
  fully through peft's `modules_to_save` (a trainable copy of each module, saved with the adapter and put back in place
  by `merge_lora`).
- `merge_lora`: folds LoRA (incl. the 3D expert deltas) into the weights -> a plain Uni-MoE checkpoint.
- `quantization_config_4bit` / `load_uni_moe_4bit`: QLoRA loading, routers/connectors/encoders/`lm_head` kept in full
  precision.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer, ParamWrapper
from torch import nn
from transformers import BitsAndBytesConfig

from ..modeling import UniMoEConfig, UniMoEForConditionalGeneration


TARGETS = ("all", "ffn")
TRAINABLE = ("router", "connectors")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
DECODER_PREFIX = "model.language_model.layers."


def _check_model(model) -> UniMoEConfig:
    if isinstance(model, PeftModel):
        raise ValueError("the model already carries peft adapters: pass the base Uni-MoE model")
    config = getattr(model, "config", None)
    if not isinstance(config, UniMoEConfig) or not hasattr(getattr(model, "model", None), "language_model"):
        raise ValueError(f"expected a UniMoEForConditionalGeneration, got {type(model).__name__}")
    return config


def _normalize_trainable(trainable: str | Iterable[str] | None) -> tuple[str, ...]:
    if trainable is None:
        return ()
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    unknown = [t for t in trainable if t not in TRAINABLE]
    if unknown:
        raise ValueError(f"trainable must be a subset of {TRAINABLE}, got unknown {unknown}")
    return trainable


def router_names(config: UniMoEConfig) -> list[str]:
    """Module names of the MoE routers (`MoERouter`, a bare weight: not an `nn.Linear`)."""
    return [f"{DECODER_PREFIX}{i}.mlp.gate" for i in config.moe_layer_indices]


def connector_names(model) -> list[str]:
    """Module names of the connectors the model has (a text-only config has none)."""
    names = ("vision_connector", "audio_connector")
    return [f"model.{name}" for name in names if getattr(model.model, name, None) is not None]


def uni_moe_lora_config(
    model,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    targets: str = "all",
    trainable: str | Iterable[str] | None = None,
) -> LoraConfig:
    """The LoRA config for a [`UniMoEForConditionalGeneration`].

    Args:
        targets: "all" (attention + dense FFN linears + expert params) or "ffn" (dense FFN linears + expert params
            only, e.g. for a dense stage-2 model).
        trainable: subset of ("router", "connectors") trained fully through `modules_to_save`.
        lora_dropout: applied to the `nn.Linear` adapters only. peft's `ParamWrapper` rejects any dropout (it cannot
            factor `x` out of `B A dropout(x)` when the delta is added to the weight), so whenever expert parameters
            are targeted the returned config says `lora_dropout=0.0` and [`add_uni_moe_lora`] installs the dropout on
            the linear adapters after wrapping (a reloaded adapter therefore has no dropout: irrelevant at inference).
    """
    config = _check_model(model)
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got {r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    trainable = _normalize_trainable(trainable)

    moe_layers = set(config.moe_layer_indices)
    target_modules = []
    for name, module in model.named_modules():
        # isinstance, not `type is`: a 4-bit `bnb.nn.Linear4bit` is an nn.Linear too.
        if not name.startswith(DECODER_PREFIX) or not isinstance(module, nn.Linear):
            continue
        layer_idx = int(name[len(DECODER_PREFIX):].split(".")[0])
        if layer_idx in moe_layers and ".mlp." in name:
            continue  # never the router, whatever a future MoE block may hold
        if targets == "ffn" and ".mlp." not in name:
            continue
        target_modules.append(name)
    target_parameters = [f"{DECODER_PREFIX}{i}.mlp.experts.{p}" for i in sorted(moe_layers) for p in EXPERT_PARAMS]

    modules_to_save = []
    if "router" in trainable:
        if not moe_layers:
            raise ValueError("trainable='router' but the model has no MoE layer")
        modules_to_save += router_names(config)
    if "connectors" in trainable:
        modules_to_save += connector_names(model)

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0 if target_parameters else lora_dropout,
        # Explicit full names: nothing outside the decoder can match by suffix (peft matches `key.endswith(name)`).
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        modules_to_save=modules_to_save or None,
        bias="none",
    )


def set_lora_dropout(peft_model: PeftModel, p: float, adapter_name: str = "default") -> None:
    """Installs `nn.Dropout(p)` on the `nn.Linear` LoRA adapters (the expert `ParamWrapper`s cannot take dropout)."""
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper) and adapter_name in module.lora_A:
            module.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()


def add_uni_moe_lora(
    model,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    targets: str = "all",
    trainable: str | Iterable[str] | None = ("router", "connectors"),
) -> PeftModel:
    """`get_peft_model(model, uni_moe_lora_config(model, ...))`: LoRA on the decoder, routers/connectors fully trained
    (Uni-MoE stage 3) unless `trainable=()`.

    The trainable routers/connectors are peft `modules_to_save`: `peft_model.save_pretrained` stores them next to the
    LoRA weights, and [`merge_lora`] writes the trained copies back into the base model.
    """
    config = uni_moe_lora_config(
        model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, targets=targets, trainable=trainable
    )
    peft_model = get_peft_model(model, config)
    if config.lora_dropout != lora_dropout:
        set_lora_dropout(peft_model, lora_dropout)
    return peft_model


def lora_target_names(peft_model: PeftModel) -> list[str]:
    """Sorted names (relative to the base model) of the LoRA-wrapped modules and, for expert weights, parameters
    (`model.language_model.layers.1.mlp.experts.gate_up_proj`)."""
    names = []
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            # nested wrappers (one per parameter of the same module) sit at `experts`, `experts.base_layer`, ...
            owner = name.replace(".base_layer", "")
            names.append(f"{owner}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            names.append(name)
    return sorted(names)


def merge_lora(peft_model: PeftModel, safe_merge: bool = True) -> UniMoEForConditionalGeneration:
    """Folds LoRA into the weights (the 3D expert params included) and returns the plain base model, with the trained
    `modules_to_save` copies (routers/connectors) in place: it saves as a regular Uni-MoE checkpoint.

    On a 4-bit model peft dequantizes, adds and requantizes (lossy): for QLoRA, rather reload the base model in full
    precision, `PeftModel.from_pretrained` the adapter on it and merge there.
    """
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"expected a PeftModel, got {type(peft_model).__name__}")
    model = peft_model.merge_and_unload(safe_merge=safe_merge)
    model.requires_grad_(False)  # a merged model is for saving / inference; re-enable what a next stage trains
    return model


# ---------------------------------------------------------------------------------------------------------------------
# QLoRA
# ---------------------------------------------------------------------------------------------------------------------
def quantization_config_4bit(config: UniMoEConfig, compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    """NF4 config that quantizes the decoder's `nn.Linear`s only.

    Kept in full precision (`llm_int8_skip_modules`, matched by transformers from the start of the module name up to a
    module boundary): every router, both connectors, both encoders and `lm_head`. The 3D expert weights are
    `nn.Parameter`s, not `nn.Linear`s, so bitsandbytes leaves them unquantized whatever this list says: in an MoE they
    are most of the parameters, so QLoRA here saves far less memory than on a dense model.
    """
    if not isinstance(config, UniMoEConfig):
        raise ValueError(f"expected a UniMoEConfig, got {type(config).__name__}")
    skip = router_names(config) + [
        "model.vision_connector", "model.audio_connector", "model.vision_tower", "model.audio_tower", "lm_head"
    ]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def load_uni_moe_4bit(
    path, compute_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False, **kwargs
) -> UniMoEForConditionalGeneration:
    """Loads a Uni-MoE checkpoint with its decoder linears in 4-bit NF4, ready for [`add_uni_moe_lora`].

    `prepare_model_for_kbit_training` freezes everything and upcasts every non-4-bit fp16/bf16 parameter to fp32; the
    3D expert weights (unquantizable, see [`quantization_config_4bit`]) are cast back to `compute_dtype` afterwards:
    they are frozen and the bulk of the model, fp32 copies would double their memory for nothing.
    """
    config = UniMoEConfig.from_pretrained(path)
    model = UniMoEForConditionalGeneration.from_pretrained(
        path, quantization_config=quantization_config_4bit(config, compute_dtype), dtype=compute_dtype, **kwargs
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if compute_dtype in (torch.float16, torch.bfloat16):
        for block in model.model.moe_blocks:
            block.experts.to(compute_dtype)
    return model


__all__ = [
    "add_uni_moe_lora",
    "connector_names",
    "load_uni_moe_4bit",
    "lora_target_names",
    "merge_lora",
    "quantization_config_4bit",
    "router_names",
    "set_lora_dropout",
    "uni_moe_lora_config",
]
