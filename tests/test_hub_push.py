"""End to end: `multimodal-moe push` to a local Hub server (tests/hub_server.py), then
`AutoModel.from_pretrained("org/name", trust_remote_code=True)` from it in a process without multimodal_moe."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hub_server import LocalHub
from hub_utils import run_without_package
from test_alt_moe import TEXTS, batch, make, processor

REPO = "tiny-org/alt-moe-tiny"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with LocalHub(max_seconds=240) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")  # the fake Hub ignores it; real writes need one
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server


def _cli_runs(*argvs, cwd):
    """`multimodal-moe` commands run one after the other in ONE fresh process (huggingface_hub reads HF_ENDPOINT at
    import; one process instead of one per command saves the ~5-10 s import of torch + transformers)."""
    code = (
        "import sys\nfrom multimodal_moe.cli import main\n"
        f"for argv in {[list(a) for a in argvs]!r}:\n"
        "    print('=== run', flush=True)\n"
        "    if main(argv):\n"
        "        sys.exit(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, HF_HUB_OFFLINE="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [out.split() for out in proc.stdout.split("=== run")[1:]]


def test_push_then_pull_through_a_local_hub(hub, tmp_path):
    model, proc = make(), processor()
    with torch.no_grad():
        expected = model("text", "vision", **batch()).logits_per_query
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    results = {"heldout_pairs": 3, "moe": {"text_to_vision": {"R@1": 1.0, "R@5": 1.0}}}
    (tmp_path / "results.json").write_text(json.dumps(results))  # the demo layout: results.json beside the model

    ckpt = str(tmp_path / "ckpt")
    dry, sent, _ = _cli_runs(
        ["push", ckpt, REPO, "--dry-run"],
        ["push", ckpt, REPO, "--base-model", "facebook/dinov2-small", "--private"],
        ["push", ckpt, REPO, "--revision", "v1"],  # again: create_repo(exist_ok=True), then create_branch
        cwd=tmp_path,
    )
    assert sent == dry and hub.repos[REPO].private
    files = hub.files(REPO)
    assert set(files) == set(sent) and "model.safetensors" in files and "modeling_alt_moe.py" in files
    assert json.loads(files["results.json"]) == results
    assert b"trust_remote_code=True" in files["README.md"] and b"recall_at_1" in files["README.md"]
    assert set(hub.files(REPO, "v1")) == set(sent)
    assert [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]] == [
        ("POST", f"/api/models/{REPO}/commit/main", 200), ("POST", f"/api/models/{REPO}/commit/v1", 200)]

    result = run_without_package(
        f"""
        import os
        os.environ["HF_HUB_OFFLINE"] = "0"  # hub_utils pins offline mode; this child downloads from the local Hub
        import json, numpy as np, torch
        from PIL import Image
        from huggingface_hub import ModelCard
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({REPO!r}, trust_remote_code=True, revision="v1").eval()
        proc = AutoProcessor.from_pretrained({REPO!r}, trust_remote_code=True, revision="v1")
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8), "RGB") for _ in range(3)]
        with torch.no_grad():
            out = model("text", "vision", **proc(text={TEXTS!r}, images=images))
        card = ModelCard.load({REPO!r})
        print(json.dumps({{"logits": out.logits_per_query.tolist(), "module": type(model).__module__,
                          "tags": card.data.tags, "endpoint": os.environ["HF_ENDPOINT"]}}))
        """,
        cwd=tmp_path,
    )
    assert result["endpoint"] == hub.url and "multimodal_moe" not in result["module"]
    assert "custom_code" in result["tags"]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert hub.unhandled == [], hub.unhandled


def test_pushed_config_drops_local_paths(tmp_path):
    import json

    from multimodal_moe.model_cards.push import _public_config

    config = {"model_type": "alt_moe", "backbone_sources": {
        "text": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "revision": None, "local_path": "/root/x"}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    public = json.loads(_public_config(tmp_path / "config.json"))
    assert public["backbone_sources"]["text"] == {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
                                                  "revision": None}
