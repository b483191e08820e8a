"""LoRA / QLoRA on Uni-MoE (training/uni_moe_peft.py): targets, zero-init equality, merge, 4-bit on CPU."""

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import ParamWrapper
from safetensors import safe_open
from torch import nn

from multimodal_moe.modeling import UniMoEForConditionalGeneration
from multimodal_moe.modeling.moe_layers import MoERouter
from multimodal_moe.training.uni_moe_peft import (
    add_uni_moe_lora,
    load_uni_moe_4bit,
    lora_target_names,
    merge_lora,
    quantization_config_4bit,
    uni_moe_lora_config,
)

from test_uni_moe import V, make_config, make_model, make_processor, mixed_inputs


R, E, H, I = 4, 4, 32, 64  # LoRA rank; the tiny config's experts, hidden size and expert intermediate size
ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
DENSE_FFN = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER = "model.language_model.layers.1.mlp.gate"
CONNECTORS = ["model.vision_connector", "model.audio_connector"]


def layer(i, names):
    return [f"model.language_model.layers.{i}.{n}" for n in names]


# moe_layers=[1]: layer 0 keeps its dense SwiGLU mlp, layer 1 is sparse.
EXPECTED = {
    "all": sorted(layer(0, ATTN + DENSE_FFN) + layer(1, ATTN + EXPERTS)),
    "ffn": sorted(layer(0, DENSE_FFN) + layer(1, EXPERTS)),
}


@pytest.fixture(scope="module")
def inputs():
    return mixed_inputs(make_processor())


def lora_numel(names):
    """Expected LoRA parameter count: r * (in + out) per linear, r * E * (in + out) per 3D expert weight."""
    shapes = {"q_proj": (H, H), "k_proj": (H, 16), "v_proj": (H, 16), "o_proj": (H, H), "gate_proj": (H, 64),
              "up_proj": (H, 64), "down_proj": (64, H)}
    total = 0
    for name in names:
        if ".experts." in name:
            fan_in, fan_out = (H, 2 * I) if name.endswith("gate_up_proj") else (I, H)
            total += R * E * (fan_in + fan_out)
        else:
            total += R * sum(shapes[name.rsplit(".", 1)[-1]])
    return total


def trainable(peft_model):
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("targets", ["all", "ffn"])
@pytest.mark.parametrize("train_modules", [(), ("router", "connectors")])
def test_lora_targets(targets, train_modules):
    model = make_model(moe_layers=[1])
    full_modules = {name: sum(p.numel() for p in model.get_submodule(name).parameters())
                    for name in [ROUTER] + CONNECTORS}
    peft_model = add_uni_moe_lora(model, r=R, targets=targets, trainable=train_modules)
    assert lora_target_names(peft_model) == EXPECTED[targets]

    params = trainable(peft_model)
    lora = {n: p for n, p in params.items() if ".lora_A.default." in n or ".lora_B.default." in n}
    saved = {n: p for n, p in params.items() if ".modules_to_save.default." in n}
    # Parameter by parameter: nothing trains but LoRA A/B and, when asked, the router/connector copies.
    assert set(params) == set(lora) | set(saved)
    assert all(n.startswith("base_model.model.model.language_model.layers.") for n in lora)
    assert not any(".mlp.gate." in n for n in lora)  # never LoRA on a router
    assert sum(p.numel() for p in lora.values()) == lora_numel(EXPECTED[targets])
    expected_saved = list(full_modules) if train_modules else []
    assert sorted({n.removeprefix("base_model.model.").split(".modules_to_save")[0] for n in saved}) == sorted(
        expected_saved)
    assert sum(p.numel() for p in saved.values()) == sum(full_modules[m] for m in expected_saved)
    # Encoders, embeddings and lm_head are never touched.
    assert not any("_tower." in n or "embed_tokens" in n or "lm_head" in n for n in params)

    # One adapter per expert: (r * E, in) and (out, r * E), with (experts, out, in) weights.
    experts = peft_model.base_model.model.model.language_model.layers[1].mlp.experts
    wrappers = {m.parameter_name: m for m in [experts, experts.base_layer] if isinstance(m, ParamWrapper)}
    assert wrappers["gate_up_proj"].lora_A["default"].weight.shape == (R * E, H)
    assert wrappers["gate_up_proj"].lora_B["default"].weight.shape == (2 * I, R * E)
    assert wrappers["down_proj"].lora_A["default"].weight.shape == (R * E, I)
    assert wrappers["down_proj"].lora_B["default"].weight.shape == (H, R * E)


def test_lora_config_values_and_errors():
    model = make_model(moe_layers=[1])
    config = uni_moe_lora_config(model, r=R, lora_alpha=8, lora_dropout=0.1, trainable="router")
    assert sorted(config.target_modules) == sorted(n for n in EXPECTED["all"] if ".experts." not in n)
    assert sorted(config.target_parameters) == sorted(n for n in EXPECTED["all"] if ".experts." in n)
    assert config.modules_to_save == [ROUTER]
    # peft's ParamWrapper refuses dropout: the config has none, add_uni_moe_lora puts it on the linear adapters only.
    assert config.lora_dropout == 0.0
    peft_model = add_uni_moe_lora(model, r=R, lora_dropout=0.1)
    dropouts = {type(m).__name__: m for m in peft_model.modules() if hasattr(m, "lora_dropout")}
    assert set(dropouts) == {"Linear", "ParamWrapper"}
    assert isinstance(dropouts["Linear"].lora_dropout["default"], nn.Dropout)
    assert dropouts["Linear"].lora_dropout["default"].p == 0.1
    assert isinstance(dropouts["ParamWrapper"].lora_dropout["default"], nn.Identity)
    # Without MoE layers the config keeps the requested dropout.
    dense = make_model(moe_layers=[])
    assert uni_moe_lora_config(dense, lora_dropout=0.1).lora_dropout == 0.1
    assert uni_moe_lora_config(dense).target_parameters is None

    with pytest.raises(ValueError, match="targets must be one of"):
        uni_moe_lora_config(model, targets="attn")
    with pytest.raises(ValueError, match="trainable must be a subset"):
        uni_moe_lora_config(model, trainable=("router", "lm_head"))
    with pytest.raises(ValueError, match="no MoE layer"):
        uni_moe_lora_config(dense, trainable="router")
    with pytest.raises(ValueError, match="already carries peft adapters"):
        uni_moe_lora_config(peft_model)
    with pytest.raises(ValueError, match="expected a PeftModel"):
        merge_lora(model)


def test_zero_init_lora_keeps_logits(inputs):
    model = make_model(moe_layers=[1])
    base = logits(model, inputs)
    peft_model = add_uni_moe_lora(model, r=R).eval()
    assert torch.equal(logits(peft_model, inputs), base)  # B = 0: W + BA == W exactly


def test_merge_lora(tmp_path, inputs):
    model = make_model(moe_layers=[1])
    base = logits(model, inputs)
    orig_experts = model.model.language_model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    peft_model = add_uni_moe_lora(model, r=R).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            # random B (peft inits it to 0) and perturbed router/connector copies
            if ".lora_B." in name or ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.2)
    unmerged = logits(peft_model, inputs)
    assert (unmerged - base).abs().max() > 1e-2  # the perturbation is visible

    merged = merge_lora(peft_model)
    assert type(merged) is UniMoEForConditionalGeneration
    assert not any("lora" in n or "base_layer" in n or "modules_to_save" in n for n in merged.state_dict())
    torch.testing.assert_close(logits(merged, inputs), unmerged, atol=1e-5, rtol=1e-5)
    # each expert's merged delta is a nonzero rank-r update of its own weight
    delta = merged.model.language_model.layers[1].mlp.experts.gate_up_proj.detach() - orig_experts
    assert all(0 < torch.linalg.matrix_rank(delta[e]).item() <= R for e in range(E))
    assert isinstance(merged.model.language_model.layers[1].mlp.gate, MoERouter)

    merged.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in keys)
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in keys and f"{ROUTER}.weight" in keys
    reloaded = UniMoEForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_adapter_roundtrip(tmp_path, inputs):
    # The adapter checkpoint holds the LoRA weights *and* the fully trained router/connectors (modules_to_save).
    peft_model = add_uni_moe_lora(make_model(moe_layers=[1]), r=R).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.2)
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model(moe_layers=[1]), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=1e-6, rtol=1e-6)


def test_quantization_config_skips():
    config = quantization_config_4bit(make_config(moe_layers=[0, 1]), compute_dtype=torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert sorted(config.llm_int8_skip_modules) == sorted([
        "model.language_model.layers.0.mlp.gate", ROUTER, "model.vision_tower", "model.audio_tower", "lm_head",
        *CONNECTORS])
    with pytest.raises(ValueError, match="expected a UniMoEConfig"):
        quantization_config_4bit(make_config().text_config)


@pytest.mark.parametrize("train_modules", [(), ("router", "connectors")])
def test_qlora_cpu(tmp_path, inputs, train_modules):
    make_model(moe_layers=[1]).save_pretrained(tmp_path)
    model = load_uni_moe_4bit(tmp_path)
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    assert quantized == sorted(n for n in EXPECTED["all"] if ".experts." not in n)  # every decoder linear, only them
    assert isinstance(model.model.language_model.layers[1].mlp.gate, MoERouter)
    assert model.model.language_model.layers[1].mlp.gate.weight.dtype == torch.float32
    for name in CONNECTORS + ["model.vision_tower", "model.audio_tower", "lm_head"]:
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.get_submodule(name).modules()), name
    # 3D expert weights are plain parameters: bitsandbytes cannot quantize them.
    experts = model.model.language_model.layers[1].mlp.experts
    assert type(experts.gate_up_proj) is nn.Parameter and experts.gate_up_proj.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())  # prepare_model_for_kbit_training froze everything

    peft_model = add_uni_moe_lora(model, r=R, trainable=train_modules).train()
    assert lora_target_names(peft_model) == EXPECTED["all"]
    ids = inputs["input_ids"]
    out = peft_model(**inputs, labels=ids.masked_fill(ids >= V, -100))
    assert torch.isfinite(out.loss)
    out.loss.backward()

    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable(peft_model))
    assert all(".lora_" in n or (train_modules and ".modules_to_save." in n) for n in with_grad)
    assert any(".modules_to_save." in n for n in with_grad) == bool(train_modules)
    assert any("experts" in n and ".lora_B." in n and peft_model.get_parameter(n).grad.abs().sum() > 0
               for n in with_grad)
    for module in peft_model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert module.weight.grad is None and not module.weight.requires_grad
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
