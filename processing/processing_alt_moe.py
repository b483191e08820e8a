# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""AltMoEProcessor: the backbones' tokenizer, image processor and audio feature extractor behind one call.

Hub-safe: imports only transformers (and numpy, which transformers requires).
"""

from __future__ import annotations

import json
import os

import numpy as np
from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer
from transformers.dynamic_module_utils import custom_object_save
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


PROCESSOR_CONFIG = "processor_config.json"
# Each part is saved in its own subfolder: an image processor and an audio feature extractor would otherwise both
# claim `preprocessor_config.json`.
PARTS = {"tokenizer": AutoTokenizer, "image_processor": AutoImageProcessor, "feature_extractor": AutoFeatureExtractor}


class AltMoEProcessor(ProcessorMixin):
    r"""
    Bundles the processors of an Alt-MoE model's backbones. Any two or three of them may be present, so unlike
    ProcessorMixin's default every part is optional.

    Args:
        tokenizer: the text backbone's tokenizer (a pad token is set to EOS when it has none, as causal LMs often do).
        image_processor: the vision backbone's image processor.
        feature_extractor: the audio backbone's feature extractor.
        text_template (`str`, *optional*): format string applied to every text, e.g. "an emoji of a {text}".
    """

    def __init__(self, tokenizer=None, image_processor=None, feature_extractor=None, text_template=None, **kwargs):
        # Deliberately not calling ProcessorMixin.__init__: it insists on every declared part being present.
        self.chat_template = kwargs.pop("chat_template", None)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.feature_extractor = feature_extractor
        self.text_template = text_template
        if text_template is not None and "{text}" not in text_template:
            raise ValueError(f"text_template must contain '{{text}}', got {text_template!r}")

    def __call__(self, text=None, images=None, audio=None, sampling_rate=None, return_tensors="pt", **kwargs):
        """Returns a BatchFeature with `input_ids`/`attention_mask` (text), `pixel_values` (images) and
        `input_features` or `input_values` plus `audio_attention_mask` (audio)."""
        if text is None and images is None and audio is None:
            raise ValueError("give at least one of text, images or audio")
        data = {}
        if text is not None:
            data.update(self._text(text, return_tensors, **kwargs))
        if images is not None:
            data.update(self._images(images, return_tensors))
        if audio is not None:
            data.update(self._audio(audio, sampling_rate, return_tensors))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _text(self, text, return_tensors, padding=True, truncation=True, max_length=None):
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer: the model has no text backbone")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        if self.text_template is not None:
            texts = [self.text_template.format(text=t) for t in texts]
        return self.tokenizer(
            texts, padding=padding, truncation=truncation, max_length=max_length, return_tensors=return_tensors
        )

    def _images(self, images, return_tensors):
        if self.image_processor is None:
            raise ValueError("this processor has no image processor: the model has no vision backbone")
        images = images if isinstance(images, (list, tuple)) else [images]
        for i, image in enumerate(images):
            mode = getattr(image, "mode", None)
            if mode is not None and mode != "RGB":
                raise ValueError(f"image {i} has mode {mode!r}; expected 'RGB' (use image.convert('RGB'))")
            shape = getattr(image, "shape", None)
            if mode is None and shape is not None and not (len(shape) == 3 and 3 in (shape[0], shape[-1])):
                raise ValueError(f"image {i} has shape {tuple(shape)}; expected (H, W, 3) or (3, H, W) RGB")
        return self.image_processor(images, return_tensors=return_tensors)

    def _audio(self, audio, sampling_rate, return_tensors):
        extractor = self.feature_extractor
        if extractor is None:
            raise ValueError("this processor has no feature extractor: the model has no audio backbone")
        expected = extractor.sampling_rate
        if sampling_rate is None:
            raise ValueError(f"pass sampling_rate with audio (this backbone expects {expected} Hz)")
        if sampling_rate != expected:
            raise ValueError(f"audio sampled at {sampling_rate} Hz; this backbone expects {expected} Hz (resample)")
        clips = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else list(audio)
        longest = getattr(extractor, "n_samples", None)  # Whisper encodes at most 30 s
        for i, clip in enumerate(clips):
            if np.asarray(clip).ndim != 1:
                raise ValueError(f"audio clip {i} must be 1-D mono samples, got shape {np.asarray(clip).shape}")
            if longest and len(clip) > longest:
                raise ValueError(
                    f"audio clip {i} is {len(clip) / expected:.1f} s; this backbone takes at most {longest / expected:.0f} s"
                )
        out = extractor(
            clips, sampling_rate=sampling_rate, return_attention_mask=True, padding=_audio_padding(extractor),
            return_tensors=return_tensors,
        )
        out = dict(out)
        if "attention_mask" in out:
            out["audio_attention_mask"] = out.pop("attention_mask")
        return out

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        config = {"processor_class": type(self).__name__, "text_template": self.text_template, "parts": []}
        for name in PARTS:
            part = getattr(self, name)
            if part is not None:
                part.save_pretrained(os.path.join(save_directory, name))
                config["parts"].append(name)
        if self._auto_class is not None:
            custom_object_save(self, save_directory, config=config)  # copies this file, writes auto_map
        with open(os.path.join(save_directory, PROCESSOR_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        if push_to_hub:
            raise NotImplementedError("use `multimodal-moe push` or huggingface_hub.upload_folder on the directory")
        return [os.path.join(save_directory, PROCESSOR_CONFIG)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        from transformers.utils import cached_file

        kwargs.pop("trust_remote_code", None)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        path = cached_file(pretrained_model_name_or_path, PROCESSOR_CONFIG, **hub_kwargs)
        with open(path) as f:
            config = json.load(f)
        parts = {
            name: PARTS[name].from_pretrained(pretrained_model_name_or_path, subfolder=name, **hub_kwargs)
            for name in config.get("parts", [])
        }
        return cls(**parts, text_template=config.get("text_template"))

    def __repr__(self):
        parts = ", ".join(f"{n}={type(getattr(self, n)).__name__}" for n in PARTS if getattr(self, n) is not None)
        return f"{type(self).__name__}({parts}, text_template={self.text_template!r})"


def _audio_padding(extractor):
    # Whisper's encoder only accepts full 30 s windows; other extractors pad to the longest clip in the batch.
    return "max_length" if getattr(extractor, "n_samples", None) else "longest"


__all__ = ["AltMoEProcessor"]
