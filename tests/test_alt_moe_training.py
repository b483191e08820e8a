"""Alt-MoE alternating training: schedules, a falling loss, resume equivalence, the feature cache."""

import datasets
import pytest
import torch
from transformers import TrainingArguments

import multimodal_moe.modeling  # noqa: F401
from multimodal_moe.modeling import AltMoEConfig, AltMoEModel
from multimodal_moe.training.alt_moe import AltMoETrainer, DirectionSchedule, LinearAlignmentBaseline
from multimodal_moe.training.features import precompute_features
from test_alt_moe import CONNECTOR, processor
from tiny import backbone_configs, tiny_images

DIRS3 = [(s, t) for s in ("text", "vision", "audio") for t in ("text", "vision", "audio") if s != t]


def test_cycle_block_and_adaptive_schedules():
    cycle = DirectionSchedule(DIRS3, mode="cycle")
    assert [cycle.direction(i) for i in range(7)] == DIRS3 + DIRS3[:1]  # every ordered pair, then again
    block = DirectionSchedule(DIRS3[:2], mode="block", steps_per_direction=3)
    assert [block.direction(i)[0] for i in range(8)] == ["text"] * 6 + ["text"] * 2
    assert [block.direction(i) for i in range(8)] == [DIRS3[0]] * 3 + [DIRS3[1]] * 3 + [DIRS3[0]] * 2
    adaptive = DirectionSchedule(DIRS3[:2], mode="adaptive", seed=1)
    first = [adaptive.direction(i) for i in range(50)]
    assert first == [adaptive.direction(i) for i in range(50)]  # a pure function of the step
    adaptive.update_from_recall({DIRS3[0]: 0.9, DIRS3[1]: 0.1})  # the weak direction gets trained more
    counts = [adaptive.direction(i) for i in range(400)].count(DIRS3[1])
    assert adaptive.probabilities[1] > 0.99 and counts > 390
    with pytest.raises(ValueError, match="schedule mode"):
        DirectionSchedule(DIRS3, mode="random")


def toy_features(n=96, seed=0):
    # Two "modalities" that share a latent: the connector must learn to align them.
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=g)
    text = latent @ torch.randn(8, 32, generator=g) + 0.1 * torch.randn(n, 32, generator=g)
    vision = torch.tanh(latent @ torch.randn(8, 32, generator=g)) + 0.1 * torch.randn(n, 32, generator=g)
    return datasets.Dataset.from_dict({"text_features": text.tolist(), "vision_features": vision.tolist()})


def toy_model(**kw):
    torch.manual_seed(0)
    configs = {k: v for k, v in backbone_configs().items() if k != "audio_config"}
    return AltMoEModel(AltMoEConfig(**configs, **(CONNECTOR | {"dropout": 0.0} | kw)))


def args(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=32, learning_rate=3e-3, max_steps=40, logging_steps=10,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
    )
    return TrainingArguments(**(defaults | kw))


def test_loss_falls_and_recall_rises_on_a_toy_problem(tmp_path):
    data = toy_features()
    model = toy_model()
    trainer = AltMoETrainer(model=model, args=args(tmp_path), train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    logged = [h for h in trainer.state.log_history if "loss/text_to_vision" in h]
    assert logged and "loss/vision_to_text" in logged[0]  # per-direction losses are logged separately
    assert logged[-1]["loss/text_to_vision"] < logged[0]["loss/text_to_vision"]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_text_to_vision_recall@5"] > before["eval_text_to_vision_recall@5"] + 0.2
    assert after["eval_vision_to_text_recall@5"] > before["eval_vision_to_text_recall@5"] + 0.2


def test_each_step_trains_the_scheduled_direction(tmp_path):
    model = toy_model()
    seen = []
    original = model.forward

    def spy(source, target, **kw):
        seen.append((source, target))
        return original(source, target, **kw)

    model.forward = spy
    trainer = AltMoETrainer(
        model=model, args=args(tmp_path, max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=8),
        train_dataset=toy_features(), schedule=DirectionSchedule(model.config.directions, mode="cycle"),
    )
    trainer.train()
    # two micro-batches per optimizer step, both on that step's direction
    assert seen == [d for d in model.config.directions for _ in range(2)] * 3


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    data = toy_features()
    common = dict(max_steps=8, save_strategy="steps", save_steps=4, per_device_train_batch_size=16)
    schedule = dict(mode="adaptive", seed=3)
    full_model = toy_model()
    full = AltMoETrainer(
        model=full_model, args=args(tmp_path / "full", **common), train_dataset=data,
        schedule=DirectionSchedule(full_model.config.directions, **schedule),
    )
    full.train()
    resumed_model = toy_model()
    resumed = AltMoETrainer(
        model=resumed_model, args=args(tmp_path / "resumed", **common), train_dataset=data,
        schedule=DirectionSchedule(resumed_model.config.directions, **schedule),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_linear_baseline_trains_with_the_same_trainer(tmp_path):
    data = toy_features()
    baseline = LinearAlignmentBaseline(toy_model())
    trainer = AltMoETrainer(model=baseline, args=args(tmp_path, max_steps=30), train_dataset=data, eval_dataset=data)
    trainer.train()
    assert trainer.evaluate()["eval_text_to_vision_recall@5"] > 0.5


def test_trainer_refuses_stale_feature_cache_when_backbones_train(tmp_path):
    model = toy_model()
    model.backbones["text"].requires_grad_(True)
    with pytest.raises(ValueError, match="pre-stored features would go stale"):
        AltMoETrainer(model=model, args=args(tmp_path), train_dataset=toy_features())


def test_feature_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    features = datasets.Features({"id": datasets.Value("int64"), "text": datasets.Value("string"),
                                  "image": datasets.Image()})
    raw = datasets.Dataset.from_dict(
        {"id": [0, 1, 2, 3], "text": ["red apple", "blue star", "sun", "moon"], "image": tiny_images(4)}, features
    )
    proc = processor()
    calls = []

    def run(model):
        original = model.get_backbone_features
        monkeypatch.setattr(model, "get_backbone_features", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
        return precompute_features(model, proc, raw, {"text": "text", "vision": "image"}, batch_size=2,
                                   cache_dir=tmp_path)

    first = run(toy_model())
    assert sorted(set(calls)) == ["text", "vision"] and len(calls) == 4
    assert first.column_names == ["id", "text", "text_features", "vision_features"]
    expected = toy_model().eval().get_backbone_features("text", **proc(text=["red apple", "blue star"]))
    torch.testing.assert_close(torch.tensor(first["text_features"][:2]), expected.detach())
    calls.clear()
    again = run(toy_model())
    assert calls == [] and again["vision_features"] == first["vision_features"]  # read from the cache
    run(toy_model(feature_layers=1))  # a change of pooling recomputes both modalities
    assert len(calls) == 4


def test_backbone_lora_trains_from_raw_inputs_only(tmp_path):
    from multimodal_moe.training.lora import RawPairCollator, add_backbone_lora

    model = toy_model()
    add_backbone_lora(model, "text", last_n_layers=1)
    trainable = [n for n, p in model.backbones.named_parameters() if p.requires_grad]
    # BERT text backbone: only the last layer's query/value projections carry (trainable) adapters
    assert trainable and all("lora_" in n and ".layer.1." in n for n in trainable)
    assert any(".query." in n for n in trainable) and any(".value." in n for n in trainable)
    with pytest.raises(ValueError, match="refuses the feature cache"):
        AltMoETrainer(model=model, args=args(tmp_path), train_dataset=toy_features())
    features = datasets.Features({"name": datasets.Value("string"), "image": datasets.Image()})
    raw = datasets.Dataset.from_dict({"name": ["red apple", "blue star", "sun", "moon"] * 4,
                                      "image": tiny_images(16)}, features)
    collator = RawPairCollator(processor(), {"text": "name", "vision": "image"})
    trainer = AltMoETrainer(model=model, args=args(tmp_path, max_steps=2, per_device_train_batch_size=8),
                            train_dataset=raw, data_collator=collator)
    before = {n: p.detach().clone() for n, p in model.backbones.named_parameters() if "lora_B" in n}
    trainer.train()
    changed = [n for n, p in model.backbones.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])]
    assert changed  # the adapters learned; with a feature cache they could not have


def test_two_process_accelerate_launch(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # `--cpu` alone starts ONE process unless an MPI launcher runs it; `--multi_gpu` goes through torchrun, and on a
    # machine without CUDA the Trainer falls back to CPU + gloo: two real DDP processes.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(tests / "scripts" / "train_toy_ddp.py"), str(tmp_path), str(tests)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # DDP kept the replicas in sync
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]
