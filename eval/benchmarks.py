"""Benchmark definitions (data set, inputs, metric) and the runner behind `multimodal-moe eval`.

    multimodal-moe eval runs/demo/model --benchmark emoji-retrieval --output-dir runs/demo/eval

    from multimodal_moe.eval.benchmarks import run_benchmark
    results = run_benchmark("runs/demo/model", "emoji-retrieval", output_dir="out")   # also out/results.{json,md}

Offline: `emoji-retrieval` (the project's own emoji data, held-out split). Hub benchmarks (`flickr30k-retrieval`,
`coco-karpathy-retrieval`) use the same retrieval runner and need internet (datasets.load_dataset).
Generative Hub benchmarks (`vqav2`, `textvqa`, `clotho-aqa`, `librispeech`) load the model with
AutoModelForCausalLM + AutoProcessor (trust_remote_code), prompt it through the processor's chat template, generate
greedily in batches and score the decoded new tokens; their JSON also holds every prediction. Any benchmark also runs
on a local copy of its data: `data=` (a `save_to_disk` folder or a Dataset) / `multimodal-moe eval ... --data PATH`.
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


@dataclass(frozen=True)
class GenerativeBenchmark:
    """A question answering / transcription benchmark: prompt = placeholder (image or audio) + prompt_template filled
    with the question column, greedy generation, metric on the decoded new tokens against `references(row)`."""

    name: str
    description: str
    dataset_name: str  # for the card's model-index
    dataset_type: str  # Hub id
    split: str
    config: str | None = None  # the Hub data set's configuration (load_dataset's `name`)
    image_column: str | None = None
    audio_column: str | None = None
    question_column: str | None = None
    answers_column: str = "answers"  # answers per question, or the transcript
    prompt_template: str = "{question}"
    max_new_tokens: int = 16
    metric: str = "vqa_accuracy"
    extra_metrics: tuple = ()  # further metrics on the same predictions / references (e.g. cer next to wer)
    references: callable = None  # (answers cell) -> the metric's reference; default: list of answer strings
    normalize: callable = None  # applied to predictions and references before a non-VQA metric
    task_type: str = "visual-question-answering"
    task_name: str = "Visual question answering"
    offline: bool = False
    generative: bool = True
    local_task: str | None = None  # an offline task of training/data/tasks.py (its held-out split)

    def load(self, limit):
        import datasets

        if self.local_task is not None:
            return _task_rows(self.local_task, limit)

        split = f"{self.split}[:{limit}]" if limit else self.split
        return datasets.load_dataset(self.dataset_type, self.config, split=split)


def answer_strings(cell) -> list[str]:
    """Annotator answers as strings: a list of strings, or of {"answer": ...} dicts (VQAv2's layout), or one string."""
    if isinstance(cell, str):
        return [cell]
    if isinstance(cell, dict):  # a column of dicts of lists (datasets' Sequence of a struct)
        return [str(a) for a in cell["answer"]]
    return [a["answer"] if isinstance(a, dict) else str(a) for a in cell]


def _single_answer(cell) -> str:
    answers = answer_strings(cell)
    return max(answers, key=answers.count)  # the majority answer (the first among ties)


def _normalize_text(text: str) -> str:
    """Lower case, punctuation other than apostrophes dropped, whitespace collapsed (for WER / CER and exact match;
    LibriSpeech transcripts are upper case without punctuation)."""
    import re

    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def _task_rows(task, limit):
    """An offline task's held-out conversations as benchmark columns: image / audio, and the answer."""
    import datasets

    from ..training.data.tasks import build_task_dataset, load_audio, reference_answers

    if task in ("caption", "transcribe"):
        # the first `limit` rows of the full held-out split: a split of fewer glyphs would hold out other glyphs,
        # some of them seen in training
        data = build_task_dataset(task, "heldout", progress=False)
        data = data.select(range(min(limit, len(data)))) if limit else data
    else:
        data = build_task_dataset(task, "heldout", limit=limit, progress=False)
    columns = {"answer": reference_answers(data)}
    if any(data["images"]):
        columns["image"] = [images[0] for images in data["images"]]
    if any(data["audio"]):
        columns["audio"] = [{"array": load_audio(a[0]), "sampling_rate": 16000} for a in data["audio"]]
    return datasets.Dataset.from_dict(columns)


def _task_prompt(task):
    from ..training.data.tasks import PROMPTS

    return PROMPTS[task].split("\n", 1)[1]  # the text after the "<image>\n" / "<audio>\n" placeholder line


_VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."

GENERATIVE_BENCHMARKS = [
    GenerativeBenchmark("vqav2", "visual question answering on VQAv2 val (10 answers per question, VQA accuracy; "
                        "needs internet)", "VQAv2", "lmms-lab/VQAv2", "validation", image_column="image",
                        question_column="question", answers_column="answers", prompt_template=_VQA_PROMPT,
                        max_new_tokens=10),
    GenerativeBenchmark("textvqa", "scene-text visual question answering on TextVQA val (10 answers per question, "
                        "VQA accuracy; needs internet)", "TextVQA", "lmms-lab/textvqa", "validation",
                        image_column="image", question_column="question", answers_column="answers",
                        prompt_template=_VQA_PROMPT, max_new_tokens=10),
    GenerativeBenchmark("clotho-aqa", "audio question answering on Clotho-AQA test (yes/no and one-word answers; "
                        "accuracy = exact match after lower-casing and dropping punctuation; needs internet)",
                        "Clotho-AQA", "AudioLLMs/clotho_aqa_test", "test", audio_column="context",
                        question_column="instruction", answers_column="answer",
                        prompt_template="{question}\nAnswer the question using a single word.", max_new_tokens=8,
                        metric="accuracy", references=_single_answer, normalize=_normalize_text,
                        task_type="audio-question-answering", task_name="Audio question answering"),
    GenerativeBenchmark("librispeech", "speech recognition on LibriSpeech test-clean (WER and CER on lower-cased "
                        "text without punctuation; needs internet)", "LibriSpeech (test-clean)",
                        "openslr/librispeech_asr", "test", config="clean", audio_column="audio",
                        answers_column="text", prompt_template="Transcribe the speech.", max_new_tokens=128,
                        metric="wer", extra_metrics=("cer",), references=_single_answer, normalize=_normalize_text,
                        task_type="automatic-speech-recognition", task_name="Automatic speech recognition"),
]
# Offline generative benchmarks: the held-out splits of the project's own tasks (training/data/tasks.py), prompted
# exactly as in training. `--limit N`: the first N held-out examples.
_OFFLINE = dict(offline=True, question_column=None, answers_column="answer", normalize=_normalize_text,
                dataset_type="multimodal-moe-offline", split="heldout")
GENERATIVE_BENCHMARKS += [
    GenerativeBenchmark("emoji-caption", "emoji image -> its Unicode name, held-out glyphs (names unseen in "
                        "training; ROUGE-L, BLEU-4, CIDEr-D against the one reference)", "Emoji names (offline)",
                        image_column="image", prompt_template=_task_prompt("caption"), max_new_tokens=12,
                        metric="rouge", extra_metrics=("bleu", "cider"), local_task="caption",
                        task_type="image-to-text", task_name="Image captioning", **_OFFLINE),
    GenerativeBenchmark("fashion-classify", "Fashion-MNIST test images -> class name (accuracy of the normalised "
                        "answer)", "Fashion-MNIST (offline)", image_column="image",
                        prompt_template=_task_prompt("classify"), max_new_tokens=6, metric="accuracy",
                        references=_single_answer, local_task="classify", task_type="image-classification",
                        task_name="Image classification", **_OFFLINE),
    GenerativeBenchmark("speech-transcribe", "espeak-ng speech of held-out emoji names -> text (WER, CER)",
                        "Spoken emoji names (offline)", audio_column="audio",
                        prompt_template=_task_prompt("transcribe"), max_new_tokens=12, metric="wer",
                        extra_metrics=("cer",), references=_single_answer, local_task="transcribe",
                        task_type="automatic-speech-recognition", task_name="Automatic speech recognition",
                        **_OFFLINE),
    GenerativeBenchmark("librivox", "real read speech: 5 LibriVox sentences and 5 spoken card clips from "
                        "pocketsphinx-testdata (WER, CER)", "pocketsphinx LibriVox (offline)", audio_column="audio",
                        prompt_template=_task_prompt("librivox"), max_new_tokens=40, metric="wer",
                        extra_metrics=("cer",), references=_single_answer, local_task="librivox",
                        task_type="automatic-speech-recognition", task_name="Automatic speech recognition",
                        **_OFFLINE),
]
BENCHMARKS.update({b.name: b for b in GENERATIVE_BENCHMARKS})


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


def _local_data(data, split, limit):
    """`data`: a Dataset, or a folder written by save_to_disk (a Dataset, or a DatasetDict: `split`, else its only
    split); the first `limit` rows."""
    import datasets

    if isinstance(data, (str, Path)):
        data = datasets.load_from_disk(str(data))
    if isinstance(data, datasets.DatasetDict):
        if split in data:
            data = data[split]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise ValueError(f"the local data has splits {list(data)}, none named {split!r}")
    return data.select(range(min(limit, len(data)))) if limit else data


def _load_model(model, processor, auto_class: str, device):
    """(id for the results, model in eval mode on `device`, processor): a folder / Hub id is loaded with the Auto
    class and trust_remote_code; an in-memory model needs its processor passed."""
    model_id = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", type(model).__name__)
    if isinstance(model, (str, Path)):
        import transformers

        from .. import modeling  # noqa: F401  (registers the Auto classes; the checkpoint's own code works too)

        processor = processor or transformers.AutoProcessor.from_pretrained(str(model), trust_remote_code=True)
        model = getattr(transformers, auto_class).from_pretrained(str(model), trust_remote_code=True)
    if processor is None:
        raise ValueError("pass the processor with an in-memory model")
    return str(model_id), model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu")), processor


def _write(results, output_dir):
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(markdown_table(results))
    return results


def run_benchmark(model, benchmark: str, *, output_dir=None, processor=None, batch_size: int = 32,
                  limit: int | None = None, device: str | None = None, data=None,
                  max_new_tokens: int | None = None) -> dict:
    """Evaluate `model` on a benchmark; returns the results dict and, with output_dir, writes results.json and
    results.md there.

    Retrieval benchmarks take an AltMoEModel (or a checkpoint folder / Hub id, loaded with AutoModel); generative ones
    a model with `generate` (or a folder / Hub id, loaded with AutoModelForCausalLM), both with trust_remote_code.
    `data`: a local copy of the benchmark's data (a save_to_disk folder or a Dataset, same columns) instead of the
    Hub / project data. `max_new_tokens` overrides the benchmark's (generative only)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; available: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[benchmark]
    if getattr(bench, "generative", False):
        return _run_generative(model, bench, output_dir=output_dir, processor=processor, batch_size=batch_size,
                               limit=limit, device=device, data=data, max_new_tokens=max_new_tokens)
    started = time.time()
    model_id, model, processor = _load_model(model, processor, "AutoModel", device)
    modalities = [m for m in ("text", "vision") if m in getattr(model.config, "modalities", [])]
    if modalities != ["text", "vision"]:
        raise ValueError(f"{benchmark} needs a model with text and vision, this one has {model.config.modalities}")

    data = bench.load(limit) if data is None else _local_data(data, bench.split, limit)
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
    return _write(results, output_dir)


def _audio_array(cell, rate):
    """A waveform at `rate` Hz from an audio cell: {"array", "sampling_rate"} (datasets' Audio), a decoder with
    get_all_samples() (datasets >= 4 with torchcodec), or a plain sequence of samples (taken as `rate` Hz)."""
    import numpy as np

    if hasattr(cell, "get_all_samples"):
        samples = cell.get_all_samples()
        array, source_rate = samples.data.mean(0).numpy(), samples.sample_rate
    elif isinstance(cell, dict):
        array, source_rate = np.asarray(cell["array"], dtype=np.float32), cell.get("sampling_rate") or rate
    else:
        array, source_rate = np.asarray(cell, dtype=np.float32), rate
    if array.ndim > 1:
        array = array.mean(0)
    if source_rate != rate:  # linear interpolation: enough for evaluation inputs
        n = int(round(len(array) * rate / source_rate))
        array = np.interp(np.linspace(0, len(array) - 1, n), np.arange(len(array)), array)
    return np.asarray(array, dtype=np.float32)


def _prompt(bench, processor, question):
    placeholder = [m for m, col in (("image", bench.image_column), ("audio", bench.audio_column)) if col]
    text = bench.prompt_template.format(question=question if question is not None else "")
    if placeholder:  # LLaVA's layout (and the training tasks'): placeholders on their own line, then the text
        text = "\n" + text
    if getattr(processor, "chat_template", None):
        content = [{"type": m} for m in placeholder] + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    tokens = {"image": getattr(processor, "image_token", "<image>"), "audio": getattr(processor, "audio_token",
                                                                                        "<audio>")}
    return "".join(tokens[m] for m in placeholder) + text


@torch.no_grad()
def _run_generative(model, bench, *, output_dir, processor, batch_size, limit, device, data, max_new_tokens):
    started = time.time()
    model_id, model, processor = _load_model(model, processor, "AutoModelForCausalLM", device)
    for column, sub in ((bench.image_column, "vision_config"), (bench.audio_column, "audio_config")):
        if column and hasattr(model.config, sub) and getattr(model.config, sub) is None:
            raise ValueError(f"{bench.name} needs a model with {sub.split('_')[0]} input; this one has no {sub}")
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    data = bench.load(limit) if data is None else _local_data(data, bench.split, limit)
    rate = getattr(getattr(processor, "feature_extractor", None), "sampling_rate", 16000)
    max_new = max_new_tokens or bench.max_new_tokens

    records = []
    for idx in tqdm(_batches(len(data), batch_size), desc=bench.name, leave=False):
        rows = data.select(idx)
        questions = rows[bench.question_column] if bench.question_column else [None] * len(idx)
        kwargs = {"text": [_prompt(bench, processor, q) for q in questions]}
        if bench.image_column:
            kwargs["images"] = [_rgb(im) for im in rows[bench.image_column]]
        if bench.audio_column:
            kwargs["audio"] = [_audio_array(a, rate) for a in rows[bench.audio_column]]
        inputs = processor(**kwargs)
        inputs = {k: (v.to(model.device, dtype=model.dtype) if v.is_floating_point() else v.to(model.device))
                  if hasattr(v, "to") else v for k, v in dict(inputs).items()}
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, q, text, cell in zip(idx, questions, texts, rows[bench.answers_column]):
            ref = bench.references(cell) if bench.references else answer_strings(cell)
            records.append({"index": i, "question": q, "prediction": text.strip(), "references": ref})

    predictions = [r["prediction"] for r in records]
    references = [r["references"] for r in records]
    if bench.normalize is not None:
        predictions = [bench.normalize(p) for p in predictions]
        references = [[bench.normalize(a) for a in r] if isinstance(r, list) else bench.normalize(r)
                      for r in references]
    scores = {}
    for name in (bench.metric, *bench.extra_metrics):
        computed = load_metric(name).compute(predictions=predictions, references=references)
        if name == "vqa_accuracy":
            for record, score in zip(records, computed["vqa_accuracy_per_example"]):
                record["score"] = score
        scores.update({k: v for k, v in computed.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and (k == name or name not in ("wer", "cer"))})
    results = {
        "benchmark": bench.name,
        "description": bench.description,
        "model": str(model_id),
        "task_type": bench.task_type,
        "task_name": bench.task_name,
        "dataset": {"name": bench.dataset_name, "type": bench.dataset_type, "split": bench.split,
                    "config": bench.config, "examples": len(records), "limit": limit,
                    "local": None if data is None or not isinstance(data, (str, Path)) else str(data)},
        "metric": bench.metric,
        "metrics": {"all": scores},
        "generation": {"prompt_template": bench.prompt_template, "max_new_tokens": max_new, "do_sample": False,
                       "chat_template": bool(getattr(processor, "chat_template", None))},
        "predictions": records,
        "seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {model.device}",
    }
    return _write(results, output_dir)


def markdown_table(results: dict) -> str:
    """The results as a Markdown table: one row per direction, one column per metric."""
    groups = results["metrics"]
    columns = list(dict.fromkeys(k for values in groups.values() for k in values))
    ds = results["dataset"]
    size = f"{ds['examples']} examples" if "examples" in ds else f"{ds['images']} images, {ds['texts']} texts"
    lines = [
        f"## {results['benchmark']}: {results['model']}",
        "",
        f"{ds['name']} ({ds['split']}): {size}.",
        "",
        ("| subset | " if "examples" in ds else "| direction | ") + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for group, values in groups.items():
        lines.append(f"| {group} | " + " | ".join(f"{values[c]:.4f}" if c in values else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"
