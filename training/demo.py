"""The main job: `multimodal-moe demo --output-dir DIR [--quick]`.

Offline, from real pretrained backbones (the zoo): emoji glyphs from Debian's Noto Color Emoji font paired with their
Unicode names (and espeak-ng speech of the names) -> pre-stored backbone features -> Alt-MoE trained by alternating
unidirectional alignment -> held-out retrieval, beside a linear baseline trained the same way -> a saved model that
reloads through `AutoModel(..., trust_remote_code=True)` and answers live queries.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import TrainingArguments

from .alt_moe import AltMoETrainer, DirectionSchedule, KeepBestCallback, LinearAlignmentBaseline, direction_name
from .data import MissingSystemPackageError, add_speech_column, build_emoji_dataset, train_heldout_split
from .features import feature_statistics, precompute_features
from .init import alt_moe_from_names

AUDIO_WINDOW_SECONDS = 6  # the longest spoken name (of 1,164) lasts 5.04 s
RAW_COLUMNS = {"text": "name", "vision": "image", "audio": "audio"}
CONNECTOR = dict(
    hidden_size=512, num_experts=8, num_experts_per_tok=2, expert_intermediate_size=1024, projection_dim=256,
    dropout=0.1, routing_mode="softmax_topk", contrastive_temperature=0.05, router_aux_loss_coef=0.01,
)


def say(message: str):
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def run_demo(
    output_dir: str,
    *,
    quick: bool = False,
    text: str = "minilm-l6",
    vision: str = "dinov2-small",
    audio: str | None = "auto",
    max_steps: int | None = None,
    seed: int = 0,
) -> dict:
    started = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    # 1. data: ~1,160 real image-caption pairs, fixed split; a validation slice of train for early stopping
    if audio == "auto":  # Whisper encodes 30 s windows (~0.4 s a clip on 2 cores): worth it in the full run only
        audio = None if quick else "whisper-tiny-en"
    data = build_emoji_dataset(limit=360 if quick else None)
    modalities = {"text": text, "vision": vision}
    if audio:
        try:
            data = add_speech_column(data, text_column="name")
            modalities["audio"] = audio
        except MissingSystemPackageError as error:
            say(f"no audio modality: {error}")
    split = train_heldout_split(data, heldout_fraction=0.2, seed=seed)
    fit = train_heldout_split(split["train"], heldout_fraction=0.15, seed=seed + 1)
    say(f"{len(data)} pairs: {len(fit['train'])} train / {len(fit['heldout'])} validation / "
        f"{len(split['heldout'])} held-out; modalities {list(modalities)}")

    # 2. backbones: zoo names become local HF folders; a Hub id or folder passes through unchanged
    # Whisper encodes 30 s windows; the spoken names last at most 5.04 s, so a 6 s window (whisper.cpp's audio_ctx idea)
    # makes audio features ~6x cheaper.
    window = AUDIO_WINDOW_SECONDS if "audio" in modalities and modalities["audio"] == "whisper-tiny-en" else None
    model, processor = alt_moe_from_names(**modalities, text_template="an emoji of a {text}",
                                          audio_window_seconds=window, **CONNECTOR)
    sources = model.config.backbone_sources
    if not torch.cuda.is_available():
        # transformers defaults to grouped_mm, which on CPU runs a fallback ~2x slower than the eager expert loop
        # (measured: 256 pairs, 8 experts of 512->1024->512, forward + backward). On GPU grouped_mm wins.
        model.set_experts_implementation("eager")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable")

    # 3. latent pre-storage: backbones run once per sample, cached on disk (a rerun reads the cache)
    t0 = time.time()
    columns = {m: RAW_COLUMNS[m] for m in modalities}
    feats = {name: precompute_features(model, processor, ds, columns, batch_size=32)
             for name, ds in (("train", fit["train"]), ("validation", fit["heldout"]), ("heldout", split["heldout"]))}
    feature_seconds = time.time() - t0
    for m in modalities:
        model.set_feature_statistics(m, *feature_statistics(feats["train"], m))

    # 4. train the MoE connector and the linear baseline the same way
    steps = max_steps or (150 if quick else 400)
    histories, results = {}, {}
    for name, net in (("moe", model), ("linear", LinearAlignmentBaseline(model))):
        t0 = time.time()
        trainer = _trainer(net, feats, out / "checkpoints" / name, steps, seed)
        trainer.train()
        heldout = trainer.evaluate(feats["heldout"], metric_key_prefix="heldout")
        histories[name] = trainer.state.log_history
        results[name] = {
            direction_name(s, t): {
                "R@1": heldout[f"heldout_{direction_name(s, t)}_recall@1"],
                "R@5": heldout[f"heldout_{direction_name(s, t)}_recall@5"],
                "R@10": heldout[f"heldout_{direction_name(s, t)}_recall@10"],
                "median_rank": heldout[f"heldout_{direction_name(s, t)}_median_rank"],
                "mrr": heldout[f"heldout_{direction_name(s, t)}_mean_reciprocal_rank"],
            }
            for s, t in model.config.directions
        }
        best = trainer.callback_handler.callbacks[-1]  # KeepBestCallback, added last
        results[f"{name}_training"] = {"seconds": round(time.time() - t0, 1), "best_step": best.best_step,
                                       "steps_run": trainer.state.global_step}
        if name == "moe":
            results["moe_expert_usage"] = {direction_name(s, t): heldout[f"heldout_{direction_name(s, t)}_expert_usage"]
                                           for s, t in model.config.directions}

    # 5. save: full checkpoint (runs anywhere offline) and a connector-only one (MBs; backbones from their sources)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    model.save_pretrained(out / "connector", connector_only=True)
    processor.save_pretrained(out / "connector")

    n = len(split["heldout"])
    summary = {
        "heldout_pairs": n,
        "train_pairs": len(fit["train"]),
        "validation_pairs": len(fit["heldout"]),
        "chance": {"R@1": 1 / n, "R@5": min(1, 5 / n), "R@10": min(1, 10 / n)},
        "moe": results["moe"],
        "linear": results["linear"],
        "moe_expert_usage": results["moe_expert_usage"],
        "training": {"moe": results["moe_training"], "linear": results["linear_training"], "max_steps": steps},
        "backbones": {m: {"zoo": name, **sources[m]} for m, name in modalities.items()},
        "trainable_parameters": trainable,
        "feature_seconds": round(feature_seconds, 1),
        "quick": quick,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    _write_json(out / "results.json", summary)
    _plots(out, histories, summary, model.config.directions)

    # 6. reload through the Auto classes, as a Hub user would, and answer live queries
    _live_queries(out / "model", data, feats, split["heldout"])
    summary["seconds"] = round(time.time() - started, 1)
    _write_json(out / "results.json", summary)
    _print_table(summary)
    return summary


def _trainer(net, feats, output_dir, steps, seed):
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=256, learning_rate=1e-3,
        weight_decay=0.05, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), max_grad_norm=1.0,
        logging_steps=10, eval_strategy="steps", eval_steps=10, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), seed=seed, data_seed=seed, disable_tqdm=False,
    )
    schedule = DirectionSchedule(net.config.directions, mode="cycle")
    keep_best = KeepBestCallback("eval_validation_mean_recall@5", patience=8)
    trainer = AltMoETrainer(
        model=net, args=args, train_dataset=feats["train"],
        eval_dataset={"validation": feats["validation"], "heldout": feats["heldout"]},
        schedule=schedule, callbacks=[keep_best],
    )
    trainer.callback_handler.remove_callback(keep_best)  # re-add last: after the schedule's own callback
    trainer.add_callback(keep_best)
    return trainer


def _live_queries(model_dir, data, feats, heldout):
    from transformers import AutoModel, AutoProcessor

    from .retrieval import VectorStore

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    say(f"reloaded {type(model).__name__} from {model_dir} through AutoModel (trust_remote_code)")
    names = heldout["name"]
    with torch.no_grad():
        # candidates: every held-out emoji, embedded from its pre-stored features
        vision = torch.tensor(feats["heldout"]["vision_features"])
        text = torch.tensor(feats["heldout"]["text_features"])
        images = VectorStore.from_embeddings(model.get_candidate_embeddings("vision", vision_features=vision),
                                             {"name": names, "id": heldout["id"]})
        captions = VectorStore.from_embeddings(model.get_candidate_embeddings("text", text_features=text),
                                               {"name": names, "id": heldout["id"]})
        print("\nLive queries against the held-out emoji (never seen in training):")
        for query in names[:4]:
            q = model.get_query_embeddings("text", "vision", **processor(text=[query]))
            hits = images.search(q, k=3).rows(0)
            print(f"  text  {query!r:32} -> " + ", ".join(f"{chr(h['id'])} {h['name']}" for h in hits))
        for row in heldout.select(range(4, 8)):
            q = model.get_query_embeddings("vision", "text", **processor(images=[row["image"].convert("RGB")]))
            hits = captions.search(q, k=3).rows(0)
            print(f"  image {chr(row['id'])} ({row['name']:26}) -> " + ", ".join(repr(h["name"]) for h in hits))


def _plots(out: Path, histories: dict, summary: dict, directions):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [direction_name(s, t) for s, t in directions]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name in names:
        points = [(h["step"], h[f"loss/{name}"]) for h in histories["moe"] if f"loss/{name}" in h]
        if points:
            axes[0].plot(*zip(*points), label=name)
        points = [(h["step"], h[f"eval_heldout_{name}_recall@10"]) for h in histories["moe"]
                  if f"eval_heldout_{name}_recall@10" in h]
        if points:
            axes[1].plot(*zip(*points), label=f"MoE {name}")
        points = [(h["step"], h[f"eval_heldout_{name}_recall@10"]) for h in histories["linear"]
                  if f"eval_heldout_{name}_recall@10" in h]
        if points:
            axes[1].plot(*zip(*points), "--", label=f"linear {name}")
    axes[1].axhline(summary["chance"]["R@10"], color="gray", linestyle=":", label="chance")
    axes[0].set(title="Alt-MoE training loss per direction", xlabel="optimizer step", ylabel="loss")
    axes[1].set(title="held-out recall@10 during training", xlabel="optimizer step", ylabel="R@10")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    usage = torch.tensor([summary["moe_expert_usage"][n] for n in names])  # (directions, experts)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * usage.shape[1], 1 + 0.45 * len(names)))
    image = ax.imshow(usage, cmap="viridis", vmin=0)
    ax.set_xticks(range(usage.shape[1]), [f"e{i}" for i in range(usage.shape[1])])
    ax.set_yticks(range(len(names)), names)
    for i in range(usage.shape[0]):
        for j in range(usage.shape[1]):
            ax.text(j, i, f"{usage[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_title("expert usage per direction (held-out)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "expert_usage.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _print_table(summary: dict):
    chance = summary["chance"]
    print(f"\nHeld-out retrieval over {summary['heldout_pairs']} pairs "
          f"(chance R@1/5/10 = {100 * chance['R@1']:.1f} / {100 * chance['R@5']:.1f} / {100 * chance['R@10']:.1f} %)")
    print("| direction | MoE R@1 | MoE R@5 | MoE R@10 | linear R@1 | linear R@5 | linear R@10 |")
    print("|---|---|---|---|---|---|---|")
    for name, moe in summary["moe"].items():
        lin = summary["linear"][name]
        print(f"| {name} | {100 * moe['R@1']:.1f} | {100 * moe['R@5']:.1f} | {100 * moe['R@10']:.1f} | "
              f"{100 * lin['R@1']:.1f} | {100 * lin['R@5']:.1f} | {100 * lin['R@10']:.1f} |")
    se = 100 * math.sqrt(0.2 * 0.8 / summary["heldout_pairs"])
    print(f"(standard error of a recall near 20% over these pairs: about {se:.1f} points)")


def _write_json(path: Path, payload: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)  # never a half-written results file
