"""Tiny pretrained-part folders (LLM + tokenizer, DINOv2, Whisper) for tests of the Uni-MoE / Omni-SMoLA training
pipelines on the real offline task data: a byte-level BPE tokenizer trained on the tasks' words with ChatML markers,
a 2-layer Llama, a 1-layer DINOv2 and Whisper. Built in about a second; random weights."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BitImageProcessorPil,
    Dinov2Config,
    Dinov2Model,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from multimodal_moe.training.data.tasks import FASHION_CLASSES, PROMPTS

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = list(PROMPTS.values()) + FASHION_CLASSES + [
    "face smiling grinning heart star sun moon cat dog red green blue apple hand with of and the a man woman",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def save_tiny_parts(root, seed: int = 0) -> dict[str, str]:
    """Writes llm/, vision/, audio/ under `root`; returns their paths (build_uni_moe's llm / vision / audio)."""
    root = Path(root)
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    llm.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    Dinov2Model(Dinov2Config(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=37)).save_pretrained(root / "vision")
    BitImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(
        root / "vision")
    WhisperModel(WhisperConfig(
        d_model=24, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=16, vocab_size=64, max_source_positions=1500,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )).save_pretrained(root / "audio")
    WhisperFeatureExtractor(feature_size=16).save_pretrained(root / "audio")
    return {"llm": str(root / "llm"), "vision": str(root / "vision"), "audio": str(root / "audio")}
