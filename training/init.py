"""`multimodal-moe init alt-moe`: an untrained Alt-MoE checkpoint and processor from pretrained backbones."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

from ..modeling import AltMoEModel, AltMoEProcessor
from . import zoo


def alt_moe_from_names(text=None, vision=None, audio=None, *, text_template=None, audio_window_seconds=None,
                       **config_kwargs):
    """(model, processor) around backbones named by zoo name, Hub id or local folder.

    Zoo names become local HF folders; the config records each backbone's Hub id (and the local copy), so a
    connector-only checkpoint can be reassembled here offline and elsewhere from the Hub."""
    names = {m: n for m, n in (("text", text), ("vision", vision), ("audio", audio)) if n}
    if len(names) < 2:
        raise ValueError("give at least two of text, vision, audio")
    paths = {m: zoo.resolve(n) for m, n in names.items()}
    sources = {
        m: {"name_or_path": zoo.ZOO[n].hub_id if n in zoo.ZOO else n, "revision": None, "local_path": paths[m]}
        for m, n in names.items()
    }
    model = AltMoEModel.from_backbones(**paths, sources=sources, audio_window_seconds=audio_window_seconds,
                                       **config_kwargs)
    # the feature extractor pads to the (possibly shortened) Whisper window
    audio_kwargs = {"chunk_length": int(audio_window_seconds)} if audio_window_seconds else {}
    processor = AltMoEProcessor(
        tokenizer=AutoTokenizer.from_pretrained(paths["text"]) if "text" in paths else None,
        image_processor=AutoImageProcessor.from_pretrained(paths["vision"]) if "vision" in paths else None,
        feature_extractor=AutoFeatureExtractor.from_pretrained(paths["audio"], **audio_kwargs) if "audio" in paths else None,
        text_template=text_template,
    )
    return model, processor


def build_alt_moe(*, text=None, vision=None, audio=None, output_dir, connector_only=False, num_experts=8, top_k=2,
                  **config_kwargs) -> Path:
    """Writes the checkpoint and processor to a temp folder, then renames it into place."""
    model, processor = alt_moe_from_names(text, vision, audio, num_experts=num_experts, num_experts_per_tok=top_k,
                                          **config_kwargs)
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is meant to be shared
    try:
        model.save_pretrained(tmp, connector_only=connector_only)
        processor.save_pretrained(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir
