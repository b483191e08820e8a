"""Batches of conversations for Uni-MoE-style models: mixed modalities, loss on the assistant turns only, and a
sampler that groups examples by modality and length.

The collator renders each conversation with the processor's chat template, tokenises it with character offsets
and labels only the tokens inside assistant turns (their text and the end-of-turn marker); the prompt, the media
placeholders and the padding get -100. Offsets rather than a second tokenisation of the prompt: BPE can merge
across the prompt/answer boundary, and offsets stay right whatever the tokenizer does there. Rows may carry
pre-stored encoder states (`training/encoder_states.py`) instead of raw media: they are batched as
`image_encoder_states` / `audio_encoder_states`.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .tasks import load_audio


class UniMoEDataCollator:
    """Conversation rows (`messages`, `images`, `audio`; see `tasks.py`) -> model inputs with `labels`.

    processor: a UniMoEProcessor (chat template, tokenizer with a fast backend, image processor / feature extractor).
    max_length: longest token sequence allowed; longer examples raise (truncation would cut media placeholders).
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length
        if not getattr(processor.tokenizer, "is_fast", False):
            raise ValueError("UniMoEDataCollator needs a fast tokenizer (character offsets for the label mask)")

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text and the character spans (in that text) of the assistant turns."""
        proc, eos = self.processor, self.processor.tokenizer.eos_token
        original = text = proc.apply_chat_template(messages)
        spans, inserted = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(proc.apply_chat_template(messages[:i], add_generation_prompt=True))
            end = len(proc.apply_chat_template(messages[: i + 1]))
            if not original.startswith(proc.apply_chat_template(messages[: i + 1])):
                raise ValueError("the chat template renders a conversation's prefix differently from the whole; "
                                 "the collator can't find the assistant turns")
            start, end = start + inserted, end + inserted
            if eos and eos not in text[start:end]:
                # A template without an end-of-turn token (the default one): learn to stop with eos.
                text = text[:end] + eos + text[end:]
                end += len(eos)
                inserted += len(eos)
            spans.append((start, end))
        return text, spans

    def _expanded_position(self, text: str, position: int) -> int:
        """Where character `position` of `text` lands once the placeholders are expanded into repeated tokens."""
        prefix = text[:position]
        extra = 0
        for modality in ("image", "video", "audio"):
            token = getattr(self.processor, f"{modality}_token")
            n = prefix.count(token)
            if n:
                extra += n * len(token) * (self.processor._seq_length(modality) - 1)
        return position + extra

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts, spans = [], []
        for row in rows:
            text, row_spans = self.render(row["messages"])
            texts.append(text)
            spans.append([(self._expanded_position(text, s), self._expanded_position(text, e)) for s, e in row_spans])
        self.processor.tokenizer.padding_side = "right"  # labels line up with the text; generation sets "left"
        if any(column in rows[0] for column in ("image_states", "audio_states")):
            batch = self._tokenize_with_stored_states(rows, texts)
        else:
            images = [im.convert("RGB") for row in rows for im in (row.get("images") or [])]
            audio = [load_audio(a) for row in rows for a in (row.get("audio") or [])]
            batch = self.processor(text=texts, images=images or None, audio=audio or None,
                                   return_offsets_mapping=True, padding=True)
        offsets = batch.pop("offset_mapping")  # (batch, seq, 2) character spans in the expanded texts
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            raise ValueError(f"a batch needs {batch['input_ids'].shape[1]} tokens, more than max_length="
                             f"{self.max_length}; drop or shorten the long examples")
        labels = torch.full_like(batch["input_ids"], -100)
        starts = offsets[..., 0]
        for b, row_spans in enumerate(spans):
            keep = torch.zeros_like(starts[b], dtype=torch.bool)
            for s, e in row_spans:
                keep |= (starts[b] >= s) & (starts[b] < e)
            keep &= batch["attention_mask"][b].bool() & (offsets[b, :, 1] > offsets[b, :, 0])  # no pad / empty tokens
            labels[b, keep] = batch["input_ids"][b, keep]
        batch["labels"] = labels
        return dict(batch)

    def _tokenize_with_stored_states(self, rows: list[dict], texts: list[str]) -> dict:
        """Rows from `prestore_encoder_states`: the frozen encoders' outputs ride along instead of raw media."""
        batch = dict(self.processor.tokenizer(self.processor.expand_placeholders(texts), padding=True,
                                              return_tensors="pt", return_offsets_mapping=True))
        for column, arg in (("image_states", "image_encoder_states"), ("audio_states", "audio_encoder_states")):
            states = [np.asarray(row[column]) for row in rows if column in row and len(row[column])]
            if states:
                batch[arg] = torch.from_numpy(np.concatenate(states)).float()  # (items, encoder tokens, d)
        return batch


def modality_length_grouped_indices(modalities: list[str], lengths: list[int], batch_size: int, *, seed: int = 0,
                                    megabatch: int = 8) -> list[int]:
    """An epoch's order: batches of one modality each, lengths similar inside a batch, batches in random order.

    Per modality: shuffle, cut into megabatches of `megabatch * batch_size`, sort each by length (longest first) and
    cut into batches; then all batches are shuffled together. Homogeneous batches waste no encoder calls or padding.
    """
    rng = random.Random(seed)
    by_modality: dict[str, list[int]] = {}
    for i, m in enumerate(modalities):
        by_modality.setdefault(m, []).append(i)
    batches = []
    for modality in sorted(by_modality):
        idx = by_modality[modality]
        rng.shuffle(idx)
        for k in range(0, len(idx), megabatch * batch_size):
            mega = sorted(idx[k:k + megabatch * batch_size], key=lambda i: -lengths[i])
            batches += [mega[j:j + batch_size] for j in range(0, len(mega), batch_size)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """`modality_length_grouped_indices` as a Sampler; a new order each epoch (`set_epoch`, called by Trainer)."""

    def __init__(self, modalities, lengths, batch_size: int, seed: int = 0):
        self.modalities, self.lengths, self.batch_size, self.seed = list(modalities), list(lengths), batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.modalities)

    def __iter__(self):
        return iter(modality_length_grouped_indices(self.modalities, self.lengths, self.batch_size,
                                                    seed=self.seed + self.epoch))


def conversation_lengths(data) -> list[int]:
    """A cheap length proxy per row (characters of the conversation, placeholders counted once) for grouping."""
    return [int(np.sum([len(m["content"]) for m in msgs])) for msgs in data["messages"]]


__all__ = ["ModalityLengthGroupedSampler", "UniMoEDataCollator", "conversation_lengths",
           "modality_length_grouped_indices"]
