"""Tiny random backbones, tokenizer and processors for the fast suite (no downloads)."""

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BitImageProcessorPil,
    Dinov2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
)

WORDS = "a an the of emoji red green blue apple face cat dog smiling grinning heart star sun moon".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[SEP]")


def tiny_image_processor() -> BitImageProcessorPil:
    return BitImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


def tiny_feature_extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=16)


def backbone_configs(kind_text: str = "bert") -> dict:
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    if kind_text == "bert":
        text = BertConfig(vocab_size=len(WORDS) + 4, max_position_embeddings=64, **common)
    else:
        text = LlamaConfig(vocab_size=len(WORDS) + 4, max_position_embeddings=64, num_key_value_heads=2, **common)
    vision = Dinov2Config(image_size=28, patch_size=14, **common)
    audio = WhisperConfig(
        d_model=24, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=16, vocab_size=64, max_source_positions=1500,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    return {"text_config": text, "vision_config": vision, "audio_config": audio}


def tiny_images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8), "RGB") for _ in range(n)]


def tiny_audio(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(16000 * (i + 1) // 4).astype(np.float32) * 0.1 for i in range(n)]
