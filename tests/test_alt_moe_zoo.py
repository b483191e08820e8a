"""Slow: Alt-MoE on the real zoo backbones (PyPI wheels converted once into $MULTIMODAL_MOE_HOME)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import multimodal_moe.modeling  # noqa: F401
from hub_utils import run_without_package
from multimodal_moe.cli import main

pytestmark = pytest.mark.slow


def test_init_alt_moe_checkpoint_loads_without_the_package(tmp_path):
    out = tmp_path / "ckpt"
    assert main(["init", "alt-moe", "--text", "smollm2-135m", "--vision", "dinov2-small", "--output-dir", str(out)]) == 0
    from transformers import AutoModel, AutoProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8), "RGB")
    image.save(tmp_path / "image.png")
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        expected = model("vision", "text", **processor(text=["a red apple"], images=[image])).logits_per_query
    result = run_without_package(
        """
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained("ckpt", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("ckpt", trust_remote_code=True)
        inputs = processor(text=["a red apple"], images=[Image.open("image.png").convert("RGB")])
        with torch.no_grad():
            out = model("vision", "text", **inputs)
            q = model.get_query_embeddings("text", "vision", **inputs)
        print(json.dumps({"logits": out.logits_per_query.tolist(), "norm": q.norm(dim=-1).tolist(),
                          "backbones": {k: type(v).__name__ for k, v in model.backbones.items()}}))
        """,
        cwd=tmp_path,
    )
    assert result["backbones"] == {"text": "LlamaModel", "vision": "Dinov2Model"}
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-4, rtol=1e-4)
    assert abs(result["norm"][0] - 1) < 1e-5


def test_quick_demo_end_to_end(tmp_path):
    from multimodal_moe.training.demo import run_demo

    summary = run_demo(str(tmp_path / "demo"), quick=True, max_steps=30)
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["heldout_pairs"] == summary["heldout_pairs"] > 50
    for method in ("moe", "linear"):
        assert {"text_to_vision", "vision_to_text"} <= set(results[method])
        for scores in results[method].values():
            assert {"R@1", "R@5", "R@10"} <= set(scores)
    # even 30 steps beat chance by a wide margin in both directions
    for direction in ("text_to_vision", "vision_to_text"):
        assert results["moe"][direction]["R@10"] > 3 * results["chance"]["R@10"]
    for png in ("training.png", "expert_usage.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 10_000
    assert (tmp_path / "demo" / "connector" / "model.safetensors").stat().st_size < (
        tmp_path / "demo" / "model" / "model.safetensors"
    ).stat().st_size / 3
