"""Alt-MoE architecture: tiny random backbones, values checked against hand computations and reloads."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import multimodal_moe.modeling  # noqa: F401  (registers the Auto classes)
from hub_utils import run_without_package
from multimodal_moe.modeling import AltMoEConfig, AltMoEModel, AltMoEProcessor
from multimodal_moe.modeling.modeling_alt_moe import _pool_tokens, _token_mask
from multimodal_moe.modeling.moe_layers import MoERouter, load_balancing_loss, router_z_loss
from tiny import backbone_configs, tiny_audio, tiny_feature_extractor, tiny_image_processor, tiny_images, tiny_tokenizer

CONNECTOR = dict(hidden_size=32, expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, projection_dim=16)
TEXTS = ["red apple", "smiling cat face", "blue star"]


def make(modalities=("text", "vision"), text="llama", **kw):
    torch.manual_seed(0)
    configs = {k: v for k, v in backbone_configs(text).items() if k.split("_")[0] in modalities}
    return AltMoEModel(AltMoEConfig(**configs, **(CONNECTOR | kw))).eval()


def processor(modalities=("text", "vision")):
    return AltMoEProcessor(
        tiny_tokenizer() if "text" in modalities else None,
        tiny_image_processor() if "vision" in modalities else None,
        tiny_feature_extractor() if "audio" in modalities else None,
        text_template="an emoji of a {text}",
    )


def batch(modalities=("text", "vision"), n=3):
    inputs = {}
    if "text" in modalities:
        inputs["text"] = TEXTS[:n]
    if "vision" in modalities:
        inputs["images"] = tiny_images(n)
    if "audio" in modalities:
        inputs |= {"audio": tiny_audio(n), "sampling_rate": 16000}
    return dict(processor(modalities)(**inputs))


@pytest.mark.parametrize("text", ["llama", "bert"])
def test_every_direction_trains_the_connector_only(text):
    mods = ("text", "vision", "audio")
    model, inputs = make(mods, text=text).train(), batch(mods)
    assert len(model.config.directions) == 6
    for source, target in model.config.directions:
        model.zero_grad()
        out = model(source, target, **inputs)
        assert out.logits_per_query.shape == (3, 3) and torch.isfinite(out.loss)
        out.loss.backward()
        assert all(p.grad is None for p in model.backbones.parameters())
        assert model.connector.routers[target].weight.grad is not None
        assert all(model.connector.routers[m].weight.grad is None for m in mods if m != target)  # multi-gate
        assert torch.allclose(out.expert_usage.sum(), torch.tensor(1.0))


def test_precomputed_features_give_the_same_outputs_as_raw_inputs():
    model, inputs = make(), batch()
    with torch.no_grad():
        raw = model("text", "vision", **inputs)
        feats = {
            "text_features": model.get_backbone_features("text", **inputs),
            "vision_features": model.get_backbone_features("vision", **inputs),
        }
        cached = model("text", "vision", **feats)
    torch.testing.assert_close(raw.loss, cached.loss)
    torch.testing.assert_close(raw.logits_per_query, cached.logits_per_query)


def test_loss_is_the_weighted_sum_of_hand_computed_terms():
    model = make(router_aux_loss_coef=0.1, router_z_loss_coef=0.01, regression_loss="mse", contrastive_weight=0.5)
    with torch.no_grad():
        out = model("vision", "text", **batch())
        labels = torch.arange(3)
        logits = out.logits_per_query
        infonce = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        mse = ((out.predicted_features - out.target_features) ** 2).mean()
        expected = mse + 0.5 * infonce + 0.1 * out.aux_loss + 0.01 * out.z_loss
    torch.testing.assert_close(out.contrastive_loss, infonce)
    torch.testing.assert_close(out.regression_loss, mse)
    torch.testing.assert_close(out.loss, expected)
    # temperature 0.05 -> logits are 20 x cosine similarities
    torch.testing.assert_close(logits, 20.0 * out.query_embeds @ out.candidate_embeds.T)


def test_router_aux_losses_match_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]])
    top1 = logits.argmax(-1, keepdim=True)  # experts 0, 1, 0
    probs = logits.softmax(-1)
    fraction = torch.tensor([2 / 3, 1 / 3, 0.0, 0.0])
    torch.testing.assert_close(load_balancing_loss(logits, top1, 4), 4 * (fraction * probs.mean(0)).sum())
    torch.testing.assert_close(router_z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())


def test_routing_modes():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    official = MoERouter(8, 6, 2, "softmax_topk")
    torch.nn.init.normal_(official.weight)
    logits, weights, index = official(x)
    torch.testing.assert_close(weights, logits.softmax(-1).gather(-1, index))  # not renormalised
    assert (weights.sum(-1) < 1).all()
    mixtral = MoERouter(8, 6, 2, "topk_softmax")
    mixtral.weight.data.copy_(official.weight)
    _, weights2, index2 = mixtral(x)
    assert torch.equal(index, index2)
    torch.testing.assert_close(weights2, weights / weights.sum(-1, keepdim=True))


def test_experts_implementations_agree():
    model, inputs = make(), batch()
    feats = {"text_features": model.get_backbone_features("text", **inputs).detach()}
    feats["vision_features"] = model.get_backbone_features("vision", **inputs).detach()
    results = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(impl)
        model.zero_grad()
        out = model("text", "vision", **feats)
        out.loss.backward()
        results[impl] = (out.loss.detach(), model.connector.experts.up_proj.grad.clone())
    for impl in ("batched_mm", "grouped_mm"):
        torch.testing.assert_close(results[impl][0], results["eager"][0])
        torch.testing.assert_close(results[impl][1], results["eager"][1], atol=1e-5, rtol=1e-4)


def test_pooling_by_hand():
    hidden = torch.arange(24, dtype=torch.float).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    torch.testing.assert_close(_pool_tokens(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(_pool_tokens(hidden, mask, "mean")[1], hidden[1, 1:].mean(0))
    torch.testing.assert_close(_pool_tokens(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    torch.testing.assert_close(_pool_tokens(hidden, mask, "cls"), hidden[:, 0])
    # Whisper: 3000 input frames -> 1500 encoder positions
    frames = torch.zeros(1, 3000, dtype=torch.long)
    frames[0, :801] = 1
    assert _token_mask(torch.nn.Identity(), frames, torch.zeros(1, 1500, 2)).sum() == 401


def test_feature_statistics_standardise_inputs():
    model, inputs = make(), batch()
    feats = model.get_backbone_features("text", **inputs).detach()
    model.set_feature_statistics("text", feats.mean(0), feats.std(0))
    standardised = model._features("text", {"text_features": feats})
    torch.testing.assert_close(standardised.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="text statistics must have shape"):
        model.set_feature_statistics("text", torch.zeros(3), torch.ones(3))


def test_hub_reload_without_the_package(tmp_path):
    mods = ("text", "vision", "audio")
    model, proc, inputs = make(mods), processor(mods), batch(mods)
    with torch.no_grad():
        expected = model("audio", "text", **inputs).logits_per_query
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_alt_moe.AltMoEModel"
    assert not list((tmp_path / "ckpt").glob("*.bin"))
    result = run_without_package(
        f"""
        import json, numpy as np, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained("ckpt", trust_remote_code=True).eval()
        proc = AutoProcessor.from_pretrained("ckpt", trust_remote_code=True)
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8), "RGB") for _ in range(3)]
        rng = np.random.default_rng(0)
        audio = [rng.standard_normal(16000 * (i + 1) // 4).astype(np.float32) * 0.1 for i in range(3)]
        inputs = proc(text={TEXTS!r}, images=images, audio=audio, sampling_rate=16000)
        with torch.no_grad():
            out = model("audio", "text", **inputs)
        print(json.dumps({{"logits": out.logits_per_query.tolist(), "module": type(model).__module__}}))
        """,
        cwd=tmp_path,
    )
    assert "multimodal_moe" not in result["module"]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)


def test_connector_only_checkpoint_reassembles_from_backbone_sources(tmp_path):
    torch.manual_seed(0)
    configs = backbone_configs("bert")
    from transformers import AutoModel

    for name in ("text", "vision"):
        AutoModel.from_config(configs[f"{name}_config"]).save_pretrained(tmp_path / name)
    model = AltMoEModel.from_backbones(text=str(tmp_path / "text"), vision=str(tmp_path / "vision"), **CONNECTOR)
    model.eval()
    inputs = batch()
    with torch.no_grad():
        expected = model("text", "vision", **inputs).logits_per_query
    model.save_pretrained(tmp_path / "small", connector_only=True)
    full_size = sum(p.numel() for p in model.parameters())
    saved = (tmp_path / "small" / "model.safetensors").stat().st_size / 4
    assert saved < 0.5 * full_size  # no backbone weights inside
    reloaded = AltMoEModel.from_pretrained(tmp_path / "small").eval()
    assert not reloaded.config.connector_only
    with torch.no_grad():
        torch.testing.assert_close(reloaded("text", "vision", **inputs).logits_per_query, expected)


# ---------------------------------------------------------------------------------------------------- bad input
def test_config_errors_name_the_problem():
    configs = backbone_configs()
    with pytest.raises(ValueError, match="at least two modalities"):
        AltMoEConfig(text_config=configs["text_config"])
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        AltMoEConfig(**configs, num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        AltMoEConfig(**configs, token_pooling={"smell": "mean"})
    with pytest.raises(ValueError, match="token_pooling"):
        AltMoEConfig(**configs, token_pooling={"text": "max"})


def test_forward_errors_name_the_problem():
    model, inputs = make(), batch()
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        model("text", "audio", **inputs)
    with pytest.raises(ValueError, match="no input for modality 'vision'"):
        model("vision", "text", input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"vision_features must have shape \(batch, 32\)"):
        model("vision", "text", vision_features=torch.zeros(3, 30))
    with pytest.raises(ValueError, match="must pair up"):
        model("vision", "text", vision_features=torch.zeros(2, 32), text_features=torch.zeros(3, 32))
    with pytest.raises(ValueError, match="source and target must differ"):
        model("text", "text", **inputs)


def test_processor_errors_name_the_problem():
    proc = processor(("text", "vision", "audio"))
    gray = tiny_images(1)[0].convert("L")
    with pytest.raises(ValueError, match="mode 'L'; expected 'RGB'"):
        proc(images=[gray])
    with pytest.raises(ValueError, match="expects 16000 Hz"):
        proc(audio=tiny_audio(1), sampling_rate=8000)
    with pytest.raises(ValueError, match="at most 30 s"):
        proc(audio=[torch.zeros(16000 * 31).numpy()], sampling_rate=16000)
    with pytest.raises(ValueError, match="no feature extractor"):
        processor(("text", "vision"))(audio=tiny_audio(1), sampling_rate=16000)


def test_checkpoint_errors_name_the_problem(tmp_path):
    model = make()
    model.save_pretrained(tmp_path / "ok")
    # a pickle checkpoint is refused, never unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        AltMoEModel.from_pretrained(pickled)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(OSError, match="corrupt"):
        AltMoEModel.from_pretrained(corrupt)


def test_shortened_whisper_window(tmp_path):
    from transformers import AutoModel, WhisperFeatureExtractor

    torch.manual_seed(0)
    configs = backbone_configs("bert")
    for name in ("text", "audio"):
        AutoModel.from_config(configs[f"{name}_config"]).save_pretrained(tmp_path / name)
    model = AltMoEModel.from_backbones(
        text=str(tmp_path / "text"), audio=str(tmp_path / "audio"), audio_window_seconds=2, **CONNECTOR
    ).eval()
    full = AutoModel.from_pretrained(tmp_path / "audio").get_encoder()
    assert model.config.audio_config.max_source_positions == 100  # 2 s x 50 positions/s
    torch.testing.assert_close(model.backbones["audio"].embed_positions.weight, full.embed_positions.weight[:100])
    proc = AltMoEProcessor(tiny_tokenizer(), feature_extractor=WhisperFeatureExtractor(feature_size=16, chunk_length=2))
    inputs = proc(text=TEXTS, audio=tiny_audio(3), sampling_rate=16000)
    assert inputs["input_features"].shape[-1] == 200
    with torch.no_grad():
        expected = model("audio", "text", **inputs).logits_per_query
    model.save_pretrained(tmp_path / "small", connector_only=True)  # backbones reassembled with the short window
    with torch.no_grad():
        reloaded = AltMoEModel.from_pretrained(tmp_path / "small").eval()
        torch.testing.assert_close(reloaded("audio", "text", **inputs).logits_per_query, expected)
    with pytest.raises(ValueError, match="at most 2 s"):
        proc(audio=[np.zeros(16000 * 3, dtype=np.float32)], sampling_rate=16000)
    with pytest.raises(ValueError, match="Whisper audio backbone"):
        AltMoEModel.from_backbones(text=str(tmp_path / "text"), vision=str(tmp_path / "text"), audio_window_seconds=2)
