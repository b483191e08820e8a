"""Latent pre-storage: Alt-MoE connector training from the features cache vs recomputing the backbones every step.

    python benchmarks/bench_prestorage.py [--pairs 256] [--batch 64] [--text minilm-l6] [--vision dinov2-small]

Prints a Markdown table (pairs/s, medians over steps) for the demo backbones on this machine.
"""

import argparse
import os
import platform
import statistics
import time

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from multimodal_moe.modeling import AltMoEModel, AltMoEProcessor
from multimodal_moe.training import zoo
from multimodal_moe.training.data import build_emoji_dataset
from multimodal_moe.training.features import precompute_features


def step_times(step, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--text", default="minilm-l6")
    parser.add_argument("--vision", default="dinov2-small")
    parser.add_argument("--cached-steps", type=int, default=30)
    parser.add_argument("--recompute-steps", type=int, default=3)
    args = parser.parse_args()

    paths = {"text": zoo.resolve(args.text), "vision": zoo.resolve(args.vision)}
    model = AltMoEModel.from_backbones(**paths)
    processor = AltMoEProcessor(AutoTokenizer.from_pretrained(paths["text"]),
                                AutoImageProcessor.from_pretrained(paths["vision"]), text_template="an emoji of a {text}")
    data = build_emoji_dataset(limit=args.pairs, progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    t = time.perf_counter()
    feats = precompute_features(model, processor, data, {"text": "name", "vision": "image"},
                                cache_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-prestore-{os.getpid()}"))
    prestore_seconds = time.perf_counter() - t
    feats = feats.with_format("torch")
    rows = data.select(range(args.batch))
    text_batch, image_batch = rows["name"], [im.convert("RGB") for im in rows["image"]]
    cached = {"text_features": feats["text_features"][: args.batch], "vision_features": feats["vision_features"][: args.batch]}
    model.train()

    def train_step(inputs):
        optimizer.zero_grad()
        model("text", "vision", **inputs).loss.backward()
        optimizer.step()

    def from_cache():
        train_step(cached)

    def recompute():
        with torch.no_grad():  # the backbones are frozen either way; only the connector trains
            inputs = processor(text=text_batch, images=image_batch)
            model.eval()
            features = {f"{m}_features": model.get_backbone_features(m, **inputs) for m in ("text", "vision")}
            model.train()
        train_step(features)

    from_cache()  # warm-up
    cache_s = statistics.median(step_times(from_cache, args.cached_steps))
    recompute_s = statistics.median(step_times(recompute, args.recompute_steps))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; backbones {args.text} + {args.vision}; batch {args.batch}")
    print("| connector training | median s/step | pairs/s | vs recompute |")
    print("|---|---|---|---|")
    print(f"| from the pre-stored features | {cache_s:.4f} | {args.batch / cache_s:,.0f} | {recompute_s / cache_s:,.0f}x |")
    print(f"| recomputing the backbones each step | {recompute_s:.3f} | {args.batch / recompute_s:,.1f} | 1x |")
    print(f"one-time pre-storage of {args.pairs} pairs: {prestore_seconds:.1f} s ({args.pairs / prestore_seconds:.1f} pairs/s); "
          f"it pays for itself after {prestore_seconds / (args.pairs / args.batch * (recompute_s - cache_s)):.2f} epochs")


if __name__ == "__main__":
    main()
