"""Alt-MoE training: multi-step sequential alternating unidirectional alignment with the `Trainer`.

Each optimizer step trains ONE direction (source -> target) of the shared connector; over the steps every ordered pair
of modalities is visited, which converges to bidirectional alignment (Alt-MoE, arXiv 2409.05929).

    schedule = DirectionSchedule(model.config.directions, mode="cycle")       # or "block" (k steps) / "adaptive"
    trainer = AltMoETrainer(model=model, args=TrainingArguments(...), train_dataset=features["train"],
                            eval_dataset=features["validation"], schedule=schedule)
    trainer.train()

The data sets hold pre-stored backbone features (`training.features.precompute_features`): one
`<modality>_features` column per modality, one row per paired sample.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from ..modeling.modeling_alt_moe import AltMoEOutput, alt_moe_loss
from .retrieval import retrieval_metrics

SCHEDULE_MODES = ("cycle", "block", "adaptive")


def direction_name(source: str, target: str) -> str:
    return f"{source}_to_{target}"


class DirectionSchedule(TrainerCallback, ExportableState):
    """Which direction each optimizer step trains; a pure function of the step (and the seed), so a resumed run
    trains exactly the directions an uninterrupted one would.

    - "cycle": switch every step (the official code).
    - "block": `steps_per_direction` steps on each direction in turn.
    - "adaptive": sample a direction each step with probabilities from the latest validation recall: weaker
      directions are trained more, p_d ∝ exp(-recall_d / adaptive_temperature). Uniform until the first evaluation.
      The probabilities are saved in checkpoints (an `ExportableState` callback), so resuming keeps them.
    """

    def __init__(self, directions, mode="cycle", steps_per_direction=1, adaptive_temperature=0.1, seed=0,
                 probabilities=None):
        if mode not in SCHEDULE_MODES:
            raise ValueError(f"schedule mode must be one of {SCHEDULE_MODES}, got {mode!r}")
        if steps_per_direction < 1:
            raise ValueError(f"steps_per_direction must be >= 1, got {steps_per_direction}")
        self.directions = [tuple(d) for d in directions]
        if len(self.directions) < 2:
            raise ValueError("an alternating schedule needs at least two directions")
        self.mode = mode
        self.steps_per_direction = 1 if mode == "cycle" else steps_per_direction
        self.adaptive_temperature = adaptive_temperature
        self.seed = seed
        self.probabilities = list(probabilities) if probabilities else [1 / len(self.directions)] * len(self.directions)

    def direction(self, step: int) -> tuple[str, str]:
        if self.mode != "adaptive":
            return self.directions[(step // self.steps_per_direction) % len(self.directions)]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        index = torch.multinomial(torch.tensor(self.probabilities), 1, generator=generator).item()
        return self.directions[index]

    def update_from_recall(self, recall: dict[tuple[str, str], float]):
        """Adaptive mode: re-weight directions by their validation recall (0..1)."""
        logits = torch.tensor([-recall.get(d, 0.0) / self.adaptive_temperature for d in self.directions])
        self.probabilities = logits.softmax(0).tolist()

    def state(self) -> dict:
        return {
            "args": {
                "directions": [list(d) for d in self.directions],
                "mode": self.mode,
                "steps_per_direction": self.steps_per_direction,
                "adaptive_temperature": self.adaptive_temperature,
                "seed": self.seed,
            },
            "attributes": {"probabilities": self.probabilities},
        }


class FeaturePairCollator:
    """Stacks pre-stored `<modality>_features` columns into float tensors (other columns are dropped)."""

    def __init__(self, modalities):
        self.columns = [f"{m}_features" for m in modalities]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        missing = [c for c in self.columns if c not in rows[0]]
        if missing:
            raise ValueError(f"feature rows lack {missing}; build them with training.features.precompute_features")
        return {c: torch.tensor([r[c] for r in rows], dtype=torch.float32) for c in self.columns}


class AltMoETrainer(Trainer):
    """`Trainer` whose every optimizer step trains one direction chosen by a `DirectionSchedule`.

    Logs each direction's loss terms separately (`loss/<src>_to_<tgt>` ...) and evaluates held-out retrieval
    (recall@1/5/10, median rank, MRR) for every direction; `eval_mean_recall@1` is there for early stopping.
    """

    def __init__(self, *args, schedule: DirectionSchedule | None = None, **kwargs):
        model = kwargs.get("model") or (args[0] if args else None)
        if schedule is None:
            schedule = DirectionSchedule(model.config.directions)
        kwargs.setdefault("data_collator", FeaturePairCollator(model.config.modalities))
        callbacks = list(kwargs.pop("callbacks", None) or []) + [schedule]
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.schedule = schedule
        self.args.remove_unused_columns = False  # our collator picks the columns
        if isinstance(self.data_collator, FeaturePairCollator):
            self._check_features_are_fresh(model)
        self._direction_logs = defaultdict(lambda: defaultdict(float))
        self._direction_counts = defaultdict(int)

    @staticmethod
    def _check_features_are_fresh(model):
        # Pre-stored features come from the frozen backbones; trainable backbone weights (LoRA) make them stale.
        backbones = getattr(model, "backbones", None)
        if backbones is not None and any(p.requires_grad for p in backbones.parameters()):
            raise ValueError(
                "the backbones have trainable parameters (LoRA?), so pre-stored features would go stale: this trainer "
                "refuses the feature cache. Train on raw inputs (data_collator=training.lora.RawPairCollator(...)), "
                "which runs the backbones every step, or freeze the backbones."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Every micro-batch of one optimizer step (gradient accumulation) trains the same direction.
        source, target = self.schedule.direction(self.state.global_step)
        outputs: AltMoEOutput = model(source, target, **inputs)
        if model.training:
            name = direction_name(source, target)
            for term in ("loss", "regression_loss", "contrastive_loss", "aux_loss"):
                value = getattr(outputs, term)
                if value is not None:
                    self._direction_logs[name][term] += value.detach().float().item()
            self._direction_counts[name] += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args, **kwargs):
        for name, terms in self._direction_logs.items():
            for term, total in terms.items():
                logs[f"{term}/{name}"] = round(total / self._direction_counts[name], 5)
        self._direction_logs.clear()
        self._direction_counts.clear()
        super().log(logs, *args, **kwargs)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Held-out retrieval for every direction: every query against every candidate of the evaluation set."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):  # several evaluation sets: the first one drives the adaptive schedule
            metrics = {}
            for i, (name, subset) in enumerate(dataset.items()):
                metrics |= self._evaluate_retrieval(subset, f"{metric_key_prefix}_{name}", adapt=i == 0)
            return metrics
        return self._evaluate_retrieval(dataset, metric_key_prefix, adapt=True)

    @torch.no_grad()
    def _evaluate_retrieval(self, dataset, metric_key_prefix, adapt):
        model = self.model
        was_training = model.training
        model.eval()
        features = self.data_collator([dataset[i] for i in range(len(dataset))])
        device = next(model.parameters()).device
        features = {k: v.to(device) for k, v in features.items()}
        metrics, recall = {}, {}
        losses = []
        for source, target in self.schedule.directions:
            out = model(source, target, **features)
            scores = out.query_embeds @ out.candidate_embeds.T  # (queries, candidates)
            result = retrieval_metrics(scores.cpu(), torch.arange(scores.shape[0]))
            name = direction_name(source, target)
            for key, value in result.items():
                metrics[f"{metric_key_prefix}_{name}_{key}"] = value
            if out.expert_usage is not None:  # the linear baseline has no experts
                metrics[f"{metric_key_prefix}_{name}_expert_usage"] = [round(u, 4) for u in out.expert_usage.tolist()]
            recall[(source, target)] = result["recall@1"]
            losses.append(out.loss.item())
        metrics[f"{metric_key_prefix}_loss"] = sum(losses) / len(losses)
        for k in (1, 5, 10):
            values = [metrics[f"{metric_key_prefix}_{direction_name(*d)}_recall@{k}"] for d in self.schedule.directions]
            metrics[f"{metric_key_prefix}_mean_recall@{k}"] = sum(values) / len(values)
        if adapt and self.schedule.mode == "adaptive":
            self.schedule.update_from_recall(recall)
        model.train(was_training)
        self.log({k: v for k, v in metrics.items() if not isinstance(v, list)})
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class KeepBestCallback(TrainerCallback):
    """Keeps an in-memory copy of the trainable weights at the best value of `metric` and restores it when training
    ends; stops after `patience` evaluations without improvement. The official code early-stops on validation recall
    because these connectors overfit within a few hundred steps. Unlike `load_best_model_at_end` it never writes the
    frozen backbones to disk."""

    def __init__(self, metric: str, patience: int | None = None):
        self.metric, self.patience = metric, patience
        self.best, self.best_step, self.best_state, self.bad_evals = -math.inf, 0, None, 0

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not metrics or self.metric not in metrics:
            return
        if metrics[self.metric] > self.best:
            self.best, self.best_step, self.bad_evals = metrics[self.metric], state.global_step, 0
            self.best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        else:
            self.bad_evals += 1
            if self.patience is not None and self.bad_evals >= self.patience:
                control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.best_state is not None:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in self.best_state:
                        param.copy_(self.best_state[name])


class LinearAlignmentBaseline(nn.Module):
    """The baseline the demo compares with: the same features, standardisation and loss as Alt-MoE, but a single
    linear map per direction (source features -> shared space, and -> target features) instead of the MoE."""

    def __init__(self, alt_moe_model):
        super().__init__()
        config = alt_moe_model.config
        self.config = config
        self.standardizers = alt_moe_model.standardizers  # shared statistics, not trained
        self.query_proj = nn.ModuleDict(
            {direction_name(s, t): nn.Linear(config.feature_size(s), config.projection_dim) for s, t in config.directions}
        )
        self.regression = nn.ModuleDict(
            {direction_name(s, t): nn.Linear(config.feature_size(s), config.feature_size(t)) for s, t in config.directions}
        )
        self.candidate_proj = nn.ModuleDict(
            {m: nn.Linear(config.feature_size(m), config.projection_dim) for m in config.modalities}
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.contrastive_temperature)), requires_grad=False)

    def forward(self, source, target, **features):
        x = self.standardizers[source](features[f"{source}_features"])
        y = self.standardizers[target](features[f"{target}_features"])
        name = direction_name(source, target)
        query = nn.functional.normalize(self.query_proj[name](x), dim=-1)
        candidate = nn.functional.normalize(self.candidate_proj[target](y), dim=-1)
        predicted = self.regression[name](x)
        return alt_moe_loss(self.config, query, candidate, predicted, y, self.logit_scale)
