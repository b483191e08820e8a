"""The Omni-SMoLA multi-task recipe on tiny parts: trainable parameters per arm, modality ids reaching the SMoLA
layers, a 4-bit base, and a tiny end-to-end experiment writing its results."""

import json
import math
from pathlib import Path

import pytest
import torch

from multimodal_moe.training.data.collator import UniMoEDataCollator
from multimodal_moe.training.data.tasks import build_mixture
from multimodal_moe.training.smola_multitask import (
    ModalityAwareGenerator,
    OmniSMoLATrainer,
    _load_base,
    _target_shapes,
    add_adapter,
    load_recipe,
    lora_adapter_params,
    matched_lora_rank,
    run_multitask_experiment,
    smola_adapter_params,
    smola_layer_ids,
    smola_modality_ids_from_input_ids,
    train_multitask,
    trainable_parameter_names,
)
from multimodal_moe.training.smola_peft.layer import SMoLAPeftLinear
from multimodal_moe.training.uni_moe_init import build_uni_moe

from tiny_parts import save_tiny_parts

REPO = Path(__file__).resolve().parents[1]
SMOLA = {"num_experts": 2, "r": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"],
         "expert_groups": ["text", "vision", "audio", "multimodal"], "shared_groups": ["multimodal"]}
CONNECTOR_PREFIXES = ("model.vision_connector.", "model.audio_connector.")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return save_tiny_parts(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def base_dir(parts, tmp_path_factory):
    torch.manual_seed(0)
    return build_uni_moe(parts["llm"], parts["vision"], parts["audio"], output_dir=str(tmp_path_factory.mktemp("base")),
                         moe_layers=[], vision_connector_type="qformer", vision_num_query_tokens=4,
                         audio_connector_type="qformer", audio_num_query_tokens=4, qformer_num_heads=4,
                         audio_window_seconds=8, chat_template="chatml")


@pytest.fixture(scope="module")
def mixture():
    return build_mixture({"caption": 20, "classify": 8, "transcribe": 20}, "train", progress=False)


def _names(peft_model):
    return trainable_parameter_names(peft_model)


def _strip(name):  # peft's prefix
    return name.removeprefix("base_model.model.")


def test_trainable_parameters_per_arm(base_dir):
    counts = {}
    for method in ("smola", "lora"):
        model, _ = _load_base(base_dir, quantize_4bit=False)
        shapes = _target_shapes(model, SMOLA["target_modules"])
        assert len(shapes) == 4  # q_proj, v_proj of 2 decoder layers; not the encoders' q_proj / v_proj
        peft_model, info = add_adapter(model, method, smola=SMOLA, lora={"r": "match"})
        names = [_strip(n) for n in _names(peft_model)]
        marker = ".smola_" if method == "smola" else ".lora_"
        adapters = [n for n in names if marker in n]
        connectors = [n for n in names if n.startswith(CONNECTOR_PREFIXES)]
        assert adapters and connectors and sorted(adapters + connectors) == sorted(names)
        assert all(n.startswith("model.language_model.layers.") for n in adapters)
        assert {n.split(".")[1] for n in connectors} == {"vision_connector", "audio_connector"}
        from peft.tuners.lora import LoraLayer

        kind = SMoLAPeftLinear if method == "smola" else LoraLayer
        adapted = [_strip(n) for n, m in peft_model.named_modules() if isinstance(m, kind)]
        assert len(adapted) == 4 and all(n.startswith("model.language_model.layers.") for n in adapted)
        assert not any("tower" in n for n in adapted)
        counts[method] = info
    smola, lora = counts["smola"], counts["lora"]
    assert smola["adapter_params"] == smola_adapter_params(shapes, 2, 2, 4) == 4608
    assert lora["r"] == matched_lora_rank(shapes, SMOLA)
    assert lora["adapter_params"] == lora_adapter_params(shapes, lora["r"])
    # the rule: the closest rank, i.e. within half a rank step of SMoLA's count
    assert abs(lora["adapter_params"] - smola["adapter_params"]) <= lora_adapter_params(shapes, 1) / 2
    assert lora["connector_params"] == smola["connector_params"] > 0
    assert smola["trainable_params"] == smola["adapter_params"] + smola["connector_params"]


def test_modality_ids_reach_smola_layers(base_dir, mixture, tmp_path):
    from transformers import TrainingArguments

    model, processor = _load_base(base_dir, quantize_4bit=False)
    model, _ = add_adapter(model, "smola", smola=SMOLA)
    layers = [m for m in model.modules() if isinstance(m, SMoLAPeftLinear)]
    seen = []
    hook = layers[0].register_forward_pre_hook(
        lambda m, args: seen.append((m.modality_ids.clone() if m.modality_ids is not None else None, args[0].shape)))
    collator = UniMoEDataCollator(processor)
    config = model.get_base_model().config
    batches = []
    original = collator.__call__

    class Recording(UniMoEDataCollator):
        def __call__(self, rows):
            batch = original(rows)
            batches.append(batch["input_ids"])
            return batch

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                             save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True,
                             disable_tqdm=True, logging_steps=1)
    trainer = OmniSMoLATrainer(model=model, args=args, train_dataset=mixture, data_collator=Recording(processor))
    trainer.train()
    hook.remove()
    assert len(seen) == 4 and len(batches) >= 4  # the data loader may collate one batch ahead
    modalities_seen = set()
    for (ids, shape), input_ids in zip(seen, batches):
        assert ids is not None and tuple(ids.shape) == tuple(shape[:2]) == tuple(input_ids.shape)
        assert torch.equal(ids, smola_modality_ids_from_input_ids(config, input_ids, ["text", "vision", "audio"]))
        present = set(ids.unique().tolist()) - {0}
        assert len(present) == 1  # ModalityLengthGroupedSampler: one modality per batch
        modalities_seen |= present
        assert (ids == 1).any() == (input_ids == config.image_token_id).any()
        assert (ids == 2).any() == (input_ids == config.audio_token_id).any()
    assert modalities_seen  # at least one media modality went through the layers
    assert all(layer.modality_ids is None for layer in layers)  # cleared after the step

    # generation: the prompt's ids are set during the prefill, generated tokens are text
    seen.clear()
    hook = layers[0].register_forward_pre_hook(
        lambda m, args: seen.append(None if m.modality_ids is None else tuple(m.modality_ids.shape)))
    processor.tokenizer.padding_side = "left"
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "\nTranscribe the speech."}]}],
        add_generation_prompt=True)
    from multimodal_moe.training.data.tasks import load_audio

    row = next(r for r in mixture if r["task"] == "transcribe")
    inputs = processor(text=[prompt], audio=[load_audio(row["audio"][0])])
    gen = ModalityAwareGenerator(model).eval()
    out = gen.generate(**inputs, max_new_tokens=3, do_sample=False)
    hook.remove()
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert seen[0] == tuple(inputs["input_ids"].shape)
    assert all(layer.modality_ids is None for layer in layers)


def test_smola_layer_ids_context(base_dir):
    model, _ = _load_base(base_dir, quantize_4bit=False)
    model, _ = add_adapter(model, "smola", smola=SMOLA)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with smola_layer_ids(model, ids):
        assert all(m.modality_ids is ids for m in model.modules() if isinstance(m, SMoLAPeftLinear))
    # unlike smola_peft's own helpers, the Uni-MoE model's `modality_ids` method is left alone
    assert callable(model.get_base_model().model.modality_ids)


def test_4bit_base_trains_on_cpu(base_dir, mixture, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    subset = mixture.select(range(8))
    model, processor, info = train_multitask(base_dir, "smola", ["caption"], tmp_path, train_data=subset, steps=2,
                                             batch_size=4, lr=1e-3, quantize_4bit=True, smola=SMOLA, progress=False)
    assert info["quantize_4bit"] and math.isfinite(info["train_loss"])
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all("language_model" in n for n in quantized)
    model.train()
    batch = UniMoEDataCollator(processor)([subset[i] for i in range(4)])
    config = model.get_base_model().config
    with smola_layer_ids(model, smola_modality_ids_from_input_ids(config, batch["input_ids"],
                                                                  ["text", "vision", "audio"])):
        out = model(**batch)
        assert torch.isfinite(out.loss)
        out.loss.backward()
    with_grad = {_strip(n) for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".smola_" in n or n.startswith(CONNECTOR_PREFIXES) for n in with_grad)
    assert any(".smola_B." in n for n in with_grad) and any(n.startswith(CONNECTOR_PREFIXES) for n in with_grad)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert module.weight.grad is None and not module.weight.requires_grad


def test_recipe_quick_overrides():
    recipe = load_recipe(REPO / "recipes" / "smola_multitask.yaml")
    quick = load_recipe(REPO / "recipes" / "smola_multitask.yaml", quick=True)
    assert recipe["arms"] == ["smola", "lora", "specialists"] and set(recipe["tasks"]) == {"caption", "classify",
                                                                                          "transcribe"}
    assert quick["train"]["steps"] < recipe["train"]["steps"]
    assert quick["train"]["lr"] == recipe["train"]["lr"] and quick["smola"] == recipe["smola"]
    with pytest.raises(ValueError, match="unknown arms"):
        load_recipe({"arms": ["smola", "moe"]})


def test_tiny_experiment_end_to_end(parts, tmp_path):
    recipe = {
        "base": {**parts, "vision_connector_type": "mlp", "vision_merge_size": 2, "audio_connector_type": "mlp",
                 "audio_merge_size": 20},
        "cache_dir": str(tmp_path / "encoder-states"),
        "tasks": {"caption": {"train_limit": 10, "eval_limit": 5}, "classify": {"train_limit": 8, "eval_limit": 2},
                  "transcribe": {"train_limit": 10, "eval_limit": 5}},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 0, "logging_steps": 1},
        "smola": SMOLA,
        "eval": {"batch_size": 8, "max_new_tokens": 2},
    }
    results = run_multitask_experiment(recipe, tmp_path, progress=False)
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob(".results*"))  # no temporary files left
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["arms"]) == {"smola", "lora", "specialists"}
    for arm, info in saved["arms"].items():
        assert set(info["tasks"]) == {"caption", "classify", "transcribe"}, arm
        for task, res in info["tasks"].items():
            assert res["value"] is not None and res["examples"] > 0, (arm, task)
        assert info["trainable_params"] > info["adapter_params"] > 0 and info["train_seconds"] >= 0
    assert saved["arms"]["smola"]["steps"] == saved["arms"]["lora"]["steps"] == 3
    assert sum(m["steps"] for m in saved["arms"]["specialists"]["members"].values()) == 3
    assert results["arms"]["specialists"]["adapter_params"] == 3 * results["arms"]["lora"]["adapter_params"]
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {arm}" in table for arm in ("smola", "lora", "specialists"))
    assert "caption rougeL" in table and "transcribe wer" in table and "classify accuracy" in table
    from PIL import Image

    assert Image.open(tmp_path / "results.png").format == "PNG"
    assert list((tmp_path / "encoder-states").glob("encoder-states-*.arrow"))  # trained from pre-stored states


def test_adapters_only_on_an_aligned_base(base_dir):
    """train.connectors: false (a Uni-MoE stage-1 base): exactly the adapter parameters train."""
    model, _ = _load_base(base_dir, quantize_4bit=False)
    peft_model, info = add_adapter(model, "smola", smola=SMOLA, train_connectors=False)
    names = [_strip(n) for n in _names(peft_model)]
    assert names and all(".smola_" in n for n in names)
    assert info["connector_params"] == 0 and info["trainable_params"] == info["adapter_params"] == 4608
