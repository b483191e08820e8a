"""Offline paired data: emoji images + captions (fonts-noto-color-emoji), speech (espeak-ng)."""

import os
import shutil
import unicodedata

import numpy as np
import pytest
from PIL import Image

from multimodal_moe.training.data import (
    MissingSystemPackageError, add_speech_column, build_emoji_dataset, read_wav, synthesize,
    train_heldout_split,
)
from multimodal_moe.training.data import emoji, speech

needs_font = pytest.mark.skipif(not os.path.isfile(emoji.FONT_PATH),
                                reason="apt-get install -y fonts-noto-color-emoji")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="apt-get install -y espeak-ng")

N = 20


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    if not os.path.isfile(emoji.FONT_PATH):
        pytest.skip("apt-get install -y fonts-noto-color-emoji")
    return build_emoji_dataset(cache_dir=tmp_path_factory.mktemp("emoji"), image_size=64, limit=N, progress=False)


def test_columns_and_captions(ds):
    assert len(ds) == N
    assert set(ds.column_names) == {"id", "image", "text", "name"}
    assert ds.features["image"].__class__.__name__ == "Image"
    for row in ds:
        assert row["name"] == unicodedata.name(chr(row["id"])).lower()
        assert row["text"] == f"an emoji of a {row['name']}"
    assert ds[0]["id"] == 0x1F300 and ds[0]["name"] == "cyclone"


def test_images_rgb_square_not_blank(ds):
    for row in ds:
        im = row["image"]
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (64, 64)
        x = np.asarray(im)
        assert (x != 255).any(axis=-1).mean() > 0.05  # a real glyph, not white background
        l, t, r, b = Image.fromarray(255 - x).getbbox()
        assert abs((l + r) / 2 - 32) <= 1 and abs((t + b) / 2 - 32) <= 1  # centered


def test_split_is_deterministic(ds):
    a, b = train_heldout_split(ds), train_heldout_split(ds)
    assert a["train"]["id"][:] == b["train"]["id"][:] and a["heldout"]["id"][:] == b["heldout"]["id"][:]
    train, held = set(a["train"]["id"]), set(a["heldout"]["id"])
    assert not train & held and len(train) + len(held) == N and len(held) == round(0.2 * N)
    assert set(train_heldout_split(ds, seed=1)["heldout"]["id"]) != held


@needs_font
def test_cache_is_reused(tmp_path, monkeypatch):
    calls = []
    render = emoji.render_glyph
    monkeypatch.setattr(emoji, "render_glyph", lambda *a: calls.append(1) or render(*a))
    kw = dict(cache_dir=tmp_path, image_size=32, limit=3, progress=False)
    first = build_emoji_dataset(**kw)
    n = len(calls)
    assert n >= 3
    second = build_emoji_dataset(**kw)
    assert len(calls) == n  # loaded from disk, nothing re-rendered
    assert second["id"][:] == first["id"][:]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folders left behind
    build_emoji_dataset(**{**kw, "image_size": 40})  # other params -> other cache entry
    assert len(calls) > n and len(os.listdir(tmp_path)) == 2


def test_missing_font(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "FONT_PATH", str(tmp_path / "nope.ttf"))
    with pytest.raises(MissingSystemPackageError, match="fonts-noto-color-emoji") as e:
        build_emoji_dataset(cache_dir=tmp_path)
    assert "apt-get install -y fonts-noto-color-emoji" in str(e.value)


@needs_espeak
def test_synthesize(tmp_path):
    (clip,) = synthesize(["grinning face"], cache_dir=tmp_path, progress=False)
    assert clip.dtype == np.float32 and clip.ndim == 1
    assert 0.3 < len(clip) / speech.SAMPLE_RATE < 5.0
    assert np.abs(clip).max() > 0.05 and np.sqrt(np.mean(clip ** 2)) > 0.01
    assert len(list(tmp_path.glob("*.npy"))) == 1
    (again,) = synthesize(["grinning face"], cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(clip, again)


@needs_espeak
def test_add_speech_column(ds, tmp_path):
    out = add_speech_column(ds.select(range(2)), cache_dir=tmp_path, progress=False, decode=False)
    assert out.features["audio"].sampling_rate == 16000
    x = read_wav(out[0]["audio"])
    np.testing.assert_allclose(x, synthesize([ds[0]["name"]], cache_dir=tmp_path, progress=False)[0], atol=1e-4)


def test_missing_espeak(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(MissingSystemPackageError, match="apt-get install -y espeak-ng"):
        synthesize(["hello"])
