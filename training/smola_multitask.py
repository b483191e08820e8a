# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Omni-SMoLA multi-task tuning and the offline SMoLA-vs-LoRA experiment.

    multimodal-moe train smola recipes/smola_multitask.yaml --output-dir runs/smola [--quick]

    from multimodal_moe.training.smola_multitask import run_multitask_experiment
    results = run_multitask_experiment("recipes/smola_multitask.yaml", "runs/smola", quick=True)

- `OmniSMoLATrainer`: a `transformers.Trainer` for mixed-task conversation data. Before every forward it computes the
  per-token modality of each input (text / image / video / audio placeholders of the Uni-MoE base) and hands it to the
  model's SMoLA layers (modality id = index of the token's group among the non-shared `expert_groups`); batches are
  grouped by modality and length (`ModalityLengthGroupedSampler`).
- `train_multitask`: one arm (SMoLA, LoRA, or a LoRA specialist) on a dense Uni-MoE base built from the zoo: the LLM
  and the encoders are frozen (optionally 4-bit NF4), the connectors and the adapters are trained.
- `run_multitask_experiment`: SMoLA vs one LoRA with the same number of trainable adapter parameters vs one LoRA
  specialist per task, each evaluated per task on the offline generative benchmarks; writes results.json,
  results.md and results.png.

Fairness rule (what the arms share): the same frozen base, the same freshly initialised connectors (the base folder's),
the same optimizer, learning rate, batch size and seed. The multi-task arms (SMoLA, LoRA) train `steps` optimizer
steps on the task mixture; the LoRA rank is the one whose adapter parameter count is closest to SMoLA's on the same
target linears (within half a rank step). A specialist trains on its task only for round(steps * n_task / n_mixture)
steps, so it sees as many examples of its task as a multi-task arm does (and the three specialists together cost the
same number of steps); each specialist has an adapter as large as the matched LoRA (so the three together have three
times the adapter parameters of the multi-task arms) and its own copy of the connectors.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments

from ..modeling.smola_layers import _smola_layers, smola_modality_ids
from .data.collator import ModalityLengthGroupedSampler, UniMoEDataCollator, conversation_lengths
from .uni_moe import use_bf16

METHODS = ("smola", "lora")
ARMS = ("smola", "lora", "specialists")
# task -> (offline benchmark, primary metric, higher is better)
TASK_BENCHMARKS = {
    "caption": ("emoji-caption", "rougeL", True),
    "classify": ("fashion-classify", "accuracy", True),
    "transcribe": ("speech-transcribe", "wer", False),
}
# Uni-MoE modalities (`MODALITIES`: text, image, video, audio) -> the SMoLA expert group their tokens use
UNI_MOE_MODALITY_GROUP = {"text": "text", "image": "vision", "video": "vision", "audio": "audio"}
CONNECTORS = ("vision_connector", "audio_connector")

DEFAULT_RECIPE = {
    "base": {"llm": "smollm2-135m", "vision": "dinov2-small", "audio": "whisper-tiny-en", "dir": None,
             "vision_connector_type": "mlp", "vision_merge_size": 4, "audio_connector_type": "mlp",
             "audio_merge_size": 10, "vision_num_query_tokens": 16, "audio_num_query_tokens": 16,
             "audio_window_seconds": 8, "qformer_num_heads": None},
    "tasks": {"caption": {"train_limit": 200, "eval_limit": 100},
              "classify": {"train_limit": 160, "eval_limit": 20},
              "transcribe": {"train_limit": 200, "eval_limit": 100}},
    "arms": list(ARMS),
    "train": {"steps": 60, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 5, "seed": 0,
              "quantize_4bit": False, "logging_steps": 10, "bf16": "auto", "prestore_encoder_states": True},
    "smola": {"num_experts": 2, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
              "expert_groups": ["text", "vision", "audio", "multimodal"], "shared_groups": ["multimodal"]},
    "lora": {"r": "match", "alpha_per_rank": 2.0, "dropout": 0.0},
    "eval": {"batch_size": 16, "max_new_tokens": None},
    "quick": {},
}


# -------------------------------------------------------------------------------------------------------------------
# modality ids
# -------------------------------------------------------------------------------------------------------------------
def smola_groups_of(model) -> list[str] | None:
    """The modality groups (non-shared `expert_groups`, in order) of the model's SMoLA adapter; None without one."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    if config is None or not hasattr(config, "expert_groups"):
        return None
    return [g for g in config.expert_groups if g not in config.shared_groups] or list(config.shared_groups[:1])


def smola_modality_ids_from_input_ids(config, input_ids: torch.Tensor, groups: list[str]) -> torch.Tensor:
    """Per-token SMoLA modality ids (index into `groups`) from a Uni-MoE model's input ids (placeholder tokens).

    `config`: the UniMoEConfig. Image and video tokens use the "vision" group, audio tokens "audio", the rest "text".
    """
    ids = torch.full_like(input_ids, groups.index("text") if "text" in groups else 0)
    for modality, token_id in config.placeholder_token_ids().items():
        group = UNI_MOE_MODALITY_GROUP[modality]
        if group not in groups:
            if bool((input_ids == token_id).any()):
                raise ValueError(f"{modality} tokens in the input but no {group!r} expert group in {groups}")
            continue
        ids = ids.masked_fill(input_ids == token_id, groups.index(group))
    return ids


smola_layer_ids = smola_modality_ids  # per-token ids on the SMoLA layers only, for a block


def _base_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


class OmniSMoLATrainer(Trainer):
    """`Trainer` for multi-task tuning on mixed-modality conversation rows (`training/data/tasks.py` layout).

    - modality ids: computed from `input_ids` for every batch and given to the model's SMoLA layers for the forward
      and the backward (a model without SMoLA layers is trained as usual). They are set on the tuner layers directly
      rather than passed as `model(..., modality_ids=...)`: peft-SMoLA's `set_forward_modality_ids` would also
      overwrite `UniMoEModel.modality_ids` (a method, which the Uni-MoE forward calls when labels are given).
    - sampler: `ModalityLengthGroupedSampler` over the data set's `modality` column (batches of one modality, similar
      lengths); `group_by_modality=False` gives Trainer's default random sampler.
    Use `TrainingArguments(remove_unused_columns=False)`: the collator reads the raw conversation columns.
    """

    def __init__(self, *args, group_by_modality: bool = True, **kwargs):
        self.group_by_modality = group_by_modality
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        data = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_modality and data is not None and "modality" in getattr(data, "column_names", []):
            return ModalityLengthGroupedSampler(data["modality"], conversation_lengths(data),
                                                batch_size=self.args.train_batch_size, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def modality_ids(self, model, input_ids: torch.Tensor) -> torch.Tensor | None:
        groups = smola_groups_of(model)
        if groups is None:
            return None
        return smola_modality_ids_from_input_ids(_base_config(model), input_ids, groups)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = self.modality_ids(self.model, inputs["input_ids"]) if "input_ids" in inputs else None
        for layer in _smola_layers(model):  # stays set through the backward (activation checkpointing recomputes)
            layer.modality_ids, layer._ids_from_forward = ids, False
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, *args, **kwargs):
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            _clear_ids(model)

    def prediction_step(self, model, inputs, *args, **kwargs):
        try:
            return super().prediction_step(model, inputs, *args, **kwargs)
        finally:
            _clear_ids(model)


def _clear_ids(model):
    for layer in _smola_layers(model):
        layer.modality_ids = None


class ModalityAwareGenerator:
    """Wraps a (peft) Uni-MoE model so that `generate(**inputs)` routes SMoLA layers with the prompt's modality ids
    (generated tokens count as text): what `run_benchmark` can call. Everything else is the wrapped model's."""

    def __init__(self, model):
        self.__dict__["_model"] = model

    def __getattr__(self, name):
        return getattr(self.__dict__["_model"], name)

    def eval(self):
        self._model.eval()
        return self

    def to(self, *args, **kwargs):
        if not getattr(self._model, "is_loaded_in_4bit", False):
            self._model.to(*args, **kwargs)
        return self

    def generate(self, *args, **kwargs):
        groups = smola_groups_of(self._model)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if groups is None or input_ids is None:
            return self._model.generate(*args, **kwargs)
        ids = smola_modality_ids_from_input_ids(_base_config(self._model), input_ids, groups)
        with smola_layer_ids(self._model, ids):
            return self._model.generate(*args, **kwargs)


# -------------------------------------------------------------------------------------------------------------------
# arms
# -------------------------------------------------------------------------------------------------------------------
def target_regex(names) -> str:
    """A peft `target_modules` regex for the decoder's linears named `names` (not the encoders' q_proj / v_proj)."""
    names = [names] if isinstance(names, str) else list(names)
    return r"model\.language_model\.layers\.\d+\.[^.]+\.(" + "|".join(re.escape(n) for n in names) + r")"


def _target_shapes(model, names) -> list[tuple[int, int]]:
    pattern = re.compile(target_regex(names))
    shapes = []
    for name, module in model.named_modules():
        if pattern.fullmatch(name) and isinstance(module, torch.nn.Linear):
            shapes.append((module.in_features, module.out_features))
    if not shapes:
        raise ValueError(f"no decoder linear named {names}")
    return shapes


def smola_adapter_params(shapes, num_experts: int, r: int, num_groups: int) -> int:
    """Router (E x in) + A (E r x in) + B (out x E r) per target linear, E = groups * experts per group."""
    total = num_groups * num_experts
    return sum(total * i + total * r * (i + o) for i, o in shapes)


def lora_adapter_params(shapes, r: int) -> int:
    return sum(r * (i + o) for i, o in shapes)


def matched_lora_rank(shapes, smola: dict) -> int:
    """The LoRA rank whose adapter parameter count on the same linears is closest to SMoLA's."""
    target = smola_adapter_params(shapes, smola["num_experts"], smola["r"], len(smola["expert_groups"]))
    return max(1, round(target / lora_adapter_params(shapes, 1)))


def _load_base(base_dir, quantize_4bit: bool):
    from ..modeling import UniMoEConfig, UniMoEForConditionalGeneration, UniMoEProcessor

    processor = UniMoEProcessor.from_pretrained(base_dir)
    if quantize_4bit:
        from peft import prepare_model_for_kbit_training

        from .uni_moe_peft import quantization_config_4bit

        config = UniMoEConfig.from_pretrained(base_dir)
        model = UniMoEForConditionalGeneration.from_pretrained(
            base_dir, quantization_config=quantization_config_4bit(config), dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = UniMoEForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    model.requires_grad_(False)
    return model, processor


def add_adapter(model, method: str, smola: dict | None = None, lora: dict | None = None,
                train_connectors: bool = True):
    """`get_peft_model` with SMoLA or LoRA on the decoder linears `smola["target_modules"]`, connectors trainable
    unless `train_connectors=False` (a base whose connectors are already aligned, e.g. a Uni-MoE stage-1 model).

    Returns (peft model, info) with info = adapter / connector / trainable parameter counts and the LoRA rank.
    """
    from peft import LoraConfig, get_peft_model

    from . import smola_peft  # noqa: F401  (registers the method)

    smola = {**DEFAULT_RECIPE["smola"], **(smola or {})}
    lora = {**DEFAULT_RECIPE["lora"], **(lora or {})}
    targets = target_regex(smola["target_modules"])
    shapes = _target_shapes(model, smola["target_modules"])
    info = {"method": method, "target_linears": len(shapes)}
    if method == "smola":
        config = smola_peft.SMoLAConfig(
            num_experts=smola["num_experts"], r=smola["r"], alpha=smola["alpha"], dropout=smola["dropout"],
            target_modules=targets, expert_groups=list(smola["expert_groups"]),
            shared_groups=list(smola["shared_groups"]))
        info.update(num_experts=smola["num_experts"], r=smola["r"], expert_groups=list(smola["expert_groups"]))
    elif method == "lora":
        r = lora["r"]
        if r in (None, "match"):
            r = matched_lora_rank(shapes, smola)
        alpha = lora.get("alpha") or lora["alpha_per_rank"] * r
        config = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=lora["dropout"], target_modules=targets,
                            bias="none")
        info.update(r=int(r), alpha=alpha)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    peft_model = get_peft_model(model, config)
    base = peft_model.get_base_model()
    for name in CONNECTORS if train_connectors else ():
        connector = getattr(base.model, name, None)
        if connector is not None:
            connector.requires_grad_(True)
    adapter = sum(p.numel() for n, p in peft_model.named_parameters()
                  if p.requires_grad and (".smola_" in n or ".lora_" in n))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    info.update(adapter_params=adapter, connector_params=trainable - adapter, trainable_params=trainable)
    return peft_model, info


def trainable_parameter_names(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def task_train_data(task: str, limit: int | None, *, progress: bool = False):
    """A task's training conversations, disjoint from what its offline benchmark evaluates.

    caption / transcribe: the first `limit` rows of the *full* emoji train split (the benchmarks evaluate the first
    rows of the full held-out split; `build_task_dataset(task, "train", limit=...)` would split only the first `limit`
    glyphs and train on glyphs the full split holds out). classify: the first `limit` Fashion-MNIST train images.
    """
    import datasets

    from .data.tasks import FEATURES, build_task_dataset, conversation

    if task not in ("caption", "transcribe"):
        return build_task_dataset(task, "train", limit=limit, progress=progress)
    from .data.emoji import build_emoji_dataset, train_heldout_split
    from .data.speech import synthesize, wav_bytes

    emoji = train_heldout_split(build_emoji_dataset(progress=progress), heldout_fraction=0.2, seed=0)["train"]
    emoji = emoji.select(range(min(limit, len(emoji)))) if limit else emoji
    if task == "caption":
        rows = [conversation(task, name, images=[image]) for image, name in zip(emoji["image"], emoji["name"])]
    else:
        names = emoji["name"]
        rows = [conversation(task, name, audio=[wav_bytes(clip)])
                for name, clip in zip(names, synthesize(names, progress=progress))]
    return datasets.Dataset.from_list(rows, features=FEATURES)


def task_mixture(tasks: dict, *, seed: int = 0, progress: bool = False, map_part=None):
    """`task_train_data` of every task ({task: limit}), concatenated and shuffled; `map_part(dataset)` is applied to
    each task's part first (e.g. `prestore_encoder_states`)."""
    import datasets

    parts = [task_train_data(t, limit, progress=progress) for t, limit in tasks.items()]
    if map_part is not None:
        parts = [map_part(part) for part in parts]
    return datasets.concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()


def train_multitask(base_dir, method: str, tasks, output_dir, *, train_data=None, steps: int = 60,
                    batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0,
                    seed: int = 0, quantize_4bit: bool = False, smola: dict | None = None, lora: dict | None = None,
                    logging_steps: int = 10, progress: bool = True, save: bool = False,
                    train_connectors: bool = True, bf16: bool = False):
    """Trains one arm on the mixture of `tasks` and returns (model, processor, info).

    base_dir: a dense Uni-MoE folder (`build_uni_moe(..., moe_layers=[])`). method: "smola" or "lora".
    tasks: {task: train limit} (see `task_train_data`) or a list of tasks; ignored when `train_data` (conversation rows,
    e.g. one task's subset of a mixture) is given. The LLM and encoders stay frozen (4-bit NF4 with
    `quantize_4bit`); the adapter and the connectors train. `save`: adapter (`save_pretrained`) and the trained
    connectors (`connectors.safetensors`) into output_dir. info: parameter counts, steps, train seconds, losses.
    """
    torch.manual_seed(seed)
    if train_data is None:
        tasks = {t: None for t in tasks} if isinstance(tasks, (list, tuple)) else dict(tasks)
        train_data = task_mixture(tasks, seed=seed)
    model, processor = _load_base(base_dir, quantize_4bit)
    model, info = add_adapter(model, method, smola=smola, lora=lora, train_connectors=train_connectors)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=int(steps), per_device_train_batch_size=int(batch_size),
        learning_rate=float(lr), weight_decay=float(weight_decay), warmup_steps=int(warmup_steps),
        lr_scheduler_type="linear", logging_steps=max(1, int(logging_steps)), save_strategy="no", report_to=[],
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=False, seed=seed,
        disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(), logging_strategy="steps", bf16=bf16,
    )
    trainer = OmniSMoLATrainer(model=model, args=args, train_dataset=train_data,
                               data_collator=UniMoEDataCollator(processor))
    started = time.time()
    result = trainer.train()
    info.update(steps=int(steps), examples=len(train_data), train_seconds=round(time.time() - started, 1),
                train_loss=float(result.training_loss),
                losses=[round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h],
                quantize_4bit=bool(quantize_4bit))
    if save:
        from safetensors.torch import save_file

        model.save_pretrained(output_dir)
        base = model.get_base_model()
        tensors = {f"model.{name}.{k}": v.detach().cpu().contiguous() for name in CONNECTORS
                   if getattr(base.model, name, None) is not None
                   for k, v in getattr(base.model, name).state_dict().items()}
        save_file(tensors, str(Path(output_dir) / "connectors.safetensors"))
    model.eval()
    return model, processor, info


# -------------------------------------------------------------------------------------------------------------------
# the experiment
# -------------------------------------------------------------------------------------------------------------------
def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(recipe, quick: bool = False) -> dict:
    """A recipe dict or YAML path merged over `DEFAULT_RECIPE`; with `quick`, its `quick:` section on top."""
    if isinstance(recipe, (str, os.PathLike)):
        import yaml

        recipe = yaml.safe_load(Path(recipe).read_text()) or {}
    recipe = _merge(DEFAULT_RECIPE, recipe or {})
    if quick:
        recipe = _merge(recipe, recipe.get("quick") or {})
    unknown = [a for a in recipe["arms"] if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; available: {ARMS}")
    unknown = [t for t in recipe["tasks"] if t not in TASK_BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; available: {list(TASK_BENCHMARKS)}")
    return recipe


def build_base(recipe: dict, output_dir) -> str:
    """The dense Uni-MoE base of the experiment (reused when `base.dir` or output_dir/base already holds one)."""
    from .uni_moe_init import build_uni_moe

    base = recipe["base"]
    path = Path(base.get("dir") or Path(output_dir) / "base")
    if (path / "config.json").is_file() and (path / "processor_config.json").is_file():
        return str(path)
    extra = {"qformer_num_heads": base["qformer_num_heads"]} if base.get("qformer_num_heads") else {}
    for modality in ("vision", "audio"):
        kind = base.get(f"{modality}_connector_type", "qformer")
        extra[f"{modality}_connector_type"] = kind
        if kind == "qformer":
            extra[f"{modality}_num_query_tokens"] = base[f"{modality}_num_query_tokens"]
        else:
            extra[f"{modality}_merge_size"] = base.get(f"{modality}_merge_size", 1)
    torch.manual_seed(recipe["train"].get("seed", 0))
    build_uni_moe(base["llm"], base.get("vision"), base.get("audio"), output_dir=str(path), moe_layers=[],
                  audio_window_seconds=base.get("audio_window_seconds"), chat_template="chatml", **extra)
    return str(path)


def evaluate_arm(model, processor, task: str, data, *, batch_size: int = 16, max_new_tokens=None,
                 output_dir=None) -> dict:
    """`run_benchmark` of the task's offline benchmark on a (peft) model, SMoLA modality ids given during generate."""
    from ..eval.benchmarks import run_benchmark

    bench, primary, higher = TASK_BENCHMARKS[task]
    result = run_benchmark(ModalityAwareGenerator(model), bench, processor=processor, data=data,
                           batch_size=batch_size, max_new_tokens=max_new_tokens, output_dir=output_dir)
    metrics = result["metrics"]["all"]
    return {"benchmark": bench, "metric": primary, "higher_is_better": higher, "value": metrics.get(primary),
            "metrics": metrics, "examples": result["dataset"]["examples"], "seconds": result["seconds"],
            "samples": [{k: r[k] for k in ("prediction", "references")} for r in result["predictions"][:5]]}


def run_multitask_experiment(recipe, output_dir, quick: bool = False, progress: bool = True) -> dict:
    """Trains and evaluates every arm of the recipe; writes results.json, results.md and results.png to
    output_dir (each atomically) and returns the results dict."""
    from ..eval.benchmarks import BENCHMARKS

    started = time.time()
    recipe = load_recipe(recipe, quick=quick)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, tasks = recipe["train"], recipe["tasks"]
    seed = train.get("seed", 0)

    stages = ["base + data"] + [a for a in recipe["arms"] if a != "specialists"] + \
        ([f"specialist:{t}" for t in tasks] if "specialists" in recipe["arms"] else [])
    bar = tqdm(total=len(stages), desc="smola experiment", disable=not progress)
    bar.set_postfix_str("building the base and the data")
    base_dir = build_base(recipe, out)
    bf16 = use_bf16(train.get("bf16", "auto"))
    map_part = None
    if train.get("prestore_encoder_states", True):  # the frozen encoders run once, not in every arm's every step
        from .encoder_states import as_training_format, prestore_encoder_states

        encoders, processor = _load_base(base_dir, False)
        dtype = torch.bfloat16 if bf16 else None

        def map_part(part):
            return prestore_encoder_states(encoders, processor, part, autocast_dtype=dtype,
                                           cache_dir=recipe.get("cache_dir"))

    mixture = task_mixture({t: spec.get("train_limit") for t, spec in tasks.items()}, seed=seed, map_part=map_part)
    if map_part is not None:
        mixture = as_training_format(mixture)
        del encoders
    eval_data = {t: BENCHMARKS[TASK_BENCHMARKS[t][0]].load(spec.get("eval_limit")) for t, spec in tasks.items()}
    bar.update(1)
    counts = {t: sum(1 for x in mixture["task"] if x == t) for t in tasks}
    # guard against train/eval leakage: answers of held-out rows that also are training answers of the same task
    train_answers = {t: set() for t in tasks}
    for task, msgs in zip(mixture["task"], mixture["messages"]):
        train_answers[task].add(msgs[-1]["content"])
    overlap = {t: sum(1 for a in eval_data[t]["answer"] if a in train_answers[t]) for t in tasks
               if t in ("caption", "transcribe")}  # classify's answers are its 10 class names, shared by design

    common = dict(batch_size=train["batch_size"], lr=train["lr"], weight_decay=train.get("weight_decay", 0.0),
                  warmup_steps=train.get("warmup_steps", 0), seed=seed, quantize_4bit=train.get("quantize_4bit", False),
                  smola=recipe["smola"], lora=recipe["lora"], logging_steps=train.get("logging_steps", 10),
                  progress=progress, train_connectors=train.get("connectors", True),
                  bf16=bf16)
    ev = dict(batch_size=recipe["eval"]["batch_size"], max_new_tokens=recipe["eval"].get("max_new_tokens"))
    arms = {}
    for arm in recipe["arms"]:
        if arm == "specialists":
            continue
        bar.set_postfix_str(f"training {arm}")
        model, processor, info = train_multitask(base_dir, arm, list(tasks), out / "runs" / arm, train_data=mixture,
                                                 steps=train["steps"], **common)
        bar.set_postfix_str(f"evaluating {arm}")
        info["tasks"] = {t: evaluate_arm(model, processor, t, eval_data[t], output_dir=out / "eval" / arm / t, **ev)
                         for t in tasks}
        arms[arm] = info
        del model
        bar.update(1)
    if "specialists" in recipe["arms"]:
        spec = {"method": "lora", "members": {}, "tasks": {}}
        for t in tasks:
            steps = max(1, round(train["steps"] * counts[t] / len(mixture)))
            bar.set_postfix_str(f"training the {t} specialist ({steps} steps)")
            subset = mixture.filter(lambda x, t=t: x == t, input_columns="task")
            model, processor, info = train_multitask(base_dir, "lora", [t], out / "runs" / f"specialist-{t}",
                                                     train_data=subset, steps=steps, **common)
            bar.set_postfix_str(f"evaluating the {t} specialist")
            spec["tasks"][t] = evaluate_arm(model, processor, t, eval_data[t],
                                            output_dir=out / "eval" / "specialists" / t, **ev)
            spec["members"][t] = info
            del model
            bar.update(1)
        members = spec["members"].values()
        for key in ("adapter_params", "connector_params", "trainable_params", "steps"):
            spec[key] = sum(m[key] for m in members)
        spec["train_seconds"] = round(sum(m["train_seconds"] for m in members), 1)
        spec["r"] = next(iter(members))["r"]
        arms["specialists"] = spec
    bar.set_postfix_str("writing results")
    bar.close()

    results = {
        "experiment": "omni-smola-multitask",
        "quick": bool(quick),
        "recipe": recipe,
        "base_dir": base_dir,
        "train_examples": counts,
        "eval_examples": {t: len(d) for t, d in eval_data.items()},
        "eval_answers_seen_in_training": overlap,
        "fairness": FAIRNESS_RULE if train.get("connectors", True) else FAIRNESS_RULE.replace(
            "same initial connectors (trained in every arm)", "same aligned connectors (frozen in every arm)"),
        "arms": arms,
        "wall_seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}, "
                   f"{'cuda' if torch.cuda.is_available() else 'cpu'} ({os.cpu_count()} cpus)",
    }
    write_results(results, out)
    return results


FAIRNESS_RULE = (
    "Same frozen base, same initial connectors (trained in every arm), same optimizer / lr / batch size / seed. "
    "SMoLA and LoRA train the same number of steps on the task mixture; LoRA's rank makes its adapter parameter "
    "count the closest to SMoLA's on the same target linears. Each LoRA specialist trains on its task only for "
    "round(steps * n_task / n_mixture) steps (as many examples of its task as a multi-task arm sees; the three "
    "together take the multi-task step budget) with an adapter of the matched LoRA's size."
)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(value, metric=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def markdown_table(results: dict) -> str:
    tasks = list(results["recipe"]["tasks"])
    head = [f"{t} {TASK_BENCHMARKS[t][1]} {'↑' if TASK_BENCHMARKS[t][2] else '↓'}" for t in tasks]
    lines = ["| arm | " + " | ".join(head) + " | adapter params | trainable params | steps | train time (s) |",
             "|---" * (len(head) + 5) + "|"]
    for arm, info in results["arms"].items():
        values = [_fmt(info["tasks"][t]["value"]) if t in info["tasks"] else "n/a" for t in tasks]
        name = arm + (f" (r={info['r']})" if "r" in info and arm != "smola" else "")
        if arm == "smola":
            name += f" ({info['num_experts']} experts/group, r={info['r']})"
        lines.append(f"| {name} | " + " | ".join(values) +
                     f" | {info['adapter_params']:,} | {info['trainable_params']:,} | {info['steps']} | "
                     f"{info['train_seconds']:.0f} |")
    examples = ", ".join(f"{t}: {n}" for t, n in results["train_examples"].items())
    evals = ", ".join(f"{t}: {n}" for t, n in results["eval_examples"].items())
    return "\n".join([
        f"## Omni-SMoLA multi-task experiment{' (quick)' if results['quick'] else ''}", "",
        *lines, "",
        f"Training examples: {examples}. Held-out examples: {evals} (held-out emoji names also trained on: "
        f"{', '.join(f'{t}: {n}' for t, n in results.get('eval_answers_seen_in_training', {}).items())}). "
        f"Trainable params = adapter + connectors (specialists: the sum over the {len(tasks)} specialists).", "",
        f"Fairness: {results['fairness']}", "",
        f"Wall time {results['wall_seconds']:.0f} s on {results['machine']}.", "",
    ])


def plot_results(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["recipe"]["tasks"])
    arms = list(results["arms"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        values = [(results["arms"][a]["tasks"].get(task) or {}).get("value") for a in arms]
        ax.bar(range(len(arms)), [v if v is not None else 0.0 for v in values], color=["C0", "C1", "C2", "C3"][
            :len(arms)])
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        _, metric, higher = TASK_BENCHMARKS[task]
        ax.set_title(f"{task}: {metric} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def write_results(results: dict, output_dir) -> None:
    out = Path(output_dir)
    _atomic_write(out / "results.json", lambda p: Path(p).write_text(json.dumps(results, indent=2, default=str)))
    _atomic_write(out / "results.md", lambda p: Path(p).write_text(markdown_table(results)))
    _atomic_write(out / "results.png", lambda p: plot_results(results, p))


def main(recipe_path, output_dir, quick: bool = False) -> dict:
    """CLI entry: `multimodal-moe train smola RECIPE --output-dir DIR [--quick]`; prints the results table."""
    results = run_multitask_experiment(recipe_path, output_dir, quick=quick)
    print(markdown_table(results))
    print(f"results: {Path(output_dir) / 'results.json'}, {Path(output_dir) / 'results.md'}, "
          f"{Path(output_dir) / 'results.png'}")
    return results


__all__ = ["DEFAULT_RECIPE", "FAIRNESS_RULE", "ModalityAwareGenerator", "OmniSMoLATrainer", "TASK_BENCHMARKS",
           "add_adapter", "build_base", "evaluate_arm", "load_recipe", "lora_adapter_params", "main",
           "markdown_table", "matched_lora_rank", "run_multitask_experiment", "smola_adapter_params",
           "smola_layer_ids", "smola_modality_ids_from_input_ids", "target_regex", "task_mixture", "task_train_data", "train_multitask",
           "trainable_parameter_names", "write_results"]
