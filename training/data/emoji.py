"""Offline image-text pairs: every emoji in Debian's Noto Color Emoji font, captioned by its Unicode name.

    ds = build_emoji_dataset()            # ~1,160 rows: id, image (RGB PIL), text, name
    splits = train_heldout_split(ds)      # DatasetDict(train=..., heldout=...)

Needs the Debian package fonts-noto-color-emoji. The built dataset is cached on disk.
"""

import hashlib
import json
import os
import shutil
import tempfile
import unicodedata
from pathlib import Path

import datasets
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .errors import MissingSystemPackageError

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_PACKAGE = "fonts-noto-color-emoji"
FONT_SIZE = 109  # a bitmap (CBDT) font: FreeType only loads it at its one strike size
CODEPOINTS = range(0x1F300, 0x1FB00)  # Misc Symbols & Pictographs .. Symbols & Pictographs Ext-A
FORMAT_VERSION = 1  # bump when the rendering changes, so old caches are not reused

FEATURES = datasets.Features({
    "id": datasets.Value("int32"),
    "image": datasets.Image(),
    "text": datasets.Value("string"),
    "name": datasets.Value("string"),
})


def data_home() -> Path:
    """Root of the offline data caches: $MULTIMODAL_MOE_HOME/data, default ~/.cache/multimodal_moe/data."""
    home = os.environ.get("MULTIMODAL_MOE_HOME") or os.path.join("~", ".cache", "multimodal_moe")
    return Path(home).expanduser() / "data"


def render_glyph(font, char: str, image_size: int):
    """Draw one glyph centered on a white image_size x image_size RGB square; None if the font lacks it."""
    side = 2 * max(font.getbbox(char)[2:])  # generous canvas so nothing is clipped
    rgba = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).text((side // 2, side // 2), char, font=font, embedded_color=True, anchor="mm")
    box = rgba.getchannel("A").getbbox()
    if box is None:  # missing glyphs render as nothing at all
        return None
    ink = rgba.crop(box)
    if max(ink.size) > image_size:  # only ever shrink: the font's bitmaps are ~136 px
        ink.thumbnail((image_size, image_size), Image.LANCZOS)
    out = Image.new("RGB", (image_size, image_size), "white")
    out.paste(ink, ((image_size - ink.width) // 2, (image_size - ink.height) // 2), ink)
    return out


def _render_all(image_size, template, limit, progress):
    font = ImageFont.truetype(FONT_PATH, FONT_SIZE)
    rows = {k: [] for k in FEATURES}
    for cp in tqdm(CODEPOINTS, desc="rendering emoji", disable=not progress):
        if limit is not None and len(rows["id"]) >= limit:
            break
        name = unicodedata.name(chr(cp), "").lower()
        if not name:  # unassigned in this Python's Unicode database
            continue
        image = render_glyph(font, chr(cp), image_size)
        if image is None:
            continue
        rows["id"].append(cp)
        rows["image"].append(image)
        rows["text"].append(template.format(name=name))
        rows["name"].append(name)
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def build_emoji_dataset(*, cache_dir=None, image_size=224, template="an emoji of a {name}",
                        limit=None, progress=True) -> datasets.Dataset:
    """Emoji image-caption pairs, built once and then loaded from <cache_dir>/emoji-<hash of params>.

    cache_dir defaults to data_home(). limit keeps only the first `limit` glyphs (for quick tests).
    """
    if not os.path.isfile(FONT_PATH):
        raise MissingSystemPackageError(FONT_PACKAGE, f"the emoji font {FONT_PATH}")
    params = dict(v=FORMAT_VERSION, image_size=image_size, template=template, limit=limit,
                  font_bytes=os.path.getsize(FONT_PATH), unicode=unicodedata.unidata_version)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else data_home()
    path = root / f"emoji-{key}"
    if path.is_dir():
        return datasets.load_from_disk(str(path))

    ds = _render_all(image_size, template, limit, progress)
    # save to a temp folder, then rename: an interrupted build never looks complete
    root.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".emoji-{key}-")
    try:
        ds.save_to_disk(tmp)
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_dir():  # lost a race with another builder: theirs is as good as ours
            raise
    return datasets.load_from_disk(str(path))


def train_heldout_split(ds, *, heldout_fraction=0.2, seed=0) -> datasets.DatasetDict:
    """Fixed split: rows are ranked by a hash of (seed, id), so it doesn't depend on row order or RNG state."""
    assert 0.0 <= heldout_fraction < 1.0, heldout_fraction
    ranks = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ds["id"]]
    order = sorted(range(len(ds)), key=ranks.__getitem__)
    n_held = round(len(ds) * heldout_fraction)
    return datasets.DatasetDict(
        train=ds.select(sorted(order[n_held:])),
        heldout=ds.select(sorted(order[:n_held])),
    )
