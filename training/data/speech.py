"""Offline speech for captions, synthesised with espeak-ng (Debian package espeak-ng).

    clips = synthesize(["grinning face"])          # [np.ndarray float32, 16 kHz mono]
    ds = add_speech_column(build_emoji_dataset())  # + "audio" column, datasets Audio feature

Clips are cached as .npy files keyed by (text, voice, rate).
"""

import hashlib
import io
import os
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from .emoji import data_home
from .errors import MissingSystemPackageError

SAMPLE_RATE = 16_000  # what Whisper-style audio encoders expect


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise MissingSystemPackageError("espeak-ng", "the espeak-ng program")
    return exe


def read_wav(src) -> np.ndarray:
    """16-bit PCM WAV (path, bytes, or a datasets Audio {"bytes", "path"} dict) -> 16 kHz mono float32.

    Lets you read the audio column without torchcodec: cast it to Audio(decode=False) and call this.
    """
    if isinstance(src, dict):
        src = src["bytes"] if src.get("bytes") is not None else src["path"]
    with wave.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src)) as w:
        assert w.getsampwidth() == 2, "expected 16-bit PCM"
        sr, channels = w.getframerate(), w.getnchannels()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    x = x.reshape(-1, channels).mean(axis=1)
    if sr != SAMPLE_RATE:
        # espeak writes 22,050 Hz. Linear interpolation is a crude resampler, but espeak's formant
        # synthesis has little energy above 8 kHz to alias, and Whisper's log-mel features (80 bins,
        # 25 ms windows, 0-8 kHz) are far too coarse to notice the small high-frequency loss.
        t = np.arange(round(len(x) * SAMPLE_RATE / sr)) * (sr / SAMPLE_RATE)
        x = np.interp(t, np.arange(len(x)), x).astype(np.float32)
    return x


def wav_bytes(x: np.ndarray, sample_rate=SAMPLE_RATE) -> bytes:
    """float32 mono -> 16-bit PCM WAV file bytes."""
    pcm = (np.clip(x, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def _run_espeak(exe, text, voice, rate) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.wav")
        # text goes in on stdin, so a caption starting with "-" is never read as a flag
        subprocess.run([exe, "--stdin", "-v", voice, "-s", str(rate), "-w", out],
                       input=text.encode(), check=True, capture_output=True)
        return read_wav(out)


def synthesize(texts, *, voice="en-us", rate=160, progress=True, cache_dir=None) -> list:
    """Speak each text with espeak-ng; returns 16 kHz mono float32 arrays, in order.

    cache_dir defaults to data_home()/speech. rate is in words per minute.
    """
    exe = _espeak()
    root = Path(cache_dir) if cache_dir is not None else data_home() / "speech"
    root.mkdir(parents=True, exist_ok=True)

    def path(text):
        return root / (hashlib.sha256(f"{voice}\0{rate}\0{text}".encode()).hexdigest()[:24] + ".npy")

    todo = sorted({t for t in texts if not path(t).is_file()})

    def work(text):
        x = _run_espeak(exe, text, voice, rate)
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, x)
        os.replace(tmp, path(text))  # atomic: a half-written clip is never picked up

    # each espeak-ng call is a single-threaded process: two at a time keeps both cores busy
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(tqdm(pool.map(work, todo), total=len(todo), desc="espeak-ng", disable=not progress or not todo))
    return [np.load(path(t)) for t in texts]


def add_speech_column(ds: datasets.Dataset, *, text_column="name", audio_column="audio",
                      decode=None, **kw) -> datasets.Dataset:
    """Add a datasets Audio column (16 kHz) speaking ds[text_column]; **kw goes to synthesize().

    datasets needs torchcodec (+ FFmpeg) to decode Audio. decode=None decodes only if torchcodec is
    installed; otherwise rows hold {"bytes", "path"} WAV dicts: read them with read_wav().
    """
    if decode is None:
        decode = datasets.config.TORCHCODEC_AVAILABLE
    clips = synthesize(list(ds[text_column]), **kw)
    # add raw WAV bytes then cast: encoding via Audio() would itself require torchcodec
    ds = ds.add_column(audio_column, [wav_bytes(x) for x in clips], feature=datasets.Value("binary"))
    return ds.cast_column(audio_column, datasets.Audio(sampling_rate=SAMPLE_RATE, decode=decode))
