"""Offline instruction tasks in conversation format, for Uni-MoE and Omni-SMoLA training and evaluation.

Every row is one conversation plus its media, the LLaVA-style layout the collator and the chat template read:

    {"messages": [{"role": "user", "content": "<image>\\nWhat is this emoji? Answer with its name."},
                  {"role": "assistant", "content": "grinning face"}],
     "images": [PIL image], "audio": [],            # one item per placeholder, in order
     "task": "caption", "modality": "image"}

Tasks (all from system packages, nothing downloaded):
- caption     emoji glyph -> its Unicode name (fonts-noto-color-emoji)
- classify    Fashion-MNIST image -> clothing class (dataset-fashion-mnist); heldout = the official test images
- transcribe  espeak-ng speech of an emoji name -> the name (espeak-ng); same train/heldout glyphs as `caption`
- librivox    real read speech with transcripts (pocketsphinx-testdata: 5 LibriVox + 5 spoken card clips);
              evaluation only ("heldout"), too few to train on
"""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from .emoji import build_emoji_dataset, train_heldout_split
from .errors import MissingSystemPackageError
from .speech import read_wav, synthesize, wav_bytes

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
POCKETSPHINX_DIR = Path("/usr/share/pocketsphinx/test/data")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
PROMPTS = {
    "caption": "<image>\nWhat is this emoji? Answer with its name.",
    "classify": "<image>\nWhich kind of clothing is this? Answer with its class name.",
    "transcribe": "<audio>\nTranscribe the speech.",
    "librivox": "<audio>\nTranscribe the speech.",
}
TASK_MODALITY = {"caption": "image", "classify": "image", "transcribe": "audio", "librivox": "audio"}
FEATURES = datasets.Features({
    "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
    "images": datasets.Sequence(datasets.Image()),
    "audio": datasets.Sequence(datasets.Value("binary")),  # 16 kHz WAV bytes (read_wav); no torchcodec needed
    "task": datasets.Value("string"),
    "modality": datasets.Value("string"),
})


def conversation(task: str, answer: str, *, images=(), audio=()) -> dict:
    return {"messages": [{"role": "user", "content": PROMPTS[task]}, {"role": "assistant", "content": answer}],
            "images": list(images), "audio": list(audio), "task": task, "modality": TASK_MODALITY[task]}


def _emoji_split(split: str, limit: int | None, progress: bool) -> datasets.Dataset:
    data = train_heldout_split(build_emoji_dataset(limit=limit, progress=progress), heldout_fraction=0.2, seed=0)
    return data[split]


def _fashion(split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images_path = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file():
        raise MissingSystemPackageError("dataset-fashion-mnist", f"the Fashion-MNIST files in {FASHION_DIR}")
    # IDX format: a 16-byte header (magic, count, rows, cols) before the images, 8 bytes before the labels.
    n = limit or None
    images = np.frombuffer(gzip.open(images_path).read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    labels = np.frombuffer(gzip.open(labels_path).read(), np.uint8, offset=8)[:n]
    return images, labels


def librivox_clips() -> list[tuple[Path, str]]:
    """(wav path, lower-case transcript) of the pocketsphinx test clips: 5 LibriVox sentences, 5 spoken cards."""
    if not POCKETSPHINX_DIR.is_dir():
        raise MissingSystemPackageError("pocketsphinx-testdata", f"the test recordings in {POCKETSPHINX_DIR}")
    clips = []
    for folder, name in (("librivox", "transcription"), ("cards", "cards.transcription")):
        for line in (POCKETSPHINX_DIR / folder / name).read_text().splitlines():
            # "<s> he was not an ill disposed young man </s> (sense_..._0880)"
            text, _, file_id = line.rpartition("(")
            words = [w for w in text.split() if w not in ("<s>", "</s>")]
            clips.append((POCKETSPHINX_DIR / folder / f"{file_id.strip(') ')}.wav", " ".join(words)))
    return clips


def build_task_dataset(task: str, split: str = "train", *, limit: int | None = None,
                       progress: bool = True) -> datasets.Dataset:
    """One task's conversations. `split`: "train" or "heldout"; `limit`: emoji glyphs before the train/heldout split
    (caption, transcribe) or Fashion-MNIST images taken from that split (classify)."""
    if task not in PROMPTS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(PROMPTS)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rows = []
    if task == "caption":
        emoji = _emoji_split(split, limit, progress)
        rows = [conversation(task, name, images=[image]) for image, name in zip(emoji["image"], emoji["name"])]
    elif task == "transcribe":
        names = _emoji_split(split, limit, progress)["name"]
        clips = synthesize(names, progress=progress)
        rows = [conversation(task, name, audio=[wav_bytes(clip)]) for name, clip in zip(names, clips)]
    elif task == "classify":
        images, labels = _fashion(split, limit)
        rows = [conversation(task, FASHION_CLASSES[label], images=[Image.fromarray(im).convert("RGB")])
                for im, label in zip(images, labels)]
    elif task == "librivox":
        if split != "heldout":
            raise ValueError("the librivox task has 10 clips: evaluation only (split='heldout')")
        clips = librivox_clips()[:limit]
        rows = [conversation(task, text, audio=[Path(path).read_bytes()]) for path, text in clips]
    return datasets.Dataset.from_list(rows, features=FEATURES)


def build_mixture(tasks: dict[str, int | None], split: str = "train", *, seed: int = 0, progress: bool = True,
                  map_part=None) -> datasets.Dataset:
    """Several tasks in one shuffled data set; `tasks` maps a task to its limit (see `build_task_dataset`).
    `map_part(dataset) -> dataset` is applied to each task's part first (e.g. `prestore_encoder_states`: per task, so
    stages that share a task share its cache)."""
    parts = [build_task_dataset(task, split, limit=limit, progress=progress) for task, limit in tasks.items()]
    if map_part is not None:
        parts = [map_part(part) for part in parts]
    return datasets.concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()


def load_audio(cell) -> np.ndarray:
    """A row's audio item (WAV bytes) as a 16 kHz float32 waveform."""
    return read_wav(bytes(cell))


def reference_answers(data: datasets.Dataset) -> list[str]:
    """The last assistant message of every conversation (the target an evaluation compares against)."""
    return [next(m["content"] for m in reversed(msgs) if m["role"] == "assistant") for msgs in data["messages"]]


__all__ = ["FASHION_CLASSES", "PROMPTS", "TASK_MODALITY", "build_mixture", "build_task_dataset", "conversation",
           "librivox_clips", "load_audio", "reference_answers"]
