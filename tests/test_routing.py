"""Routing statistics / heatmap of Uni-MoE, the ZeRO-3 leaf-module helper and the DeepSpeed recipes."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal_moe.modeling.configuration_uni_moe import MODALITIES
from multimodal_moe.modeling.modeling_uni_moe import UniMoESparseMoeBlock
from multimodal_moe.training.distributed import zero3_leaf_modules
from multimodal_moe.training.routing import plot_routing_heatmap, routing_statistics, save_routing_report

from test_uni_moe import make_model, make_processor, mixed_inputs


RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "deepspeed"


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def model():
    return make_model()


def hand_statistics(model, batches):
    """Reference: per-token python loop over the router logits the model returns."""
    cfg = model.config
    k, num_experts = cfg.num_experts_per_tok, cfg.num_experts
    counts, probs, tokens = {}, {}, {}
    for batch in batches:
        with torch.no_grad():
            out = model(**batch, output_router_logits=True)
        mods = model.model.modality_ids(batch["input_ids"]).reshape(-1).tolist()
        keep = batch["attention_mask"].reshape(-1).tolist()
        logits = [layer.numpy().astype(np.float64) for layer in out.router_logits]
        for t, (mod, kept) in enumerate(zip(mods, keep)):
            if not kept:
                continue
            name = MODALITIES[mod]
            tokens[name] = tokens.get(name, 0) + 1
            c = counts.setdefault(name, np.zeros((len(logits), num_experts)))
            p = probs.setdefault(name, np.zeros((len(logits), num_experts)))
            for layer, lg in enumerate(logits):
                row = lg[t]
                for e in np.argsort(-row, kind="stable")[:k]:
                    c[layer, e] += 1
                ex = np.exp(row - row.max())
                p[layer] += ex / ex.sum()
    frac = {m: counts[m] / (tokens[m] * k) for m in tokens}
    mean = {m: probs[m] / tokens[m] for m in tokens}
    return tokens, frac, mean


def pad_right(batch, extra, pad_id):
    """A copy of `batch` with `extra` more padding columns (attention 0) on the right."""
    out = dict(batch)
    b = batch["input_ids"].shape[0]
    out["input_ids"] = torch.cat([batch["input_ids"], torch.full((b, extra), pad_id, dtype=torch.long)], dim=1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(b, extra, dtype=torch.long)], dim=1)
    return out


# ---------------------------------------------------------------------------------------------------------------------
def test_statistics_match_hand_computation(model, processor):
    inputs = dict(mixed_inputs(processor))
    assert int(inputs["attention_mask"].sum()) < inputs["attention_mask"].numel()  # the batch has padding
    stats = routing_statistics(model, [inputs, inputs], progress=False)
    tokens, frac, mean = hand_statistics(model, [inputs, inputs])

    assert stats["num_experts"] == 4 and stats["top_k"] == 2
    assert stats["layers"] == [0, 1]
    assert stats["modalities"] == ["text", "image", "video", "audio"]
    assert stats["tokens"] == tokens
    # 16 image, 16 video, 6 audio placeholder tokens per batch (two batches)
    assert stats["tokens"]["image"] == 32 and stats["tokens"]["video"] == 32 and stats["tokens"]["audio"] == 12
    assert sum(stats["tokens"].values()) == 2 * int(inputs["attention_mask"].sum())
    for m in stats["modalities"]:
        np.testing.assert_allclose(np.array(stats["top_k_fraction"][m]), frac[m], atol=1e-12)
        np.testing.assert_allclose(np.array(stats["mean_probability"][m]), mean[m], atol=1e-6)


def test_fractions_and_probabilities_sum_to_one(model, processor):
    stats = routing_statistics(model, [mixed_inputs(processor)], progress=False)
    for m in stats["modalities"]:
        frac = np.array(stats["top_k_fraction"][m])
        prob = np.array(stats["mean_probability"][m])
        assert frac.shape == prob.shape == (2, 4)
        np.testing.assert_allclose(frac.sum(axis=1), 1.0, atol=1e-9)
        np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-6)
        assert (frac >= 0).all() and (frac <= 1).all()
        # each fraction is a count over tokens * k slots, and no expert gets a token twice: at most 1/k
        counts = frac * stats["tokens"][m] * stats["top_k"]
        np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
        assert (frac <= 1 / stats["top_k"] + 1e-12).all()


def test_padding_tokens_are_excluded(model, processor):
    inputs = dict(mixed_inputs(processor))
    padded = pad_right(inputs, extra=7, pad_id=processor.tokenizer.pad_token_id)
    base = routing_statistics(model, [inputs], progress=False)
    stats = routing_statistics(model, [padded], progress=False)
    n_real = int(inputs["attention_mask"].sum())
    assert sum(stats["tokens"].values()) == n_real == int(padded["attention_mask"].sum())
    assert stats["tokens"] == base["tokens"]
    mods = model.model.modality_ids(inputs["input_ids"])[inputs["attention_mask"].bool()]
    assert stats["tokens"]["text"] == int((mods == 0).sum())
    for m in base["modalities"]:  # right padding under causal attention doesn't change the real tokens' routing
        np.testing.assert_allclose(stats["top_k_fraction"][m], base["top_k_fraction"][m], atol=1e-12)
        np.testing.assert_allclose(stats["mean_probability"][m], base["mean_probability"][m], atol=1e-5)

    # Counting the padding in (all-ones mask, same ids) does change the text counts: the mask is what is read.
    unmasked = dict(padded, attention_mask=torch.ones_like(padded["attention_mask"]))
    assert routing_statistics(model, [unmasked], progress=False)["tokens"]["text"] == stats["tokens"]["text"] + 7 * 2 + 3


def test_labels_dropped_eval_no_grad_and_mode_restored(processor):
    model = make_model().train()
    seen = []

    def hook(module, args, kwargs):
        seen.append((sorted(kwargs), module.training, torch.is_grad_enabled()))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    inputs = dict(mixed_inputs(processor))
    inputs["labels"] = inputs["input_ids"].clone()
    try:
        stats = routing_statistics(model, [inputs], progress=False)
    finally:
        handle.remove()
    assert len(seen) == 1
    keys, training, grad = seen[0]
    assert "labels" not in keys and "input_ids" in keys and "attention_mask" in keys
    assert training is False and grad is False
    assert model.training  # put back
    assert "labels" in inputs  # the caller's batch is not modified
    assert stats["tokens"]["image"] == 16


def test_moe_layer_subset(processor):
    model = make_model(moe_layers=[1])
    stats = routing_statistics(model, [mixed_inputs(processor)], progress=False)
    assert stats["layers"] == [1]
    for m in stats["modalities"]:
        assert np.array(stats["top_k_fraction"][m]).shape == (1, 4)
    # layer 1's statistics are the ones of the second router_logits entry
    inputs = dict(mixed_inputs(processor))
    _, frac, _ = hand_statistics(model, [inputs])
    np.testing.assert_allclose(stats["top_k_fraction"]["text"], frac["text"], atol=1e-12)


def test_report_png_and_json(model, processor, tmp_path):
    stats = save_routing_report(model, [mixed_inputs(processor)], tmp_path / "out", "step_1", progress=False)
    json_path, png_path = tmp_path / "out" / "step_1.json", tmp_path / "out" / "step_1.png"
    assert json.loads(json_path.read_text()) == stats
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png_path) as image:
        assert image.format == "PNG"
        assert image.width >= 300 and image.height >= 200
        image.load()
        assert np.asarray(image.convert("L")).std() > 5  # something is drawn
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step_1.json", "step_1.png"]  # no temp files

    # plot from the reloaded JSON, over an existing file
    out = plot_routing_heatmap(json.loads(json_path.read_text()), png_path, title="again")
    assert Path(out) == png_path and Image.open(png_path).format == "PNG"


def test_plot_rejects_empty_stats(tmp_path):
    empty = {"num_experts": 4, "top_k": 2, "layers": [], "modalities": [], "tokens": {},
             "top_k_fraction": {}, "mean_probability": {}}
    with pytest.raises(ValueError, match="no routing to plot"):
        plot_routing_heatmap(empty, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_dense_model_reports_no_layers(processor, tmp_path):
    try:
        model = make_model(moe_layers=[])
    except ValueError as err:  # dense Uni-MoE support not present in this checkout
        pytest.skip(f"moe_layers=[] not supported: {err}")
    stats = save_routing_report(model, [mixed_inputs(processor)], tmp_path, "dense", progress=False)
    assert stats["layers"] == [] and stats["top_k_fraction"] == {}
    assert json.loads((tmp_path / "dense.json").read_text()) == stats
    assert not (tmp_path / "dense.png").exists()


# ---------------------------------------------------------------------------------------------------------------------
def test_zero3_leaf_modules_needs_deepspeed(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.delitem(sys.modules, "deepspeed.utils", raising=False)
    with pytest.raises(ImportError, match="pip install deepspeed"):
        zero3_leaf_modules(model)


def fake_deepspeed(monkeypatch):
    calls = []
    ds = types.ModuleType("deepspeed")
    utils = types.ModuleType("deepspeed.utils")
    utils.set_z3_leaf_modules = lambda model, classes: calls.append((model, list(classes)))
    ds.utils = utils
    monkeypatch.setitem(sys.modules, "deepspeed", ds)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    return calls


def test_zero3_leaf_modules_registers_moe_block(model, monkeypatch):
    calls = fake_deepspeed(monkeypatch)
    assert zero3_leaf_modules(model) == [UniMoESparseMoeBlock]
    assert len(calls) == 1 and calls[0][0] is model and calls[0][1] == [UniMoESparseMoeBlock]


def test_zero3_leaf_modules_peft_and_dense(monkeypatch):
    from peft import LoraConfig, get_peft_model

    calls = fake_deepspeed(monkeypatch)
    peft_model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert zero3_leaf_modules(peft_model) == [UniMoESparseMoeBlock]
    assert calls[-1][0] is peft_model and calls[-1][1] == [UniMoESparseMoeBlock]

    try:
        dense = make_model(moe_layers=[])
    except ValueError:
        return
    n = len(calls)
    assert zero3_leaf_modules(dense) == [] and len(calls) == n


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_recipes(stage):
    config = json.loads((RECIPES / f"zero{stage}.json").read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert config["bf16"]["enabled"] == "auto"
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert config[key] == "auto"
    assert "optimizer" not in config and "scheduler" not in config  # left to the Trainer
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert zero["stage3_prefetch_bucket_size"] == "auto" and zero["reduce_bucket_size"] == "auto"
