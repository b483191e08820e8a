# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Uni-MoE processor: tokenizer + image processor + audio feature extractor, placeholder expansion, chat template.

Hub-safe: imports only transformers (and numpy/torch through it).
"""

from __future__ import annotations

import torch
from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


# Role markers around each turn; list contents become text with placeholders, e.g. "<|user|>\n<image>\nWhat is it?\n".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% else %}{{ '<' + item['type'] + '>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MEDIA_MODALITIES = ("image", "video", "audio")


class UniMoEProcessor(ProcessorMixin):
    r"""
    Turns text with `<image>`, `<video>` and `<audio>` placeholders plus the media into
    [`UniMoEForConditionalGeneration`] inputs: each placeholder is expanded into as many placeholder tokens as the
    model's connector outputs for it (`image_seq_length`, `video_seq_length`, `audio_seq_length`, taken from the model
    config); images go through the image processor (`pixel_values`), videos frame by frame (`pixel_values_videos`,
    (videos, frames, 3, H, W)), audio through the feature extractor (`input_features`, one 30 s Whisper window per
    clip).

    Args:
        tokenizer: the LLM's tokenizer, holding the placeholder tokens. Without a pad token, eos is used.
        image_processor (*optional*): for images and video frames; None for a model without a vision encoder.
        feature_extractor (*optional*): Whisper feature extractor; None for a model without an audio encoder.
        chat_template (`str`, *optional*): Jinja template; defaults to the tokenizer's, else a simple one with
            `<|role|>` markers.
        image_token, video_token, audio_token (`str`): the placeholders.
        image_seq_length, video_seq_length, audio_seq_length (`int`, *optional*): tokens per placeholder.
    """

    def __init__(
        self,
        tokenizer=None,
        image_processor=None,
        feature_extractor=None,
        chat_template=None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        audio_token: str = "<audio>",
        image_seq_length: int | None = None,
        video_seq_length: int | None = None,
        audio_seq_length: int | None = None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("UniMoEProcessor needs a tokenizer")
        # ProcessorMixin.__init__ insists on every sub-processor; here image_processor / feature_extractor are
        # optional (a model may lack that encoder), so the attributes are set directly, type-checked when present.
        for name, value in (("tokenizer", tokenizer), ("image_processor", image_processor),
                            ("feature_extractor", feature_extractor)):
            if value is not None:
                self.check_argument_for_proper_class(name, value)
            setattr(self, name, value)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        self.image_token, self.video_token, self.audio_token = image_token, video_token, audio_token
        self.image_seq_length = image_seq_length
        self.video_seq_length = video_seq_length if video_seq_length is not None else image_seq_length
        self.audio_seq_length = audio_seq_length
        vocab = tokenizer.get_vocab()
        self.image_token_id = vocab.get(image_token)
        self.video_token_id = vocab.get(video_token)
        self.audio_token_id = vocab.get(audio_token)

    # -- save / load with optional sub-processors ----------------------------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs):
        # ProcessorMixin saves every sub-processor named in __init__; skip the absent ones (None) for this call.
        present = [a for a in type(self).get_attributes() if getattr(self, a, None) is not None]
        self.get_attributes = lambda: present
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            del self.get_attributes

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # processor_config.json holds each present sub-processor's config and null for an absent one.
        args = []
        for name in cls.get_attributes():
            if name == "tokenizer":
                args.append(AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs))
                continue
            auto_cls = AutoImageProcessor if name == "image_processor" else AutoFeatureExtractor
            if processor_dict is not None and processor_dict.get(name) is None:
                args.append(None)
            elif processor_dict is not None:
                args.append(auto_cls.from_pretrained(pretrained_model_name_or_path, **kwargs))
            else:
                try:
                    args.append(auto_cls.from_pretrained(pretrained_model_name_or_path, **kwargs))
                except (OSError, ValueError, KeyError):
                    args.append(None)
        return args

    @property
    def model_input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"]
        if self.image_processor is not None:
            names += ["pixel_values", "pixel_values_videos"]
        if self.feature_extractor is not None:
            names.append("input_features")
        return names

    # -- main call -----------------------------------------------------------------------------------------------------
    def __call__(
        self,
        images=None,
        text=None,
        videos=None,
        audio=None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        padding=True,
        **kwargs,
    ) -> BatchFeature:
        """Expands the placeholders of `text` (str or list of str) and processes the media, in placeholder order.

        images: an image or a list of images (any nesting per sample is flattened); videos: a video (a list of frames
        or an array (frames, H, W, 3)) or a list of videos, all with the same frame count; audio: a 1-D waveform or a
        list of them, at the feature extractor's sampling rate. Other kwargs go to the tokenizer.
        """
        if text is None:
            raise ValueError("UniMoEProcessor needs `text` holding one placeholder per image / video / audio input")
        texts = [text] if isinstance(text, str) else list(text)
        media = {"image": _flatten_images(images), "video": _as_video_list(videos), "audio": _as_audio_list(audio)}
        counts = {m: sum(t.count(self._token(m)) for t in texts) for m in MEDIA_MODALITIES}
        for modality in MEDIA_MODALITIES:
            self._check_counts(modality, counts[modality], media[modality])

        data = {}
        if media["image"]:
            data["pixel_values"] = self.image_processor(media["image"], return_tensors="pt")["pixel_values"]
        if media["video"]:
            frames = [self.image_processor(list(v), return_tensors="pt")["pixel_values"] for v in media["video"]]
            if len({f.shape for f in frames}) > 1:
                raise ValueError(
                    "all videos of a batch must have the same frame count and size, got "
                    f"{[tuple(f.shape) for f in frames]}"
                )
            data["pixel_values_videos"] = torch.stack(frames)  # (videos, frames, 3, H, W)
        if media["audio"]:
            data["input_features"] = self._audio_features(media["audio"], sampling_rate)

        expanded = self.expand_placeholders(texts)
        text_inputs = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **kwargs)

        for modality in MEDIA_MODALITIES:
            if counts[modality]:
                token_id = getattr(self, f"{modality}_token_id")
                found = sum(list(row).count(token_id) for row in _rows(text_inputs["input_ids"]))
                wanted = len(media[modality]) * self._seq_length(modality)
                if found != wanted:
                    raise ValueError(
                        f"{modality} token count mismatch after tokenization: {found} {self._token(modality)} tokens, "
                        f"expected {wanted}; the tokenizer must keep {self._token(modality)} as one special token"
                    )
        return BatchFeature(data={**text_inputs, **data}, tensor_type=return_tensors)

    def expand_placeholders(self, texts: list[str]) -> list[str]:
        """Each `<image>` / `<video>` / `<audio>` repeated as many times as the model has tokens for one item (what
        `__call__` tokenises; a collator feeding pre-stored encoder states tokenises this itself)."""
        expanded = []
        for t in texts:
            for modality in MEDIA_MODALITIES:
                token = self._token(modality)
                if token in t:
                    t = t.replace(token, token * self._seq_length(modality))
            expanded.append(t)
        return expanded

    def _token(self, modality: str) -> str:
        return getattr(self, f"{modality}_token")

    def _seq_length(self, modality: str) -> int:
        n = getattr(self, f"{modality}_seq_length")
        if n is None:
            raise ValueError(f"{modality}_seq_length is not set: can't expand {self._token(modality)} placeholders")
        return n

    def _check_counts(self, modality: str, n_placeholders: int, items: list) -> None:
        token, plural = self._token(modality), {"image": "images", "video": "videos", "audio": "audio clips"}[modality]
        if items and (self.image_processor if modality != "audio" else self.feature_extractor) is None:
            sub = "image_processor" if modality != "audio" else "feature_extractor"
            raise ValueError(f"this processor has no {sub}: it can't take {plural}")
        if n_placeholders and not items:
            raise ValueError(f"the text has {n_placeholders} {token} placeholder(s) but no {plural} were passed")
        if len(items) > n_placeholders:
            raise ValueError(f"more {plural} ({len(items)}) than {token} placeholders ({n_placeholders}) in the text")
        if len(items) < n_placeholders:
            raise ValueError(f"fewer {plural} ({len(items)}) than {token} placeholders ({n_placeholders}) in the text")
        if items and getattr(self, f"{modality}_token_id") is None:
            raise ValueError(f"the tokenizer has no {token} token: add it (UniMoEForConditionalGeneration."
                             "from_pretrained_parts(tokenizer=...) does)")

    def _audio_features(self, clips: list, sampling_rate: int | None):
        fe = self.feature_extractor
        rate = fe.sampling_rate
        if sampling_rate is not None and sampling_rate != rate:
            raise ValueError(f"audio must be sampled at {rate} Hz (the feature extractor's rate), got {sampling_rate}")
        max_samples = getattr(fe, "n_samples", None)
        for i, clip in enumerate(clips):
            if max_samples is not None and len(clip) > max_samples:
                raise ValueError(
                    f"audio longer than supported: clip {i} lasts {len(clip) / rate:.2f} s, the audio encoder takes at "
                    f"most {max_samples / rate:g} s per <audio>; split it into several clips"
                )
        return fe(clips, sampling_rate=rate, return_tensors="pt")["input_features"]

    # -- chat ----------------------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        images=None,
        videos=None,
        audio=None,
        return_tensors: str | None = "pt",
        **kwargs,
    ):
        """Renders a conversation (or a list of conversations) with the chat template.

        Message contents are strings or lists of items `{"type": "text", "text": ...}`, `{"type": "image"}`,
        `{"type": "video"}`, `{"type": "audio"}`; items become text with placeholders before rendering, so any
        string-only template (the tokenizer's) works. With `tokenize=True` the rendered text and the media go through
        `__call__` and a `BatchFeature` is returned; otherwise the rendered string(s).
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        rendered = []
        for conv in conversations:
            messages = [{**m, "content": self._flatten_content(m["content"])} for m in conv]
            rendered.append(
                self.tokenizer.apply_chat_template(
                    messages,
                    chat_template=chat_template or self.chat_template,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                    **kwargs,
                )
            )
        if not tokenize:
            return rendered if batched else rendered[0]
        return self(text=rendered, images=images, videos=videos, audio=audio, return_tensors=return_tensors)

    def _flatten_content(self, content) -> str:
        if isinstance(content, str):
            return content
        parts = []
        for item in content:
            kind = item.get("type")
            if kind == "text":
                parts.append(item["text"])
            elif kind in MEDIA_MODALITIES:
                parts.append(self._token(kind))
            else:
                raise ValueError(
                    f"unknown modality {kind!r} in a chat message: expected 'text' or one of {MEDIA_MODALITIES}"
                )
        return "".join(parts)


def _flatten_images(images) -> list:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    out = []
    for item in images:
        out.extend(_flatten_images(item) if isinstance(item, (list, tuple)) else [item])
    return out


def _as_video_list(videos) -> list:
    if videos is None:
        return []
    if isinstance(videos, (list, tuple)) and videos and isinstance(videos[0], (list, tuple)):
        return list(videos)  # list of videos, each a list of frames
    if isinstance(videos, (list, tuple)):
        # a list of (frames, H, W, 3) arrays, or one video given as a list of frames
        return list(videos) if getattr(videos[0], "ndim", 0) == 4 else [list(videos)]
    return [videos] if getattr(videos, "ndim", 0) == 4 else list(videos)


def _as_audio_list(audio) -> list:
    if audio is None:
        return []
    if isinstance(audio, (list, tuple)) and audio and getattr(audio[0], "ndim", 1) >= 1 and not isinstance(
        audio[0], (int, float)
    ):
        return list(audio)
    return [audio]


def _rows(input_ids):
    return input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids


__all__ = ["UniMoEProcessor"]
