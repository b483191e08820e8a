"""Omni-SMoLA: the soft mixture of low-rank experts against a Python-loop reference, causal safety, the peft method
and the Hub-loadable model."""

import json

import pytest
import torch
from peft import PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from torch import nn

import multimodal_moe.modeling  # noqa: F401  (registers the Auto classes)
from hub_utils import run_without_package
from multimodal_moe.modeling import OmniSMoLAConfig, OmniSMoLAForConditionalGeneration
from multimodal_moe.modeling.smola_layers import SMoLALinear, SoftMoESlots, modality_group_table
from multimodal_moe.training.smola_peft import SMoLAConfig, SMoLAPeftLinear, smola_modality_ids

V = 48


def tiny_llama(tie=False, seed=0, init_range=0.02):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=64, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, initializer_range=init_range,
    )
    return LlamaForCausalLM(cfg).eval()


def randomise_B(model, std=0.3, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "smola_B" in name:
                p.normal_(0.0, std)


def reference_smola(layer: SMoLALinear, x, modality_ids=None):
    """The definition, one expert at a time: y = W x + b + scaling * sum_g sum_i w_{g,i}(x) B_{g,i} A_{g,i} x."""
    y = layer.base_layer(x)
    groups, n, r = layer.num_groups, layer.num_experts, layer.r
    table = modality_group_table(layer.expert_groups, layer.shared_groups)
    logits = x @ layer.router.T
    for g in range(groups):
        probs = logits[..., g * n:(g + 1) * n].softmax(-1)
        active = torch.ones(x.shape[:-1]) if modality_ids is None else table[modality_ids][..., g].float()
        for i in range(n):
            e = g * n + i
            a, b = layer.lora_A[e * r:(e + 1) * r], layer.lora_B[:, e * r:(e + 1) * r]
            y = y + layer.scaling * (probs[..., i] * active)[..., None] * ((x @ a.T) @ b.T)
    return y


CASES = [  # groups, shared groups, experts per group, rank, with modality ids
    (("text", "vision", "multimodal"), ("multimodal",), 4, 2, True),
    (("text", "vision", "multimodal"), ("multimodal",), 4, 2, False),
    (("text", "vision", "audio", "multimodal"), ("multimodal",), 3, 4, True),
    (("text", "vision"), (), 2, 3, True),
    (("shared",), ("shared",), 8, 1, False),
]


@pytest.mark.parametrize("groups,shared,experts,rank,with_ids", CASES)
def test_smola_linear_matches_the_loop_reference(groups, shared, experts, rank, with_ids):
    torch.manual_seed(0)
    layer = SMoLALinear(nn.Linear(12, 10), groups, shared, num_experts=experts, r=rank, alpha=2.0 * rank)
    randomise_B(layer)
    num_modalities = modality_group_table(groups, shared).shape[0]
    ids = torch.randint(0, num_modalities, (3, 5)) if with_ids else None
    x1 = torch.randn(3, 5, 12, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    got, want = layer(x1, ids), reference_smola(layer, x2, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    params = [layer.router, layer.lora_A, layer.lora_B]
    g_got = torch.autograd.grad(got.square().sum(), [x1, *params])
    g_want = torch.autograd.grad(want.square().sum(), [x2, *params])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    if with_ids and len(shared) < len(groups):  # the modality changes which groups a token uses
        assert not torch.allclose(layer(x1, ids), layer(x1, torch.zeros_like(ids)))


def test_zero_initialised_B_is_exactly_the_base():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = SMoLALinear(base, num_experts=4, r=4)
    x = torch.randn(2, 6, 16)
    assert torch.equal(layer(x), base(x)) and torch.equal(layer(x, torch.randint(0, 2, (2, 6))), base(x))
    llama = tiny_llama()
    ids = torch.randint(3, V, (2, 9))
    model = OmniSMoLAForConditionalGeneration.from_base(llama, num_experts=2, smola_r=2)
    assert torch.equal(model(ids).logits, llama(ids).logits)
    peft_model = get_peft_model(tiny_llama(), SMoLAConfig(num_experts=2, r=2, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(peft_model(input_ids=ids).logits, llama(ids).logits)


def test_smola_is_causal_safe_and_the_slot_variant_is_not():
    torch.manual_seed(0)
    layer = SMoLALinear(nn.Linear(16, 16), num_experts=4, r=4)
    randomise_B(layer)
    x, ids = torch.randn(2, 10, 16), torch.randint(0, 2, (2, 10))
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 16)  # future tokens 6..9 differ
    assert torch.equal(layer(x, ids)[:, :6], layer(changed, ids)[:, :6])  # per token: positions 0..5 unaffected
    # the whole model: earlier logits don't see later tokens
    model = OmniSMoLAForConditionalGeneration.from_base(tiny_llama(), num_experts=2, smola_r=2)
    randomise_B(model)
    tokens = torch.randint(3, V, (1, 10))
    other = tokens.clone()
    other[:, 6:] = (other[:, 6:] + 5) % (V - 3) + 3
    torch.testing.assert_close(model(tokens).logits[:, :6], model(other).logits[:, :6])

    slots = SoftMoESlots(16, 16, num_experts=4, slots_per_expert=2, r=4)
    randomise_B(slots)
    y, y_changed = slots(x), slots(changed)
    assert not torch.allclose(y[:, :6], y_changed[:, :6])  # future tokens leak into every position
    with pytest.raises(ValueError, match="causal"):
        slots(x, causal=True)
    # padding is excluded from the slots and gets no output
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[:, 8:] = 0
    padded = x.clone()
    padded[:, 8:] = 100.0
    torch.testing.assert_close(slots(x, mask)[:, :8], slots(padded, mask)[:, :8])
    assert torch.equal(slots(x, mask)[:, 8:], torch.zeros(2, 2, 16))


def test_peft_method_trains_only_smola_saves_loads_and_refuses_to_merge(tmp_path):
    config = SMoLAConfig(num_experts=2, r=2, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(tiny_llama(), config)
    layers = [m for m in model.modules() if isinstance(m, SMoLAPeftLinear)]
    assert len(layers) == 4
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".smola_" in n for n in trainable)
    # per layer: router 6x32 + A 12x32 + B 32x12 (3 groups x 2 experts, rank 2, 32 -> 32 for q; 32 -> 16 for v)
    assert sum(trainable.values()) == 2 * ((6 * 32 + 12 * 32 + 32 * 12) + (6 * 32 + 12 * 32 + 16 * 12))
    randomise_B(model)
    ids, modality = torch.randint(3, V, (2, 8)), torch.randint(0, 2, (2, 8))
    with torch.no_grad():
        want = model(input_ids=ids, modality_ids=modality).logits
        with smola_modality_ids(model, modality):
            assert torch.equal(model(input_ids=ids).logits, want)
        assert not torch.allclose(model(input_ids=ids).logits, want)  # all groups vs. the tokens' own
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SMOLA" and saved["num_experts"] == 2
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, modality_ids=modality).logits, want)
        with smola_modality_ids(reloaded, modality):
            out = reloaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 11)
    for merge in (reloaded.merge_and_unload, reloaded.merge_adapter):
        with pytest.raises(NotImplementedError, match="can't be merged"):
            merge()
    assert type(reloaded.unload()) is LlamaForCausalLM


def test_omni_smola_reloads_without_the_package(tmp_path):
    model = OmniSMoLAForConditionalGeneration.from_base(tiny_llama(tie=True), num_experts=2, smola_r=2)
    randomise_B(model)
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    ids, modality = torch.randint(3, V, (2, 7)), torch.randint(0, 2, (2, 7))
    with torch.no_grad():
        want = model(ids, modality_ids=modality).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), modality_ids=modality, max_new_tokens=4,
                             do_sample=False)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "smola_layers.py").exists()
    code = f"""
    import json, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
    ids, modality = torch.tensor({ids.tolist()}), torch.tensor({modality.tolist()})
    with torch.no_grad():
        logits = model(ids, modality_ids=modality).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), modality_ids=modality, max_new_tokens=4,
                             do_sample=False)
    print(json.dumps({{"module": type(model).__module__, "logits": logits.tolist(), "gen": gen.tolist()}}))
    """
    result = run_without_package(code, cwd=tmp_path)
    assert "multimodal_moe" not in result["module"]
    torch.testing.assert_close(torch.tensor(result["logits"]), want, atol=1e-5, rtol=1e-5)
    assert result["gen"] == gen.tolist()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()  # in-process: the registered class
    assert type(again) is OmniSMoLAForConditionalGeneration and isinstance(again.config, OmniSMoLAConfig)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, modality_ids=modality).logits, want)


def test_a_few_steps_reduce_the_loss_and_leave_the_base_alone():
    llama = tiny_llama(init_range=0.3)  # with std 0.02 the frozen head can't make logits larger than ~0.6
    frozen = {k: v.clone() for k, v in llama.state_dict().items()}
    model = OmniSMoLAForConditionalGeneration.from_base(
        llama, num_experts=2, smola_r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]
    ).train()
    torch.manual_seed(0)
    ids = torch.randint(3, V, (1, 12)).expand(4, 12)  # toy task: memorise one sequence
    modality = (torch.arange(12) < 4).long().expand(4, 12)  # 4 "vision" tokens, then text
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(ids, modality_ids=modality, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    for key, value in model.language_model.state_dict().items():
        base_key = key.replace(".base_layer.", ".")
        if base_key in frozen:
            assert torch.equal(value, frozen[base_key]), key


def test_configs_validate():
    with pytest.raises(ValueError, match="shared_groups"):
        OmniSMoLAConfig(base_config=tiny_llama().config, shared_groups=["audio"])
    with pytest.raises(ValueError):
        SMoLAConfig(num_experts=0)
    cfg = OmniSMoLAConfig(base_config=tiny_llama().config.to_dict())
    assert cfg.get_text_config().num_hidden_layers == 2


def test_from_base_path_and_modality_ids_resolution(tmp_path):
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "base")
    model = OmniSMoLAForConditionalGeneration.from_base(tmp_path / "base", num_experts=2, smola_r=2)
    assert model.config.base_name_or_path == str(tmp_path / "base")
    assert len(model.smola_layer_names) == 8  # q, k, v, o in two layers
    ids = torch.randint(3, V, (2, 6))
    assert torch.equal(model(ids).logits, llama(ids).logits)
    layer = SMoLALinear(nn.Linear(8, 8), num_experts=2, r=2)
    randomise_B(layer)
    x = torch.randn(2, 1, 8)
    # cached decoding: prompt-length ids with a one-token input -> the new token is text (modality 0)
    assert torch.equal(layer(x, torch.ones(2, 5, dtype=torch.long)), layer(x, torch.zeros(2, 1, dtype=torch.long)))
    with pytest.raises(ValueError, match="modality_ids"):
        layer(torch.randn(2, 5, 8), torch.zeros(3, 5, dtype=torch.long))


@pytest.mark.parametrize("kind", ["omni", "peft"])
def test_activation_checkpointing_recomputes_with_the_same_modality_ids(kind):
    if kind == "omni":
        model = OmniSMoLAForConditionalGeneration.from_base(tiny_llama(), num_experts=2, smola_r=2)
    else:
        config = SMoLAConfig(num_experts=2, r=2, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM)
        model = get_peft_model(tiny_llama(), config)
    randomise_B(model)
    model.train()
    ids, modality = torch.randint(3, V, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        model(input_ids=ids, modality_ids=modality, labels=ids).loss.backward()  # backward after forward returned
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_peft_smola_trains_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(  # bitsandbytes' CPU kernels want in_features >= its 64 block size
        hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=64, initializer_range=0.3,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
    config = SMoLAConfig(num_experts=2, r=4, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(base, config)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(3, V, (1, 12)).expand(4, 12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, modality_ids=torch.zeros(4, 12, dtype=torch.long), labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_smola_on_uni_moe_keeps_its_modality_ids_method():
    """Regression: passing `modality_ids=` to a peft-SMoLA Uni-MoE once overwrote `UniMoEModel.modality_ids` (a
    method the loss path calls) with the tensor; only SMoLA layers may receive ids."""
    from test_uni_moe import make_model, make_processor, mixed_inputs

    model = make_model()
    peft_model = get_peft_model(model, SMoLAConfig(num_experts=2, r=2, target_modules=r".*language_model.*\.q_proj",
                                                   expert_groups=["text", "vision", "audio", "multimodal"]))
    inputs = mixed_inputs(make_processor())
    ids = torch.zeros_like(inputs["input_ids"])
    out = peft_model(**inputs, modality_ids=ids, labels=inputs["input_ids"])
    out.loss.backward()
    assert callable(peft_model.get_base_model().model.modality_ids)
    with smola_modality_ids(peft_model, ids):
        assert callable(peft_model.get_base_model().model.modality_ids)
    assert callable(peft_model.get_base_model().model.modality_ids)
