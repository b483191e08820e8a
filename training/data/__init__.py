"""Offline, real paired data for multimodal training (system packages, no downloads)."""

from .emoji import build_emoji_dataset, data_home, render_glyph, train_heldout_split
from .errors import MissingSystemPackageError
from .speech import SAMPLE_RATE, add_speech_column, read_wav, synthesize, wav_bytes

__all__ = [
    "MissingSystemPackageError",
    "SAMPLE_RATE",
    "add_speech_column",
    "build_emoji_dataset",
    "data_home",
    "read_wav",
    "render_glyph",
    "synthesize",
    "train_heldout_split",
    "wav_bytes",
]
