"""Benchmark definitions (data set, inputs, metric) and the runner behind `multimodal-moe eval`.

    multimodal-moe eval runs/demo/model --benchmark emoji-retrieval --output-dir runs/demo/eval

    from multimodal_moe.eval.benchmarks import run_benchmark
    results = run_benchmark("runs/demo/model", "emoji-retrieval", output_dir="out")   # also out/results.{json,md}

Offline: `emoji-retrieval` (the project's own emoji data, held-out split). Hub benchmarks (`flickr30k-retrieval`,
`coco-karpathy-retrieval`) use the same retrieval runner and need internet (datasets.load_dataset).
The results JSON is the layout `model_cards.card.eval_results_from_json` turns into a card's model-index.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .metrics import load_metric


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    dataset_name: str  # for the card's model-index
    dataset_type: str  # Hub id, or a project-local name
    split: str
    load: callable  # (limit: int | None) -> datasets.Dataset with an image column and a text column
    image_column: str = "image"
    text_column: str = "name"  # a string, or a list of strings (several captions per image)
    metric: str = "retrieval_recall"
    task_type: str = "cross-modal-retrieval"
    task_name: str = "Cross-modal retrieval"
    offline: bool = True
    k_values: tuple = field(default=(1, 5, 10))


def _emoji(limit):
    from ..training.data import build_emoji_dataset, train_heldout_split

    data = build_emoji_dataset(limit=limit, progress=False)
    return train_heldout_split(data, heldout_fraction=0.2, seed=0)["heldout"]


def _hub(path, split, **kwargs):
    def load(limit):
        import datasets

        ds = datasets.load_dataset(path, split=split, **kwargs)
        return ds.select(range(min(limit, len(ds)))) if limit else ds

    return load


BENCHMARKS = {
    b.name: b
    for b in [
        Benchmark("emoji-retrieval", "text<->image retrieval on the held-out 20% of the offline emoji data (the "
                  "demo's split, seed 0; --limit 360 gives the held-out pairs of `demo --quick`)",
                  "Emoji retrieval (offline)", "emoji-retrieval", "heldout", _emoji),
        Benchmark("flickr30k-retrieval", "text<->image retrieval on the Flickr30k 1k test split (5 captions per image; "
                  "needs internet)", "Flickr30k", "nlphuji/flickr_1k_test_image_text_retrieval", "test",
                  _hub("nlphuji/flickr_1k_test_image_text_retrieval", "test"), text_column="caption", offline=False),
        Benchmark("coco-karpathy-retrieval", "text<->image retrieval on the COCO Karpathy 5k test split (needs "
                  "internet)", "COCO (Karpathy test)", "yerevann/coco-karpathy", "test",
                  _hub("yerevann/coco-karpathy", "test"), image_column="url", text_column="sentences", offline=False),
    ]
}


def list_benchmarks() -> list[Benchmark]:
    return list(BENCHMARKS.values())


def _batches(n, batch_size):
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def _backbone_features(model, processor, modality, items, batch_size, desc=""):
    """Pooled backbone features of every item, in batches (the backbone runs once per item and modality)."""
    out = []
    for idx in tqdm(_batches(len(items), batch_size), desc=desc, leave=False):
        chunk = [items[i] for i in idx]
        inputs = processor(text=chunk) if modality == "text" else processor(images=[_rgb(x) for x in chunk])
        inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in dict(inputs).items()}
        out.append(model.get_backbone_features(modality, **inputs))
    return torch.cat(out)


def _rgb(image):
    if isinstance(image, str):  # a URL (COCO Karpathy): fetched with the standard library
        import io
        import urllib.request

        from PIL import Image

        with urllib.request.urlopen(image, timeout=30) as response:
            image = Image.open(io.BytesIO(response.read()))
    return image.convert("RGB")


def run_benchmark(model, benchmark: str, *, output_dir=None, processor=None, batch_size: int = 32,
                  limit: int | None = None, device: str | None = None) -> dict:
    """Evaluate `model` (an AltMoEModel, or a checkpoint folder / Hub id loaded with trust_remote_code) on a
    retrieval benchmark; returns the results dict and, with output_dir, writes results.json and results.md there."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; available: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[benchmark]
    started = time.time()
    model_id = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", type(model).__name__)
    if isinstance(model, (str, Path)):
        from transformers import AutoModel, AutoProcessor

        from .. import modeling  # noqa: F401  (registers the Auto classes; the checkpoint's own code works too)

        processor = processor or AutoProcessor.from_pretrained(str(model), trust_remote_code=True)
        model = AutoModel.from_pretrained(str(model), trust_remote_code=True)
    if processor is None:
        raise ValueError("pass the processor with an in-memory model")
    model = model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modalities = [m for m in ("text", "vision") if m in getattr(model.config, "modalities", [])]
    if modalities != ["text", "vision"]:
        raise ValueError(f"{benchmark} needs a model with text and vision, this one has {model.config.modalities}")

    data = bench.load(limit)
    images = data[bench.image_column]
    captions = data[bench.text_column]
    # flatten several captions per image: text i belongs to image image_of_text[i]
    if captions and isinstance(captions[0], list):
        texts = [c for caps in captions for c in caps]
        image_of_text = [i for i, caps in enumerate(captions) for _ in caps]
    else:
        texts, image_of_text = list(captions), list(range(len(captions)))
    texts_of_image = [[] for _ in images]
    for t, i in enumerate(image_of_text):
        texts_of_image[i].append(t)

    metric = load_metric(bench.metric)
    metrics = {}
    from ..training.retrieval import rankings_from_scores

    features = {"vision": _backbone_features(model, processor, "vision", images, batch_size, desc="images"),
                "text": _backbone_features(model, processor, "text", texts, batch_size, desc="texts")}
    references = {"text": image_of_text, "vision": texts_of_image}  # per query of that modality: correct candidates
    with torch.no_grad():
        for source, target in (("text", "vision"), ("vision", "text")):
            queries = model.get_query_embeddings(source, target, **{f"{source}_features": features[source]})
            candidates = model.get_candidate_embeddings(target, **{f"{target}_features": features[target]})
            rankings = rankings_from_scores((queries @ candidates.T).float().cpu())
            metrics[f"{source}_to_{target}"] = metric.compute(predictions=rankings, references=references[source],
                                                              k_values=bench.k_values)
    results = {
        "benchmark": bench.name,
        "description": bench.description,
        "model": str(model_id),
        "task_type": bench.task_type,
        "task_name": bench.task_name,
        "dataset": {"name": bench.dataset_name, "type": bench.dataset_type, "split": bench.split,
                    "images": len(images), "texts": len(texts), "limit": limit},
        "metric": bench.metric,
        "metrics": metrics,
        "seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {model.device}",
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(markdown_table(results))
    return results


def markdown_table(results: dict) -> str:
    """The results as a Markdown table: one row per direction, one column per metric."""
    groups = results["metrics"]
    columns = list(dict.fromkeys(k for values in groups.values() for k in values))
    ds = results["dataset"]
    lines = [
        f"## {results['benchmark']}: {results['model']}",
        "",
        f"{ds['name']} ({ds['split']}): {ds['images']} images, {ds['texts']} texts.",
        "",
        "| direction | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for group, values in groups.items():
        lines.append(f"| {group} | " + " | ".join(f"{values[c]:.4f}" if c in values else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"
