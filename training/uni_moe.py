"""Uni-MoE progressive training: one recipe, three stages, one command.

    multimodal-moe train uni-moe recipes/uni_moe_offline.yaml --output-dir runs/uni-moe [--quick]

1. align     only the connectors train (captioning / transcription data); LLM and encoders frozen. The model is the
             dense multimodal LLM (`moe_layers=[]`).
2. experts   one dense FFN per modality / task trains on that modality's data, attention and everything else frozen
             (or LoRA on the FFNs over a 4-bit LLM, merged into full-precision FFNs on export). Each expert is saved
             under `stage2/experts/<name>/` with an `expert.json` saying which modality and tasks made it.
3. moe       the experts become the MoE layers (plus copies of the base FFN where the recipe says `base`); router and
             connectors train fully, LoRA (r=8, alpha 16, dropout 0.05 by default) on every LLM linear and on the 3D
             experts, never on the router; mixed data. Optional 4-bit base. The LoRA is merged into the final model.

Every stage is a `Trainer` run (`UniMoETrainer`) with checkpoints; `pipeline.json` in the output folder records the
finished stages, so an interrupted run started again resumes at the right stage and step. Artifacts are written to a
temporary folder and renamed, so a half-written stage never looks finished. Under `accelerate launch` the stages
train with DDP; building, exporting and evaluation run on the main process while the others wait.

After stage 1 and stage 3 the recipe's offline benchmarks (`eval/benchmarks.py`) score the model; `results.json` and
`results.md` compare them. Routing statistics and heatmaps (`routing/`) are written for the stage-3 model at
assembly and after tuning (stages 1-2 are dense: no router).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..modeling import UniMoEConfig, UniMoEForConditionalGeneration, UniMoEProcessor
from .data.collator import ModalityLengthGroupedSampler, UniMoEDataCollator, conversation_lengths

logger = logging.getLogger(__name__)
STAGES = ("stage1", "stage2", "stage3")
_DENSE_FFN = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------------------------------
def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_recipe(recipe, quick: bool = False) -> dict:
    """A recipe file (YAML) or dict; with `quick`, its `quick:` section is merged over it."""
    if not isinstance(recipe, dict):
        import yaml

        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} not found")
        recipe = yaml.safe_load(path.read_text())
    recipe = copy.deepcopy(recipe)
    quick_overrides = recipe.pop("quick", None) or {}
    if quick:
        recipe = _merge(recipe, quick_overrides)
    missing = [k for k in ("model", "stage1", "stage2", "stage3") if k not in recipe]
    if missing:
        raise ValueError(f"the recipe lacks the section(s) {missing}")
    names = [e["name"] for e in recipe["stage2"]["experts"]]
    if len(set(names)) != len(names) or "base" in names:
        raise ValueError(f"stage2 expert names must be unique and not 'base', got {names}")
    for source in recipe["stage3"]["experts"]:
        if source != "base" and source not in names:
            raise ValueError(f"stage3 expert source {source!r} is neither 'base' nor a stage2 expert ({names})")
    return recipe


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------
class UniMoETrainer(Trainer):
    """`Trainer` for conversation data: batches grouped by modality and length, and the LM loss and the MoE
    auxiliary loss logged apart (`lm_loss`, `aux_loss`)."""

    def __init__(self, *args, group_by_modality: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_by_modality = group_by_modality
        self._parts = {"lm_loss": [], "aux_loss": []}

    def _get_train_sampler(self, train_dataset=None):
        data = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_modality or "modality" not in data.column_names:
            return super()._get_train_sampler(train_dataset)
        # Groups of one global batch (all processes): accelerate hands consecutive per-device slices of a group to
        # the processes, so one and two processes see the same examples at each step.
        group = self.args.per_device_train_batch_size * self.args.world_size
        return ModalityLengthGroupedSampler(data["modality"], conversation_lengths(data), group, seed=self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        for name in self._parts:
            value = getattr(outputs, name, None)
            if value is not None:
                self._parts[name].append(value.detach().float().item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        for name, values in self._parts.items():
            if values and "loss" in logs:
                logs[name] = round(sum(values) / len(values), 6)
                values.clear()
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# What each stage trains
# ---------------------------------------------------------------------------------------------------------------------
def prepare_stage1(model: UniMoEForConditionalGeneration) -> UniMoEForConditionalGeneration:
    """Stage 1: only the connectors train."""
    model.requires_grad_(False)
    for connector in (model.model.vision_connector, model.model.audio_connector):
        if connector is not None:
            connector.requires_grad_(True)
    return model


def prepare_stage2(model: UniMoEForConditionalGeneration) -> UniMoEForConditionalGeneration:
    """Stage 2 (full precision): only the dense FFNs of the LLM train (attention, norms, embeddings frozen)."""
    if model.config.moe_layer_indices:
        raise ValueError("stage 2 trains the dense FFNs of the stage-1 model; this model already has MoE layers")
    model.requires_grad_(False)
    for layer in model.model.language_model.layers:
        layer.mlp.requires_grad_(True)
    return model


def prepare_stage3(model: UniMoEForConditionalGeneration, lora: dict):
    """Stage 3: LoRA on every LLM linear and the 3D experts, router and connectors fully trained."""
    from .uni_moe_peft import add_uni_moe_lora

    return add_uni_moe_lora(model, r=lora.get("r", 8), lora_alpha=lora.get("alpha", 16),
                            lora_dropout=lora.get("dropout", 0.05), targets="all",
                            trainable=("router", "connectors"))


def build_moe_from_experts(stage1_dir, expert_dirs: list, *, num_experts_per_tok: int = 2, noise_std: float = 0.0,
                           **config_kwargs) -> UniMoEForConditionalGeneration:
    """The stage-3 model: the stage-1 model with its FFNs replaced by MoE layers whose expert i is the dense FFN in
    `expert_dirs[i]` (a stage-2 expert folder, or the stage-1 folder itself for a copy of the base FFN)."""
    dense = UniMoEForConditionalGeneration.from_pretrained(stage1_dir)
    config_dict = dense.config.to_dict()
    for key in ("architectures", "auto_map", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        config_dict.pop(key, None)
    config_dict.update(moe_layers=config_kwargs.pop("moe_layers", "all"), num_experts=len(expert_dirs),
                       num_experts_per_tok=num_experts_per_tok, **config_kwargs)
    config = UniMoEConfig(**config_dict)
    model = UniMoEForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    moe = set(config.moe_layer_indices)
    bad = [k for k in missing if ".mlp.gate." not in k and ".mlp.experts." not in k]
    bad += [k for k in unexpected if not any(f"layers.{i}.mlp." in k for i in moe)]
    if bad:
        raise RuntimeError(f"stage-1 weights don't fit the MoE model: {bad[:5]}")
    model.init_experts_from([dense if str(d) == str(stage1_dir) else d for d in expert_dirs], noise_std=noise_std)
    model.generation_config = dense.generation_config
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: atomic folders, trainer runs, exports
# ---------------------------------------------------------------------------------------------------------------------
def _atomic_dir(final: Path, write) -> Path:
    """Calls write(tmp_folder), then renames it to `final` (replacing an older one): never a half-written folder."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def use_bf16(setting) -> bool:
    """The recipe's `bf16`: true / false, or "auto": bfloat16 autocast on a GPU that supports it, and on a CPU with
    AMX tiles (Sapphire Rapids / Zen 4 and newer: bfloat16 matmuls ~3x float32 there; slower than float32 without)."""
    if setting != "auto":
        return bool(setting)
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # no public query in torch 2.13
    return bool(amx and amx())


def _training_args(stage: dict, output_dir: Path, seed: int, bf16: bool = False) -> TrainingArguments:
    gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=int(stage["max_steps"]),
        per_device_train_batch_size=int(stage.get("batch_size", 8)),
        gradient_accumulation_steps=int(stage.get("gradient_accumulation_steps", 1)),
        learning_rate=float(stage["learning_rate"]),
        lr_scheduler_type=stage.get("lr_scheduler_type", "cosine"),
        warmup_steps=int(stage.get("warmup_steps", 0)),
        weight_decay=float(stage.get("weight_decay", 0.0)),
        max_grad_norm=float(stage.get("max_grad_norm", 1.0)),
        logging_steps=int(stage.get("logging_steps", 10)),
        save_strategy="steps",
        save_steps=int(stage.get("save_steps", 50)),
        save_total_limit=1,
        remove_unused_columns=False,  # the collator reads messages / images / audio
        dataloader_num_workers=0,
        report_to=[],
        seed=seed,
        bf16=bf16,
        use_cpu=not gpu,
        disable_tqdm=False,
        ddp_find_unused_parameters=True,  # a batch of one modality leaves the other connector unused
        deepspeed=stage.get("deepspeed"),  # e.g. recipes/deepspeed/zero3.json (GPU users; needs deepspeed)
    )


def _train(model, processor, data, stage: dict, output_dir: Path, seed: int, callbacks=None,
           bf16: bool = False) -> dict:
    """One Trainer run, resumed from the last checkpoint in output_dir/checkpoints if there is one."""
    checkpoints = output_dir / "checkpoints"
    if stage.get("deepspeed") and json.loads(Path(stage["deepspeed"]).read_text())["zero_optimization"]["stage"] == 3:
        from .distributed import zero3_leaf_modules

        zero3_leaf_modules(model)  # ZeRO-3 must gather a MoE block's experts whole: tokens pick experts at run time
    trainer = UniMoETrainer(model=model, args=_training_args(stage, checkpoints, seed, bf16), train_dataset=data,
                            data_collator=UniMoEDataCollator(processor), callbacks=callbacks)
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last:
        logger.info("resuming %s from %s", output_dir.name, last)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "train_loss": result.training_loss, "seconds": time.time() - started,
            "log": history, "resumed_from": last}


def _load(path, quantize_4bit: bool):
    if quantize_4bit:
        from .uni_moe_peft import load_uni_moe_4bit

        return load_uni_moe_4bit(path)
    return UniMoEForConditionalGeneration.from_pretrained(path, dtype=torch.float32)


@torch.no_grad()
def dense_ffn_state(model) -> dict[str, torch.Tensor]:
    """The LLM's dense FFN weights in full precision, LoRA deltas added and 4-bit weights dequantised (merging into a
    4-bit layer would re-quantise and lose the small deltas)."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in _DENSE_FFN or ".mlp." not in f".{name}":
            continue
        key = name[name.index("model.language_model."):] if "model.language_model." in name else name
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = _full_weight(base) + module.get_delta_weight(module.active_adapters[0]).float()
        elif isinstance(module, torch.nn.Linear) or hasattr(module, "weight"):
            weight = _full_weight(module)
        else:
            continue
        state[f"{key}.weight"] = weight.float().contiguous().cpu()
    return state


def _full_weight(linear) -> torch.Tensor:
    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.float()


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------------
class _State:
    """`pipeline.json`: the recipe and the finished units (stage1, stage2/<expert>, stage3, eval/...)."""

    def __init__(self, output_dir: Path, recipe: dict):
        self.path = output_dir / "pipeline.json"
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved["recipe"] != recipe:
                raise ValueError(f"{output_dir} holds a run of a different recipe; use a new --output-dir (or delete "
                                 "pipeline.json to start over)")
            self.done = saved["done"]
        else:
            self.done = {}
        self.recipe = recipe

    def finish(self, unit: str, info: dict):
        self.done[unit] = info
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"recipe": self.recipe, "done": self.done}, indent=2, default=str))
        os.replace(tmp, self.path)


def run_pipeline(recipe, output_dir, *, quick: bool = False, callbacks=None, progress: bool = True) -> dict:
    """Runs (or resumes) every stage of `recipe` into `output_dir`; returns the results dict (also results.json)."""
    from accelerate import PartialState

    from .data.tasks import build_mixture
    from .uni_moe_init import build_uni_moe

    dist = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True a CPU launch looks single-process
    recipe = load_recipe(recipe, quick=quick)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(recipe.get("seed", 0))
    bf16 = use_bf16(recipe.get("bf16", "auto"))  # "auto" kept the GPU default (bf16) of earlier versions
    state = _State(out, recipe) if dist.is_main_process else None
    dist.wait_for_everyone()
    if not dist.is_main_process:
        state = _State(out, recipe)

    def main_only(unit: str, work):
        """Runs `work()` once (main process), records it, and lets the others read the result."""
        nonlocal state
        if unit not in state.done:
            if dist.is_main_process:
                set_seed(seed)  # fresh connectors / routers start the same in every run of the recipe
                state.finish(unit, work() or {})
            dist.wait_for_everyone()
            state = _State(out, recipe)
        return state.done[unit]

    # -- stage 0: the dense multimodal model from pretrained parts -----------------------------------------------
    m = recipe["model"]
    base_dir = out / "stage0" / "model"
    main_only("stage0", lambda: _build_base(build_uni_moe, m, base_dir))
    processor = UniMoEProcessor.from_pretrained(base_dir)

    # -- stage 1: connectors ------------------------------------------------------------------------------------------
    s1 = recipe["stage1"]
    stage1_dir = out / "stage1" / "model"
    if "stage1" not in state.done:
        set_seed(seed)
        model = prepare_stage1(_load(base_dir, False))
        data = _stage_data(model, processor, s1["tasks"], recipe, dist, seed, progress, bf16)
        info = _train(model, processor, data, s1, out / "stage1", seed, callbacks, bf16)
        main_only("stage1", lambda: {**info, "path": str(_save_model(model, processor, stage1_dir))})
        del model

    # -- stage 2: one dense FFN expert per modality / task -----------------------------------------------------------
    s2 = recipe["stage2"]
    for expert in s2["experts"]:
        unit = f"stage2/{expert['name']}"
        if unit in state.done:
            continue
        expert_dir = out / "stage2" / "experts" / expert["name"]
        quantize = bool(s2.get("quantize_4bit", False))
        model = _load(stage1_dir, quantize)
        if quantize:
            from .uni_moe_peft import add_uni_moe_lora

            lora = s2.get("lora", {})
            model = add_uni_moe_lora(model, r=lora.get("r", 8), lora_alpha=lora.get("alpha", 16),
                                     lora_dropout=lora.get("dropout", 0.05), targets="ffn", trainable=())
        else:
            model = prepare_stage2(model)
        data = _stage_data(model, processor, expert["tasks"], recipe, dist, seed, progress, bf16)
        info = _train(model, processor, data, {**s2, **expert.get("overrides", {})}, out / "stage2" / expert["name"],
                      seed, callbacks, bf16)
        meta = {"name": expert["name"], "modality": expert.get("modality"), "tasks": expert["tasks"],
                "source": str(stage1_dir), "quantize_4bit": quantize, "steps": info["steps"]}
        main_only(unit, lambda: {**info, "path": str(_save_expert(model, meta, expert_dir))})
        del model

    # -- stage 3: assemble the MoE, LoRA + router + connectors on mixed data -----------------------------------------
    s3 = recipe["stage3"]
    init_dir, final_dir = out / "stage3" / "init", out / "stage3" / "model"
    sources = [str(stage1_dir) if src == "base" else str(out / "stage2" / "experts" / src) for src in s3["experts"]]
    main_only("stage3/init", lambda: {"path": str(_atomic_dir(init_dir, lambda tmp: _save_pair(
        build_moe_from_experts(stage1_dir, sources, num_experts_per_tok=s3.get("top_k", 2),
                               noise_std=s3.get("noise_std", 0.0), **s3.get("config", {})), processor, tmp))),
        "experts": s3["experts"]})
    eval_rows = build_mixture(recipe.get("routing", {}).get("tasks", s3["tasks"]), "heldout", seed=seed,
                              progress=progress)
    main_only("routing/stage3_init", lambda: _routing(init_dir, processor, eval_rows, recipe, out, "stage3_init"))
    if "stage3" not in state.done:
        set_seed(seed)
        model = _load(init_dir, bool(s3.get("quantize_4bit", False)))
        data = _stage_data(model, processor, s3["tasks"], recipe, dist, seed, progress, bf16)
        model = prepare_stage3(model, s3.get("lora", {}))
        info = _train(model, processor, data, s3, out / "stage3", seed, callbacks, bf16)
        main_only("stage3", lambda: {**info, "path": str(_export_stage3(model, init_dir, processor, final_dir,
                                                                        out / "stage3"))})
        del model
    main_only("routing/stage3_final", lambda: _routing(final_dir, processor, eval_rows, recipe, out, "stage3_final"))

    # -- evaluation: stage 1 vs the final model ----------------------------------------------------------------------
    ev = recipe.get("eval", {})
    for stage, path in (("stage1", stage1_dir), ("stage3", final_dir)):
        for bench in ev.get("benchmarks", []):
            main_only(f"eval/{stage}/{bench}", lambda: _evaluate(path, bench, ev, out / "eval" / stage / bench))
    results = main_only("results", lambda: _write_results(state, recipe, out))
    return results


def _stage_data(model, processor, tasks: dict, recipe: dict, dist, seed: int, progress: bool, bf16: bool):
    """A stage's training mixture; with `prestore_encoder_states` (default) each task's images / clips are replaced by
    the frozen encoders' outputs, computed once into a cache shared by every stage and later run (main process
    first, the others read the cache)."""
    from .data.tasks import build_mixture
    from .encoder_states import as_training_format, prestore_encoder_states

    map_part = None
    if recipe.get("prestore_encoder_states", True):
        dtype = torch.bfloat16 if bf16 else None

        def map_part(part):
            return prestore_encoder_states(model, processor, part, autocast_dtype=dtype,
                                           cache_dir=recipe.get("cache_dir"))

    with dist.main_process_first():
        data = build_mixture(tasks, "train", seed=seed, progress=progress, map_part=map_part)
    return as_training_format(data)


def _build_base(build_uni_moe, m: dict, base_dir: Path) -> dict:
    kwargs = {k: v for k, v in m.items() if k not in ("llm", "vision", "audio")}
    _atomic_dir(base_dir, lambda tmp: build_uni_moe(m["llm"], m.get("vision"), m.get("audio"), output_dir=str(tmp),
                                                    moe_layers=[], **kwargs))
    return {"path": str(base_dir)}


def _save_pair(model, processor, folder):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_model(model, processor, final: Path) -> Path:
    return _atomic_dir(final, lambda tmp: _save_pair(model, processor, tmp))


def _save_expert(model, meta: dict, final: Path) -> Path:
    from safetensors.torch import save_file

    def write(tmp):
        save_file(dense_ffn_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "expert.json").write_text(json.dumps(meta, indent=2))

    return _atomic_dir(final, write)


def _export_stage3(trained, init_dir: Path, processor, final: Path, stage_dir: Path) -> Path:
    """Saves the adapter (LoRA + router + connectors), then merges it into a full-precision copy of the assembled
    model: also right for a 4-bit run, whose own weights are quantised."""
    from peft import PeftModel

    from .uni_moe_peft import merge_lora

    adapter = _atomic_dir(stage_dir / "adapter", lambda tmp: trained.save_pretrained(tmp))
    base = UniMoEForConditionalGeneration.from_pretrained(init_dir, dtype=torch.float32)
    merged = merge_lora(PeftModel.from_pretrained(base, str(adapter)))
    return _save_model(merged, processor, final)


def _routing(model_dir: Path, processor, rows, recipe: dict, out: Path, name: str) -> dict:
    from .routing import save_routing_report

    limit = int(recipe.get("routing", {}).get("examples", 64))
    rows = rows.select(range(min(limit, len(rows))))
    model = UniMoEForConditionalGeneration.from_pretrained(model_dir).eval()
    collator = UniMoEDataCollator(processor)
    batches = [collator([rows[j] for j in range(i, min(i + 8, len(rows)))]) for i in range(0, len(rows), 8)]
    stats = save_routing_report(model, batches, out / "routing", name)
    return {"json": str(out / "routing" / f"{name}.json"), "tokens": stats.get("tokens")}


def _evaluate(model_dir: Path, bench: str, ev: dict, output_dir: Path) -> dict:
    from ..eval.benchmarks import run_benchmark

    results = run_benchmark(str(model_dir), bench, output_dir=output_dir, batch_size=int(ev.get("batch_size", 16)),
                            limit=ev.get("limits", {}).get(bench, ev.get("limit")),
                            max_new_tokens=ev.get("max_new_tokens"))
    # A model that ignores its media gives one answer to every input; the count makes that visible next to the score.
    distinct = len({r["prediction"] for r in results["predictions"]})
    return {"metrics": results["metrics"]["all"], "metric": results["metric"], "examples":
            results["dataset"]["examples"], "distinct_answers": distinct, "seconds": results["seconds"]}


LOWER_IS_BETTER = {"wer", "cer"}


def _write_results(state: _State, recipe: dict, out: Path) -> dict:
    done = state.done
    benchmarks = recipe.get("eval", {}).get("benchmarks", [])
    comparison = []
    for bench in benchmarks:
        s1, s3 = done[f"eval/stage1/{bench}"], done[f"eval/stage3/{bench}"]
        metric = s1["metric"]
        metric = metric if metric in s1["metrics"] else {"rouge": "rougeL"}.get(metric, metric)  # rouge reports rougeL
        a, b = s1["metrics"][metric], s3["metrics"][metric]
        better = b < a if metric in LOWER_IS_BETTER else b > a
        comparison.append({"benchmark": bench, "metric": metric, "stage1": a, "stage3": b, "stage3_better": better,
                           "examples": s1["examples"], "distinct_answers": [s1.get("distinct_answers"),
                                                                             s3.get("distinct_answers")]})
    results = {
        "recipe": recipe,
        "training": {unit: {k: v for k, v in info.items() if k in ("steps", "train_loss", "seconds")}
                     for unit, info in done.items() if unit.startswith("stage") and "steps" in info},
        "comparison": comparison,
        "evaluations": {unit: info for unit, info in done.items() if unit.startswith("eval/")},
        "routing": {unit: info for unit, info in done.items() if unit.startswith("routing/")},
        "final_model": done.get("stage3", {}).get("path"),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
    }
    lines = ["# Uni-MoE progressive training", "", "| benchmark | metric | stage 1 (connectors) | stage 3 (MoE + LoRA) |"
             " better after stage 3 | distinct answers (stage 1 / 3) |", "|---|---|---|---|---|---|"]
    for row in comparison:
        d1, d3 = row["distinct_answers"]
        lines.append(f"| {row['benchmark']} ({row['examples']} ex.) | {row['metric']} | {row['stage1']:.4f} | "
                     f"{row['stage3']:.4f} | {'yes' if row['stage3_better'] else 'no'} | {d1} / {d3} |")
    lines += ["", "| unit | steps | train loss | seconds |", "|---|---|---|---|"]
    for unit, info in results["training"].items():
        lines.append(f"| {unit} | {info['steps']} | {info['train_loss']:.4f} | {info['seconds']:.0f} |")
    for name, text in (("results.json", json.dumps(results, indent=2, default=str)),
                       ("results.md", "\n".join(lines) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return {"comparison": comparison, "final_model": results["final_model"]}


__all__ = ["UniMoETrainer", "build_moe_from_experts", "dense_ffn_state", "load_recipe", "prepare_stage1",
           "prepare_stage2", "prepare_stage3", "run_pipeline"]
