"""Model cards (README.md) for multimodal-moe checkpoints, through huggingface_hub's ModelCard / ModelCardData.

    card = build_model_card("runs/demo/model", json.load(open("runs/demo/results.json")),
                            base_models=["sentence-transformers/all-MiniLM-L6-v2", "facebook/dinov2-small"],
                            datasets=["emoji (offline, Noto/Twemoji glyphs + CLDR names)"], repo_id="org/alt-moe-demo")
    card.save("runs/demo/model/README.md")
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = Path(__file__).parent / "template.md"
MODALITIES = ("text", "vision", "audio")
BASE_TAGS = ["multimodal-moe", "custom_code", "mixture-of-experts", "multimodal"]

_DESCRIPTIONS = {
    "alt_moe": (
        "Alt-MoE: a mixture-of-experts connector aligning frozen unimodal backbones in a shared space for any-to-any "
        "cross-modal retrieval.",
        "frozen backbones + MoE connector with a router per target modality",
    ),
    "uni_moe": (
        "Uni-MoE: modality encoders and connectors in front of a language model whose MLPs are sparse "
        "mixture-of-experts layers.",
        "encoders + connectors + sparse-MoE LLM",
    ),
    "omni_smola": (
        "Omni-SMoLA: a multimodal model with soft mixtures of low-rank experts.",
        "soft mixture of LoRA experts",
    ),
}
_PIPELINE_TAGS = {"alt_moe": "feature-extraction", "uni_moe": "image-text-to-text", "omni_smola": "image-text-to-text"}


def read_checkpoint(checkpoint_dir) -> dict:
    """config.json of a checkpoint folder (raises a clear error when it is not one)."""
    config_file = Path(checkpoint_dir) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{checkpoint_dir} is not a checkpoint folder: no config.json")
    return json.loads(config_file.read_text())


def eval_results_from_json(results: dict, *, dataset_name: str | None = None) -> list[EvalResult]:
    """EvalResults (the card's `model-index`) from eval JSON.

    Two layouts are read:
    - `multimodal-moe eval` output: {"benchmark", "task_type", "task_name", "dataset": {"name", "type", "split"},
      "metrics": {group (e.g. "text_to_vision"): {metric: value}}};
    - the Alt-MoE demo's results.json: {"moe": {direction: {"R@1": ..., ...}}, "heldout_pairs": n, ...}.
    Non-numeric values are skipped.
    """
    if "metrics" in results:
        dataset = results.get("dataset", {})
        task_type = results.get("task_type", "cross-modal-retrieval")
        task_name = results.get("task_name", "Cross-modal retrieval")
        groups = results["metrics"]
        split = dataset.get("split")
        ds_name = dataset.get("name", results.get("benchmark", "custom"))
        ds_type = dataset.get("type", results.get("benchmark", "custom"))
    elif "moe" in results:
        task_type, task_name = "cross-modal-retrieval", "Cross-modal retrieval"
        groups, split = results["moe"], "heldout"
        ds_name, ds_type = "Emoji retrieval (offline)", "emoji-retrieval"
    else:
        raise ValueError("unrecognised results JSON: expected a 'metrics' (multimodal-moe eval) or 'moe' (demo) key")
    ds_name = dataset_name or ds_name
    out = []
    for group, values in groups.items():
        for metric, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out.append(EvalResult(
                task_type=task_type, task_name=task_name, dataset_type=ds_type, dataset_name=ds_name,
                dataset_split=split, metric_type=_metric_type(metric), metric_name=f"{metric} ({group})",
                metric_config=group, metric_value=float(value),
            ))
    return out


def base_models_from_config(config: dict) -> list[str]:
    """Hub ids ("org/name") among the config's backbone_sources, in modality order; local folders are skipped."""
    out = []
    for source in (config.get("backbone_sources") or {}).values():
        name = (source or {}).get("name_or_path") or ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
            out.append(name)
    return list(dict.fromkeys(out))


def _metric_type(name: str) -> str:
    match = re.fullmatch(r"(?:R|recall)@(\d+)", name)
    return f"recall_at_{match.group(1)}" if match else re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")


def _results_table(eval_results: list[EvalResult]) -> str:
    if not eval_results:
        return ""
    groups = list(dict.fromkeys(r.metric_config for r in eval_results))
    metrics = list(dict.fromkeys(r.metric_name.rsplit(" (", 1)[0] for r in eval_results))
    values = {(r.metric_config, r.metric_name.rsplit(" (", 1)[0]): r.metric_value for r in eval_results}
    lines = ["| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for g in groups:
        cells = [f"{values[(g, m)]:.4g}" if (g, m) in values else "" for m in metrics]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def usage_snippet(config: dict, repo_id: str) -> str:
    """Python code that loads the checkpoint from `repo_id` with trust_remote_code and a pinned revision."""
    lines = [
        "import torch",
        "from transformers import AutoModel, AutoProcessor",
        "",
        f'repo_id = "{repo_id}"',
        'revision = "main"  # pin the commit hash you reviewed: trust_remote_code runs the repo\'s Python files',
        "model = AutoModel.from_pretrained(repo_id, trust_remote_code=True, revision=revision).eval()",
        "processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True, revision=revision)",
    ]
    modalities = [m for m in MODALITIES if config.get(f"{m}_config")]
    if config.get("model_type") == "alt_moe" and "text" in modalities and "vision" in modalities:
        lines[1:1] = ["from PIL import Image"]
        lines += [
            "",
            "# text -> image retrieval (use your own images and texts): names are queries, images candidates",
            'names = ["large red square", "large yellow square", "large blue square"]',
            'images = [Image.new("RGB", (224, 224), color) for color in ("red", "yellow", "blue")]',
            "inputs = processor(text=names, images=images)",
            "with torch.no_grad():",
            '    queries = model.get_query_embeddings("text", "vision", **inputs)',
            '    candidates = model.get_candidate_embeddings("vision", **inputs)',
            "scores = queries @ candidates.T  # (names, images)",
            "print(scores.argmax(dim=-1))  # best image for each name",
        ]
    return "\n".join(lines)


def build_model_card(
    checkpoint_dir,
    results: dict | None = None,
    *,
    base_models: list[str] | None,
    datasets: list[str] | None,
    license: str = "apache-2.0",  # noqa: A002 (the Hub's metadata key)
    pipeline_tag: str | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The README.md of a checkpoint folder: YAML metadata (ModelCardData, `model-index` from `results`) + text.

    `results`: eval JSON (see `eval_results_from_json`) or None. `base_models=None` takes the Hub ids of the
    config's `backbone_sources` (the zoo records the Hub id each offline backbone stands for); pass [] for none.
    `repo_id` goes into the usage snippet (default: the folder name under a placeholder org). `pipeline_tag`
    defaults by architecture (feature-extraction for Alt-MoE).
    """
    checkpoint = Path(checkpoint_dir)
    config = read_checkpoint(checkpoint)
    model_type = config.get("model_type", "unknown")
    repo_id = repo_id or f"your-org/{checkpoint.resolve().name}"
    model_name = model_name or repo_id.split("/")[-1]
    modalities = [m for m in MODALITIES if config.get(f"{m}_config")] or ["text"]
    eval_results = eval_results_from_json(results) if results else None
    if base_models is None:
        base_models = base_models_from_config(config)
    card_data = ModelCardData(
        model_name=model_name,
        base_model=list(base_models) if base_models else None,
        datasets=list(datasets) if datasets else None,
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag or _PIPELINE_TAGS.get(model_type, "feature-extraction"),
        tags=list(dict.fromkeys(BASE_TAGS + [model_type.replace("_", "-")] + list(tags or []))),
        eval_results=eval_results,
    )
    description, summary = _DESCRIPTIONS.get(model_type, (f"A `{model_type}` checkpoint.", model_type))
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        description=description,
        model_type=model_type,
        architecture_summary=summary,
        modalities=modalities,
        base_models=list(base_models or []),
        datasets=list(datasets or []),
        license=license,
        code_files=sorted(p.name for p in checkpoint.glob("*.py")) or ["(none)"],
        usage=usage_snippet(config, repo_id),
        results_table=_results_table(eval_results or []),
        results_note=_results_note(results),
        files=[f for f in files if f != "README.md"] + ["README.md"],
    )
    return card


def _results_note(results: dict | None) -> str:
    if not results:
        return ""
    if "moe" in results and "heldout_pairs" in results:
        chance = results.get("chance", {}).get("R@1")
        note = f"Recall@k on {results['heldout_pairs']} held-out pairs of the offline emoji data"
        return note + (f" (chance R@1 = {chance:.3g})." if chance else ".")
    if "benchmark" in results:
        return f"Benchmark `{results['benchmark']}` run with `multimodal-moe eval`."
    return ""


def extract_usage_code(card: ModelCard | str) -> str:
    """The first ```python block of a card's text."""
    text = card.text if isinstance(card, ModelCard) else card
    match = re.search(r"```python\n(.*?)```", text, flags=re.S)
    if match is None:
        raise ValueError("the card has no ```python block")
    return match.group(1)
