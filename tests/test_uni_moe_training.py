"""Uni-MoE progressive training on tiny parts with the real offline task data: what each stage trains (parameter by
parameter), the assembled MoE's experts, the whole pipeline (reload without the package), resume equivalence,
QLoRA stages on CPU and a two-process run."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from multimodal_moe.modeling import UniMoEForConditionalGeneration, UniMoEProcessor
from multimodal_moe.training.data.collator import UniMoEDataCollator
from multimodal_moe.training.data.tasks import build_mixture
from multimodal_moe.training.uni_moe import (
    build_moe_from_experts,
    load_recipe,
    prepare_stage1,
    prepare_stage2,
    prepare_stage3,
    run_pipeline,
)
from multimodal_moe.training.uni_moe_init import build_uni_moe

from hub_utils import run_without_package
from tiny_parts import save_tiny_parts

TESTS = Path(__file__).parent


def tiny_recipe(parts, **stage_overrides):
    step = {"batch_size": 4, "learning_rate": 1e-3, "save_steps": 2, "logging_steps": 1}
    recipe = {
        "seed": 0,
        "model": {**parts, "audio_window_seconds": 8, "vision_connector_type": "qformer", "vision_num_query_tokens": 4,
                  "audio_connector_type": "qformer", "audio_num_query_tokens": 4, "qformer_num_heads": 4},
        "stage1": {"tasks": {"caption": 30, "transcribe": 30}, "max_steps": 4, **step},
        "stage2": {"max_steps": 2, **step, "experts": [
            {"name": "image", "modality": "image", "tasks": {"caption": 30, "classify": 16}},
            {"name": "audio", "modality": "audio", "tasks": {"transcribe": 30}}]},
        "stage3": {"experts": ["base", "image", "audio", "base"], "top_k": 2, "lora": {"r": 4},
                   "tasks": {"caption": 30, "classify": 16, "transcribe": 30}, "max_steps": 4, **step},
        "routing": {"examples": 8, "tasks": {"classify": 8, "transcribe": 30}},
        "eval": {"benchmarks": ["fashion-classify"], "limits": {"fashion-classify": 8}, "batch_size": 8},
        "cache_dir": str(Path(parts["llm"]).parent / "encoder-states"),  # pre-stored encoder states
    }
    for stage, values in stage_overrides.items():
        recipe[stage].update(values)
    return recipe


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return save_tiny_parts(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def full_run(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "uninterrupted"
    run_pipeline(tiny_recipe(parts), out, progress=False)
    return out


def test_prestored_encoder_states_match_the_encoders_and_the_raw_batch(parts, tmp_path):
    from multimodal_moe.training.data.tasks import build_task_dataset
    from multimodal_moe.training.encoder_states import as_training_format, prestore_encoder_states

    base = build_uni_moe(parts["llm"], parts["vision"], parts["audio"], output_dir=str(tmp_path / "base"),
                         moe_layers=[], audio_window_seconds=8, audio_connector_type="mlp", audio_merge_size=20,
                         vision_merge_size=2)
    model = UniMoEForConditionalGeneration.from_pretrained(base).eval()
    processor = UniMoEProcessor.from_pretrained(base)
    raw = build_mixture({"caption": 6, "transcribe": 6}, "train", progress=False)
    stored = as_training_format(build_mixture({"caption": 6, "transcribe": 6}, "train", progress=False,
                                              map_part=lambda d: prestore_encoder_states(model, processor, d,
                                                                                         cache_dir=tmp_path / "c")))
    assert "images" not in stored.column_names and len(stored) == len(raw)
    collator = UniMoEDataCollator(processor)
    rows_raw, rows_stored = [raw[i] for i in range(len(raw))], [stored[i] for i in range(len(stored))]
    batch_raw, batch_stored = collator(rows_raw), collator(rows_stored)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch_raw[key], batch_stored[key])
    with torch.no_grad():
        states = model.model.get_image_encoder_states(batch_raw["pixel_values"])
        torch.testing.assert_close(batch_stored["image_encoder_states"], states, atol=2e-3, rtol=2e-3)  # float16
        assert batch_stored["audio_encoder_states"].shape == (sum(r["modality"] == "audio" for r in rows_raw), 400,
                                                              model.config.encoder_hidden_size("audio"))
        torch.testing.assert_close(model(**batch_stored).loss, model(**batch_raw).loss, atol=1e-3, rtol=1e-3)
    # a second call reads the cache: same files, nothing recomputed
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    part = build_task_dataset("caption", "train", limit=6, progress=False)
    again = prestore_encoder_states(model, processor, part, cache_dir=tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == files
    assert again.cache_files[0]["filename"].startswith(str(tmp_path / "c"))
    # bfloat16 autocast (what `bf16: auto` uses on a CPU with AMX): the processors stay outside it
    speech = build_task_dataset("transcribe", "train", limit=6, progress=False)
    bf16 = as_training_format(prestore_encoder_states(model, processor, speech, cache_dir=tmp_path / "p",
                                                      autocast_dtype=torch.bfloat16))
    fp32 = as_training_format(prestore_encoder_states(model, processor, speech, cache_dir=tmp_path / "p"))
    assert bf16.cache_files[0]["filename"] != fp32.cache_files[0]["filename"]  # the precision is part of the key
    a, b = torch.from_numpy(bf16[0]["audio_states"]), torch.from_numpy(fp32[0]["audio_states"])
    assert a.shape == b.shape and (a - b).norm() / b.norm() < 0.05
    model.model.vision_tower.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable parameters"):
        prestore_encoder_states(model, processor, part, cache_dir=tmp_path / "c")


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_each_stage_trains_exactly_its_parameters(parts, tmp_path):
    base = build_uni_moe(parts["llm"], parts["vision"], parts["audio"], output_dir=str(tmp_path / "base"),
                         moe_layers=[], vision_connector_type="qformer", vision_num_query_tokens=4,
                         audio_connector_type="qformer", audio_num_query_tokens=4, qformer_num_heads=4)
    model = UniMoEForConditionalGeneration.from_pretrained(base)
    names = [n for n, _ in model.named_parameters()]
    assert trainable(prepare_stage1(model)) == {n for n in names if n.startswith(("model.vision_connector.",
                                                                                     "model.audio_connector."))}
    assert trainable(prepare_stage2(model)) == {n for n in names if n.startswith("model.language_model.layers.")
                                                 and ".mlp." in n}
    assert all(n.startswith("model.language_model.layers.") for n in trainable(model))  # attention etc. frozen

    moe = build_moe_from_experts(base, [base] * 4, num_experts_per_tok=2)
    expected_lora_hosts = {n.rsplit(".weight", 1)[0] for n, _ in moe.named_parameters() if n.startswith(
                           "model.language_model.") and n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                                     "o_proj.weight"))}
    assert len(expected_lora_hosts) == 8
    peft_model = prepare_stage3(moe, {"r": 4})
    got = trainable(peft_model)
    lora = {n for n in got if ".lora_A." in n or ".lora_B." in n}
    assert not any(".mlp.gate." in n for n in lora)  # never LoRA on the router
    for host in expected_lora_hosts:  # every attention projection carries LoRA
        assert any(host.split("model.", 1)[1] in n for n in lora), host
    for i in range(2):  # and every layer's 3D experts
        assert any(f"layers.{i}.mlp.experts" in n and "lora_A" in n for n in lora)
    rest = got - lora
    assert rest and all(("modules_to_save" in n) and (".mlp.gate." in n or "_connector." in n) for n in rest)
    assert {n.split(".mlp.gate.")[0] for n in rest if ".mlp.gate." in n} == {
        n.split(".mlp.gate.")[0] for n in got if ".mlp.gate." in n}
    assert sum(".mlp.gate." in n for n in rest) == 2  # both routers train fully


def test_assembled_moe_experts_are_the_stage2_ffns(full_run):
    init = UniMoEForConditionalGeneration.from_pretrained(full_run / "stage3" / "init")
    stage1 = load_file(full_run / "stage1" / "model" / "model.safetensors")
    experts = {name: load_file(full_run / "stage2" / "experts" / name / "model.safetensors") for name in ("image",
                                                                                                         "audio")}
    assert json.loads((full_run / "stage2" / "experts" / "image" / "expert.json").read_text())["modality"] == "image"
    for layer in range(2):
        block = init.model.language_model.layers[layer].mlp
        prefix = f"model.language_model.layers.{layer}.mlp."
        for e, source in enumerate([stage1, experts["image"], experts["audio"], stage1]):
            gate_up = torch.cat([source[prefix + "gate_proj.weight"], source[prefix + "up_proj.weight"]])
            assert torch.equal(block.experts.gate_up_proj[e], gate_up)
            assert torch.equal(block.experts.down_proj[e], source[prefix + "down_proj.weight"])
    # stage 2 changed the FFNs (and only them: attention equals stage 1)
    assert not torch.equal(experts["image"]["model.language_model.layers.0.mlp.down_proj.weight"],
                           stage1["model.language_model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(init.model.language_model.layers[0].self_attn.q_proj.weight,
                       stage1["model.language_model.layers.0.self_attn.q_proj.weight"])


def test_pipeline_outputs_and_reload_without_package(full_run):
    results = json.loads((full_run / "results.json").read_text())
    assert [r["benchmark"] for r in results["comparison"]] == ["fashion-classify"]
    assert set(results["training"]) == {"stage1", "stage2/image", "stage2/audio", "stage3"}
    assert results["training"]["stage3"]["steps"] == 4
    assert (full_run / "routing" / "stage3_final.png").stat().st_size > 1000
    assert "| fashion-classify" in (full_run / "results.md").read_text()
    final = full_run / "stage3" / "model"
    model = UniMoEForConditionalGeneration.from_pretrained(final).eval()
    assert not any("lora" in k for k in model.state_dict())
    processor = UniMoEProcessor.from_pretrained(final)
    rows = build_mixture({"classify": 4, "transcribe": 30}, "heldout", progress=False).select(range(4))
    batch = UniMoEDataCollator(processor)(list(rows))
    torch.save({k: v for k, v in batch.items() if k != "labels"}, full_run / "batch.pt")
    with torch.no_grad():
        want = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    code = f"""
    import json, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained({str(final)!r}, trust_remote_code=True).eval()
    batch = torch.load({str(full_run / "batch.pt")!r})
    with torch.no_grad():
        logits = model(**batch).logits
    print(json.dumps({{"module": type(model).__module__, "logits": logits.tolist()}}))
    """
    result = run_without_package(code, cwd=full_run)
    assert "multimodal_moe" not in result["module"]
    torch.testing.assert_close(torch.tensor(result["logits"]), want, atol=1e-5, rtol=1e-5)


class Interrupt(TrainerCallback):
    """Stops the run like a Ctrl-C once stage 3 passes `at` steps (after its checkpoint at step 2)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if "stage3" in args.output_dir and state.global_step >= self.at:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_same_model(parts, full_run, tmp_path):
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_recipe(parts), out, progress=False, callbacks=[Interrupt(3)])
    done = json.loads((out / "pipeline.json").read_text())["done"]
    assert "stage2/audio" in done and "stage3" not in done and not (out / "stage3" / "model").exists()
    run_pipeline(tiny_recipe(parts), out, progress=False)
    done = json.loads((out / "pipeline.json").read_text())["done"]
    assert done["stage3"]["resumed_from"].endswith("checkpoint-2")
    a = load_file(full_run / "stage3" / "model" / "model.safetensors")
    b = load_file(out / "stage3" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    with pytest.raises(ValueError, match="different recipe"):
        run_pipeline(tiny_recipe(parts, stage3={"max_steps": 5}), out, progress=False)


def test_qlora_stages_on_cpu(parts, tmp_path):
    recipe = tiny_recipe(parts, stage2={"quantize_4bit": True, "max_steps": 2},
                         stage3={"quantize_4bit": True, "max_steps": 2})
    recipe["eval"] = {"benchmarks": []}
    run_pipeline(recipe, tmp_path / "q", progress=False)
    stage1 = load_file(tmp_path / "q" / "stage1" / "model" / "model.safetensors")
    expert = load_file(tmp_path / "q" / "stage2" / "experts" / "image" / "model.safetensors")
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    assert expert[key].dtype == torch.float32
    # dequantised NF4 base + LoRA delta: close to the stage-1 weight (4-bit error), not equal
    assert 0 < (expert[key] - stage1[key]).abs().max() < 0.5 * stage1[key].abs().max()
    done = json.loads((tmp_path / "q" / "pipeline.json").read_text())["done"]
    assert done["stage3"]["train_loss"] == pytest.approx(done["stage3"]["train_loss"])  # finite
    final = UniMoEForConditionalGeneration.from_pretrained(tmp_path / "q" / "stage3" / "model")
    assert all(p.dtype == torch.float32 for p in final.parameters())


def test_recipe_validation(parts):
    recipe = tiny_recipe(parts)
    bad = copy.deepcopy(recipe)
    bad["stage3"]["experts"] = ["base", "nope"]
    with pytest.raises(ValueError, match="'nope' is neither 'base' nor a stage2 expert"):
        load_recipe(bad)
    quick = load_recipe({**recipe, "quick": {"stage1": {"max_steps": 1}}}, quick=True)
    assert quick["stage1"]["max_steps"] == 1 and quick["stage1"]["batch_size"] == 4
    shipped = load_recipe(TESTS.parent / "recipes" / "uni_moe_offline.yaml", quick=True)
    assert shipped["stage3"]["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05}


def test_two_processes_match_one(parts, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    losses = {}
    for procs in (1, 2):
        recipe = tiny_recipe(parts)
        for stage in ("stage1", "stage2", "stage3"):
            recipe[stage]["batch_size"] = 4 // procs  # the same global batch
        recipe["eval"] = {"benchmarks": []}
        path = tmp_path / f"recipe{procs}.json"
        path.write_text(json.dumps(recipe))
        script = [str(TESTS / "scripts" / "train_uni_moe.py"), str(path), str(tmp_path / f"run{procs}")]
        launch = [sys.executable] if procs == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541"]
        proc = subprocess.run(launch + script, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done = json.loads((tmp_path / f"run{procs}" / "pipeline.json").read_text())["done"]
        losses[procs] = {unit: [h["loss"] for h in done[unit]["log"]] for unit in ("stage1", "stage2/image", "stage3")}
    for unit in losses[1]:
        assert losses[2][unit] == pytest.approx(losses[1][unit], rel=2e-3, abs=2e-3), unit


def test_init_cli_builds_merge_connectors(parts, tmp_path, capsys):
    from multimodal_moe.cli import main

    assert main(["init", "uni-moe", "--llm", parts["llm"], "--vision", parts["vision"], "--audio", parts["audio"],
                 "--vision-merge-size", "2", "--audio-connector", "mlp", "--audio-merge-size", "20",
                 "--audio-window-seconds", "8", "--num-experts", "2", "--top-k", "1",
                 "--output-dir", str(tmp_path / "m")]) == 0
    config = UniMoEForConditionalGeneration.config_class.from_pretrained(tmp_path / "m")
    processor = UniMoEProcessor.from_pretrained(tmp_path / "m")
    assert (config.vision_merge_size, config.audio_merge_size, config.audio_seq_length) == (2, 20, 20)
    assert (processor.image_seq_length, processor.audio_seq_length) == (config.image_seq_length, 20)
