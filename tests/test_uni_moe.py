"""Uni-MoE: tiny random configs (hidden 32, 2 layers, tiny CLIP-vision and Whisper), plus a slow zoo test."""

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

import multimodal_moe.modeling  # noqa: F401  (registers the Auto classes: needed for auto_map on save)
from multimodal_moe.modeling import UniMoEConfig, UniMoEForConditionalGeneration, UniMoEProcessor
from multimodal_moe.modeling.moe_layers import modality_expert_loss, modality_kl_loss

from hub_utils import run_without_package


WORDS = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]
V = len(WORDS)  # the dense vocabulary; <image>, <video>, <audio> are V, V + 1, V + 2
IMG, VID, AUD = V, V + 1, V + 2


def text_config(**kw):
    base = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=1,
    )
    return LlamaConfig(**(base | kw))


def vision_config():
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )


def audio_config():
    # max_source_positions=50 -> 100 mel frames = 1 s windows (Whisper's real value is 1500 = 30 s).
    return WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=50,
        max_target_positions=32, vocab_size=V, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        decoder_start_token_id=2,
    )


def make_config(**kw):
    base = dict(
        text_config=text_config(vocab_size=V + 3),
        vision_config=vision_config(),
        audio_config=audio_config(),
        num_experts=4,
        num_experts_per_tok=2,
        qformer_num_heads=4,
        audio_num_query_tokens=6,
        image_token_id=IMG,
        video_token_id=VID,
        audio_token_id=AUD,
    )
    return UniMoEConfig(**(base | kw))


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return UniMoEForConditionalGeneration(make_config(**kw)).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def make_processor():
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(["<image>", "<video>", "<audio>"], special_tokens=True)
    assert tok.convert_tokens_to_ids(["<image>", "<video>", "<audio>"]) == [IMG, VID, AUD]
    cfg = make_config()
    return UniMoEProcessor(
        tok,
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        WhisperFeatureExtractor(chunk_length=1),  # 1 s windows, matching audio_config()
        image_seq_length=cfg.image_seq_length,
        audio_seq_length=cfg.audio_seq_length,
    )


def media(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    video = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    clip = rng.standard_normal(12000).astype(np.float32) * 0.1  # 0.75 s at 16 kHz
    return image, video, clip


def mixed_inputs(processor):
    image, video, clip = media()
    return processor(
        text=["w1 <image> w2 w3 <audio> w4", "w5 <video> w6 w7 w8 w9 w10 w11"],
        images=[image], videos=[video], audio=[clip],
    )


# ---------------------------------------------------------------------------------------------------------------------
def test_config_token_counts_and_validation():
    cfg = make_config()
    assert cfg.image_seq_length == 16  # (32 / 8)^2 patches, CLS dropped
    assert cfg.video_seq_length == 16 and cfg.audio_seq_length == 6
    assert make_config(audio_connector_type="mlp").audio_seq_length == 50
    assert make_config(vision_connector_type="qformer", vision_num_query_tokens=5).image_seq_length == 5
    assert make_config(moe_layers="interval", moe_layer_interval=2).moe_layer_indices == [0]
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        make_config(modality_expert_map={"smell": [0]})
    with pytest.raises(ValueError, match="text_config must be one of"):
        make_config(text_config={"model_type": "gpt2"})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        make_config(num_experts_per_tok=5)



def test_merge_connectors_concatenate_neighbours_like_a_reference_loop():
    # vision grid 4x4 (32 px / 8), merge 2 -> 4 tokens; audio 50 frames, merge 5 -> 10 tokens
    cfg = make_config(vision_merge_size=2, audio_connector_type="mlp", audio_merge_size=5)
    assert (cfg.image_seq_length, cfg.video_seq_length, cfg.audio_seq_length) == (4, 4, 10)
    model = make_model(vision_merge_size=2, audio_connector_type="mlp", audio_merge_size=5)
    vision, audio = model.model.vision_connector, model.model.audio_connector
    states = torch.randn(3, 16, 32)  # (images, 4x4 patches in row-major order, d)
    merged = vision.merge(states)
    assert merged.shape == (3, 4, 4 * 32)
    for block_row in range(2):
        for block_col in range(2):
            patches = [states[:, (2 * block_row + r) * 4 + 2 * block_col + c] for r in range(2) for c in range(2)]
            torch.testing.assert_close(merged[:, 2 * block_row + block_col], torch.cat(patches, dim=-1))
    frames = torch.randn(2, 50, 32)
    torch.testing.assert_close(audio.merge(frames)[:, 3], frames[:, 15:20].flatten(1))
    # whole model: the processor expands placeholders to the merged counts, forward + backward run
    processor = make_processor()
    processor.image_seq_length, processor.video_seq_length, processor.audio_seq_length = 4, 4, 10
    inputs = mixed_inputs(processor)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert out.image_hidden_states.shape == (1, 4, 32) and out.audio_hidden_states.shape == (1, 10, 32)
    assert vision.linear_1.weight.grad is not None and audio.norm.weight.grad is not None
    with pytest.raises(ValueError, match="must divide the 4x4 patch grid"):
        make_config(vision_merge_size=3)
    with pytest.raises(ValueError, match="must divide the 50 encoder frames"):
        make_config(audio_connector_type="mlp", audio_merge_size=7)
    with pytest.raises(ValueError, match="needs audio_connector_type='mlp'"):
        make_config(audio_merge_size=5)
    with pytest.raises(ValueError, match="can't keep the CLS token"):
        make_config(vision_merge_size=2, vision_feature_select_strategy="full")

def test_forward_backward_all_modalities(processor):
    model = make_model(modality_expert_map={"image": [1], "audio": [2, 3]}, modality_expert_loss_coef=0.1,
                       modality_kl_loss_coef=0.01, router_z_loss_coef=0.001).train()
    inputs = mixed_inputs(processor)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= V, -100)
    out = model(**inputs, labels=labels, output_router_logits=True)
    assert out.logits.shape == (*inputs["input_ids"].shape, V + 3)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (inputs["input_ids"].numel(), 4)
    assert out.router_logits[0].dtype == torch.float32
    expected = (0.01 * out.balance_loss + 0.001 * out.z_loss + 0.1 * out.modality_expert_loss
                + 0.01 * out.modality_kl_loss)
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert out.image_hidden_states.shape == (1, 16, 32) and out.audio_hidden_states.shape == (1, 6, 32)
    assert out.video_hidden_states.shape == (1, 16, 32)
    out.loss.backward()
    named = dict(model.named_parameters())
    for name in ("model.language_model.layers.0.mlp.experts.gate_up_proj",
                 "model.language_model.layers.1.mlp.gate.weight", "model.vision_connector.linear_1.weight",
                 "model.audio_connector.query_tokens", "lm_head.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    # Encoders are frozen by default: no grads, not even computed.
    assert all(p.grad is None and not p.requires_grad for n, p in named.items() if "_tower." in n)
    assert make_model(freeze_encoders=False).model.vision_tower.embeddings.patch_embedding.weight.requires_grad


@pytest.mark.parametrize("case", ["text", "image", "video", "audio", "mixed"])
def test_generate(model, processor, case):
    image, video, clip = media()
    prompts = {
        "text": dict(text="w1 w2 w3"),
        "image": dict(text="w1 <image> w2", images=[image]),
        "video": dict(text="<video> w2", videos=[video]),
        "audio": dict(text="w3 <audio>", audio=[clip]),
        "mixed": dict(text=["w1 <image> w2 <audio>", "<video> w3 w4 w5 w6 w7 w8 w9"], images=[image], videos=[video],
                      audio=[clip]),
    }
    processor.tokenizer.padding_side = "left"
    inputs = processor(**prompts[case])
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 6)
    # The KV cache path (media injected at prefill only) gives the same greedy tokens as recomputing everything.
    assert torch.equal(cached, uncached)
    # Placeholders are never generated.
    assert not (cached[:, inputs["input_ids"].shape[1]:] >= V).any()


@pytest.mark.parametrize("family", ["llama", "qwen2-tied"])
def test_upcycled_text_logits_equal_dense(tmp_path, family):
    torch.manual_seed(1)
    if family == "llama":
        dense = LlamaForCausalLM(text_config(num_hidden_layers=3))
    else:
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=V, tie_word_embeddings=True, bos_token_id=2,
                          eos_token_id=3)
        dense = Qwen2ForCausalLM(cfg)
    dense.save_pretrained(tmp_path / "llm")
    CLIPVisionModel(vision_config()).save_pretrained(tmp_path / "vision")
    WhisperModel(audio_config()).save_pretrained(tmp_path / "audio")
    model = UniMoEForConditionalGeneration.from_pretrained_parts(
        tmp_path / "llm", tmp_path / "vision", tmp_path / "audio", num_experts=4, num_experts_per_tok=2,
        qformer_num_heads=4, moe_layers="interval", moe_layer_interval=2 if family == "llama" else 1,
    ).eval()
    assert model.config.image_token_id == V and model.config.audio_token_id == V + 2
    assert model.config.text_config.vocab_size == V + 3
    assert model.config.tie_word_embeddings == (family != "llama")
    ids = torch.randint(4, V, (2, 12))
    with torch.no_grad():
        ref = dense(ids).logits
        for impl in ("eager", "batched_mm", "grouped_mm"):
            model.set_experts_implementation(impl)
            got = model(ids).logits
            torch.testing.assert_close(got[..., :V], ref, atol=1e-5, rtol=0)
    # The pretrained encoders were copied in.
    src = CLIPVisionModel.from_pretrained(tmp_path / "vision")
    for key, value in src.state_dict().items():
        torch.testing.assert_close(model.model.vision_tower.state_dict()[key], value, msg=key)
    # With noise the experts differ from each other (and the logits from the dense model's).
    noisy = UniMoEForConditionalGeneration.from_pretrained_parts(tmp_path / "llm", num_experts=4, upcycle_noise=0.05)
    experts = noisy.model.language_model.layers[0].mlp.experts.gate_up_proj
    assert not torch.allclose(experts[0], experts[1])
    with torch.no_grad():
        assert not torch.allclose(noisy(ids).logits[..., :V], ref, atol=1e-3)


def test_init_experts_from_per_modality_ffns(tmp_path):
    model = make_model()
    sources = []
    for i in range(4):
        torch.manual_seed(10 + i)
        dense = LlamaForCausalLM(text_config())
        sources.append(dense.state_dict())
    dense.save_pretrained(tmp_path / "ffn3")
    model.init_experts_from(sources[:3] + [str(tmp_path / "ffn3")])
    for layer in range(2):
        experts = model.model.language_model.layers[layer].mlp.experts
        for i, sd in enumerate(sources):
            gate_up = torch.cat([sd[f"model.layers.{layer}.mlp.gate_proj.weight"],
                                 sd[f"model.layers.{layer}.mlp.up_proj.weight"]])
            torch.testing.assert_close(experts.gate_up_proj[i], gate_up)
            torch.testing.assert_close(experts.down_proj[i], sd[f"model.layers.{layer}.mlp.down_proj.weight"])
    with pytest.raises(ValueError, match="one source per expert"):
        model.init_experts_from(sources[:2])


# ---------------------------------------------------------------------------------------------------------------------
def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_modality_losses_literal_values():
    # Uniform routing over 4 experts, target sets of 1 and 2 experts.
    logits = torch.zeros(2, 4)
    targets = torch.tensor([[True, False, False, False], [False, True, True, False]])
    mods = torch.tensor([0, 1])
    torch.testing.assert_close(modality_expert_loss(logits, mods, targets, "l1"), torch.tensor((0.75 + 0.5) / 2))
    torch.testing.assert_close(
        modality_expert_loss(logits, mods, targets, "ce"), torch.tensor((math.log(4) + math.log(2)) / 2)
    )
    # Unconstrained modalities don't count; nothing constrained -> 0.
    assert modality_expert_loss(logits, torch.tensor([2, 3]), torch.zeros(4, 4, dtype=torch.bool)) == 0
    # P = (1/2, 1/2), Q = (1/4, 3/4): mean of KL(P||Q) and KL(Q||P).
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]])
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    torch.testing.assert_close(modality_kl_loss(logits, torch.tensor([0, 3]), 4), torch.tensor((kl_pq + kl_qp) / 2))
    assert modality_kl_loss(logits, torch.tensor([1, 1]), 4) == 0  # one modality only


def test_aux_losses_equal_hand_computed():
    model = make_model(modality_expert_map={"image": [1], "audio": [2, 3]})
    # batch 1, seq 4: text, image, audio, padding (masked out).
    layer_logits = [
        [[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 0.0, 0.2], [0.0, 0.1, 1.5, 1.4], [9.0, 9.0, 9.0, 9.0]],
        [[0.0, 0.2, 1.0, -0.1], [1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 0.3, 2.0], [0.0, 0.0, 0.0, 9.0]],
    ]
    input_ids = torch.tensor([[5, IMG, AUD, 1]])
    attention_mask = torch.tensor([[1, 1, 1, 0]])
    modality_ids = model.model.modality_ids(input_ids)
    assert modality_ids.tolist() == [[0, 1, 3, 0]]
    got = model.compute_aux_losses(tuple(torch.tensor(x) for x in layer_logits), modality_ids, attention_mask)

    want = {"balance_loss": 0.0, "z_loss": 0.0, "modality_expert_loss": 0.0, "modality_kl_loss": 0.0}
    for rows in layer_logits:
        rows = rows[:3]  # the padding token is excluded
        probs = [_softmax(r) for r in rows]
        top2 = [sorted(range(4), key=lambda e: -r[e])[:2] for r in rows]
        frac = [sum(e in t for t in top2) / (3 * 2) for e in range(4)]
        mean_p = [sum(p[e] for p in probs) / 3 for e in range(4)]
        want["balance_loss"] += 4 * sum(f * p for f, p in zip(frac, mean_p)) / 2
        want["z_loss"] += sum(math.log(sum(math.exp(x) for x in r)) ** 2 for r in rows) / 3 / 2
        # image token -> expert 1, audio token -> experts 2 and 3; text unconstrained.
        want["modality_expert_loss"] += ((1 - probs[1][1]) + (1 - probs[2][2] - probs[2][3])) / 2 / 2
        pairs = [(a, b) for a in range(3) for b in range(3) if a != b]  # one token per modality here
        want["modality_kl_loss"] += sum(_kl(probs[a], probs[b]) for a, b in pairs) / len(pairs) / 2
    for name, value in want.items():
        torch.testing.assert_close(got[name], torch.tensor(value), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(got["aux_loss"], torch.tensor(0.01 * want["balance_loss"]), rtol=1e-5, atol=1e-7)


def test_experts_implementations_agree(processor):
    inputs = mixed_inputs(processor)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= V, -100)
    results = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        if impl == "batched_mm":  # switched after construction
            model = make_model(seed=3, router_z_loss_coef=0.01).train()
            model.set_experts_implementation(impl)
        else:  # chosen in the config (propagates to the sub-configs, whose HF models have no experts)
            model = make_model(seed=3, router_z_loss_coef=0.01, experts_implementation=impl).train()
        assert model.config._experts_implementation == impl
        assert model.model.language_model.layers[0].mlp.experts.config._experts_implementation == impl
        out = model(**inputs, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "language_model" in n and ".mlp." in n}
        results[impl] = (out.logits.detach(), grads)
    ref_logits, ref_grads = results["eager"]
    assert len(ref_grads) == 6  # router, gate_up_proj, down_proj; 2 layers
    for impl in ("batched_mm", "grouped_mm"):
        logits, grads = results[impl]
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=f"{impl} {name}")


# ---------------------------------------------------------------------------------------------------------------------
def test_model_input_errors(model, processor):
    inputs = mixed_inputs(processor)
    ids = inputs["input_ids"]
    with pytest.raises(ValueError, match="<image> placeholder tokens but no `pixel_values`"):
        model(input_ids=ids, pixel_values_videos=inputs["pixel_values_videos"], input_features=inputs["input_features"])
    with pytest.raises(ValueError, match=r"more image inputs \(2\) than <image> placeholders \(1"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"].repeat(2, 1, 1, 1)})
    short = ids.clone()
    short[0, (short[0] == IMG).nonzero()[0]] = 5  # one <image> token fewer than image_seq_length
    with pytest.raises(ValueError, match="image token count mismatch"):
        model(**{**inputs, "input_ids": short})
    with pytest.raises(ValueError, match="audio longer than supported"):
        model(**{**inputs, "input_features": torch.randn(1, 80, 150)})
    text_only = UniMoEForConditionalGeneration(make_config(vision_config=None, audio_config=None))
    with pytest.raises(ValueError, match="no vision encoder"):
        text_only(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_processor_errors(processor):
    image, video, clip = media()
    with pytest.raises(ValueError, match="placeholder.* but no images"):
        processor(text="w1 <image>")
    with pytest.raises(ValueError, match=r"more images \(2\) than <image> placeholders \(1\)"):
        processor(text="w1 <image>", images=[image, image])
    with pytest.raises(ValueError, match="audio longer than supported"):
        processor(text="<audio>", audio=[np.zeros(16001, dtype=np.float32)])
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "smell"}]}])


def test_processor_expands_placeholders_and_chat_template(processor):
    image, video, clip = media()
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " w1 w2"}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    assert text == "<|user|>\n<image> w1 w2\n<|assistant|>\n"
    processor.tokenizer.padding_side = "right"
    out = mixed_inputs(processor)
    assert out["pixel_values"].shape == (1, 3, 32, 32) and out["pixel_values_videos"].shape == (1, 3, 3, 32, 32)
    assert out["input_features"].shape == (1, 80, 100)
    assert (out["input_ids"] == IMG).sum() == 16 and (out["input_ids"] == AUD).sum() == 6
    assert (out["input_ids"] == VID).sum() == 16
    assert processor.tokenizer.pad_token == "</s>"  # no pad token: eos is used


def test_save_and_reload_without_package(tmp_path, model, processor):
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "modeling_uni_moe.py").exists() and (tmp_path / "ckpt" / "moe_layers.py").exists()
    image, video, clip = media()
    texts = ["w1 <image> w2 w3 <audio> w4", "w5 <video> w6 w7 w8 w9 w10 w11"]
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "video.npy", np.stack(video))
    np.save(tmp_path / "clip.npy", clip)
    processor.tokenizer.padding_side = "right"
    inputs = processor(text=texts, images=[image], videos=[video], audio=[clip])
    with torch.no_grad():
        want = model(**inputs).logits
    code = f"""
    import json, numpy as np, torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
    d = {str(tmp_path / "ckpt")!r}
    proc = AutoProcessor.from_pretrained(d, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    model2 = AutoModelForImageTextToText.from_pretrained(d, trust_remote_code=True).eval()
    proc.tokenizer.padding_side = "right"
    image, clip = np.load("image.npy"), np.load("clip.npy")
    video = list(np.load("video.npy"))
    inputs = proc(text={texts!r}, images=[image], videos=[video], audio=[clip])
    with torch.no_grad():
        logits = model(**inputs).logits
        logits2 = model2(**inputs).logits
    print(json.dumps({{"model": type(model).__name__, "module": type(model).__module__, "proc": type(proc).__name__,
                      "ids": inputs["input_ids"].tolist(), "logits": logits.tolist(),
                      "same": bool(torch.equal(logits, logits2)), "impl": model.config._experts_implementation}}))
    """
    result = run_without_package(code, cwd=tmp_path)
    assert result["model"] == "UniMoEForConditionalGeneration" and "multimodal_moe" not in result["module"]
    assert result["proc"] == "UniMoEProcessor" and result["same"] and result["impl"] == "grouped_mm"
    assert result["ids"] == inputs["input_ids"].tolist()
    torch.testing.assert_close(torch.tensor(result["logits"]), want, atol=1e-5, rtol=1e-5)
    # Same checkpoint in-process: AutoModelForCausalLM picks the registered class.
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(again) is UniMoEForConditionalGeneration
    assert again.generation_config.suppress_tokens == [IMG, VID, AUD]
    grouped = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", experts_implementation="grouped_mm")
    assert grouped.config._experts_implementation == "grouped_mm"
    reloaded = AutoProcessor.from_pretrained(tmp_path / "ckpt")
    assert reloaded.chat_template == processor.chat_template and reloaded.audio_seq_length == 6


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_zoo_build_upcycle_identity_and_generation(tmp_path):
    from multimodal_moe.training import zoo
    from multimodal_moe.training.uni_moe_init import build_uni_moe

    paths = {name: zoo.fetch(name) for name in ("smollm2-135m", "dinov2-small", "whisper-tiny-en")}
    out = build_uni_moe("smollm2-135m", "dinov2-small", "whisper-tiny-en", num_experts=4, top_k=2,
                        output_dir=str(tmp_path / "uni"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(paths["smollm2-135m"]).eval()
    ids = processor.tokenizer(["The capital of France is", "Once upon a time"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = dense(**ids).logits
        got = model(**ids).logits
    torch.testing.assert_close(got[..., : ref.shape[-1]], ref, atol=1e-4, rtol=0)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    clip = (0.1 * np.sin(np.arange(16000 * 2) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    for kind, extra in (("image", dict(images=[image])), ("audio", dict(audio=[clip]))):
        conv = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "Describe this."}]}]
        inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, **extra)
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=8, min_new_tokens=4, do_sample=False)
        new = gen[0, inputs["input_ids"].shape[1]:]
        assert new.numel() > 0
        text = processor.decode(new, skip_special_tokens=True)
        assert text.strip()  # untrained connectors: any text, but text
        print(kind, repr(text))


def test_gradient_checkpointing_keeps_router_grads():
    ids = torch.randint(4, V, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model = make_model(seed=5, router_aux_loss_coef=0.1).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append((out.loss.detach(), model.model.language_model.layers[0].mlp.gate.weight.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)


def test_pre_stored_encoder_states_give_the_same_outputs_as_raw_media(model, processor):
    image, _, clip = media()
    inputs = processor(text=["w1 <image> w2 <audio> w3"], images=[image], audio=[clip])
    with torch.no_grad():
        ref = model(**inputs).logits
        image_states = model.model.get_image_encoder_states(inputs["pixel_values"])
        audio_states = model.model.get_audio_encoder_states(inputs["input_features"])
        stored = {k: v for k, v in inputs.items() if k not in ("pixel_values", "input_features")}
        out = model(**stored, image_encoder_states=image_states, audio_encoder_states=audio_states).logits
        torch.testing.assert_close(out, ref)
        generated = model.generate(**stored, image_encoder_states=image_states, audio_encoder_states=audio_states,
                                   max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(generated, model.generate(**inputs, max_new_tokens=4, do_sample=False))
    assert image_states.shape == (1, 16, 32) and audio_states.shape == (1, 50, 32)
    with pytest.raises(ValueError, match="either `pixel_values` or `image_encoder_states`"):
        model(**inputs, image_encoder_states=image_states)
    with pytest.raises(ValueError, match=r"audio_encoder_states must be \(items, 50, 32\)"):
        model(**stored, image_encoder_states=image_states, audio_encoder_states=audio_states[:, :10])


def test_loaded_model_keeps_its_encoders_frozen(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    loaded = UniMoEForConditionalGeneration.from_pretrained(tmp_path)
    for tower in (loaded.model.vision_tower, loaded.model.audio_tower):
        assert not any(p.requires_grad for p in tower.parameters())
    assert all(p.requires_grad for p in loaded.model.language_model.parameters())
    loaded, info = UniMoEForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not any(p.requires_grad for p in loaded.model.vision_tower.parameters())
