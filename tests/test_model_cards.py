"""Model cards and `multimodal-moe push`: card metadata, the card's usage snippet run without the package, pickle
refusal and --dry-run (the upload round trip through a local Hub server is in test_hub_push.py)."""

import json

import pytest
import torch
from huggingface_hub import ModelCard

from hub_utils import run_without_package
from multimodal_moe.cli import main
from multimodal_moe.model_cards.card import (
    base_models_from_config,
    build_model_card,
    eval_results_from_json,
    extract_usage_code,
)
from multimodal_moe.model_cards.push import push_checkpoint
from test_alt_moe import make, processor

RESULTS = {  # the layout of the demo's results.json (the parts the card reads)
    "heldout_pairs": 20,
    "chance": {"R@1": 0.05},
    "moe": {"text_to_vision": {"R@1": 0.5, "R@5": 0.9, "median_rank": 2.0},
            "vision_to_text": {"R@1": 0.45, "R@5": 0.85, "median_rank": 2.5}},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("card") / "ckpt"
    make().save_pretrained(path)
    processor().save_pretrained(path)
    return path


def test_card_metadata_parses_back(checkpoint, tmp_path):
    card = build_model_card(checkpoint, RESULTS, base_models=["facebook/dinov2-small"], datasets=["emoji-offline"],
                            repo_id="org/alt-moe-tiny")
    card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data
    meta = data.to_dict()
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "feature-extraction"
    assert {"custom_code", "mixture-of-experts"} <= set(meta["tags"])
    assert meta["base_model"] == ["facebook/dinov2-small"] and meta["datasets"] == ["emoji-offline"]
    results = {(r.metric_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert results[("text_to_vision", "recall_at_1")] == 0.5 and results[("vision_to_text", "median_rank")] == 2.5
    assert len(data.eval_results) == 6 and data.model_name == "alt-moe-tiny"
    assert {r.dataset_split for r in data.eval_results} == {"heldout"}
    text = card.text
    assert "trust_remote_code=True" in text and "pin" in text and "revision" in text
    assert "| text_to_vision | 0.5 | 0.9 | 2 |" in text


def test_eval_results_from_eval_json():
    results = eval_results_from_json({
        "benchmark": "emoji-retrieval", "task_type": "cross-modal-retrieval",
        "dataset": {"name": "Emoji", "type": "emoji-retrieval", "split": "heldout"},
        "metrics": {"text_to_vision": {"recall@1": 0.25, "recall@10": 1.0, "mean_reciprocal_rank": 0.5}},
    })
    assert [(r.metric_type, r.metric_value) for r in results] == [
        ("recall_at_1", 0.25), ("recall_at_10", 1.0), ("mean_reciprocal_rank", 0.5)]
    with pytest.raises(ValueError, match="unrecognised results JSON"):
        eval_results_from_json({"foo": 1})


def test_base_models_default_to_the_backbone_hub_ids(tmp_path):
    config = {"backbone_sources": {
        "text": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "local_path": "/somewhere/minilm"},
        "vision": {"name_or_path": str(tmp_path)},  # a local folder: not a Hub id
        "audio": {"name_or_path": "openai/whisper-tiny.en", "revision": None},
    }}
    assert base_models_from_config(config) == ["sentence-transformers/all-MiniLM-L6-v2", "openai/whisper-tiny.en"]
    assert base_models_from_config({}) == []


def test_card_usage_snippet_runs_without_the_package(checkpoint, tmp_path):
    card = build_model_card(checkpoint, None, base_models=None, datasets=None, repo_id="org/alt-moe-tiny")
    assert "model-index" not in card.data.to_dict()
    code = extract_usage_code(card)
    assert 'repo_id = "org/alt-moe-tiny"' in code and "trust_remote_code=True, revision=revision" in code
    code = code.replace('repo_id = "org/alt-moe-tiny"', f"repo_id = {str(checkpoint)!r}")
    result = run_without_package(
        "import json\n" + code + '\nprint(json.dumps({"scores": scores.tolist(), "module": type(model).__module__}))',
        cwd=tmp_path,
    )
    assert "multimodal_moe" not in result["module"]
    scores = torch.tensor(result["scores"])
    assert scores.shape == (3, 3) and torch.all(scores.abs() <= 1 + 1e-5)  # cosine similarities


def test_push_refuses_pickle_checkpoints(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    torch.save({"w": torch.zeros(1)}, bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle files \(pytorch_model.bin\)"):
        push_checkpoint(bad, "org/name", dry_run=True)
    assert main(["push", str(bad), "org/name", "--dry-run"]) == 2  # one clear line from the CLI
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        push_checkpoint(tmp_path, "org/name", dry_run=True)
    with pytest.raises(ValueError, match="org/name"):
        push_checkpoint(checkpoint, "no-org", dry_run=True)


def test_push_dry_run_lists_files_and_sends_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError("dry run must not reach the Hub")

    monkeypatch.setattr(huggingface_hub, "create_repo", fail)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fail)
    (checkpoint / "__pycache__").mkdir(exist_ok=True)
    (checkpoint / "__pycache__" / "x.pyc").write_bytes(b"")
    assert main(["push", str(checkpoint), "org/name", "--dry-run", "--results", str(_results_file(tmp_path))]) == 0
    listed = capsys.readouterr().out.split()
    assert {"config.json", "model.safetensors", "modeling_alt_moe.py", "processor_config.json",
            "tokenizer/tokenizer.json", "README.md", "results.json"} <= set(listed)
    assert not any("__pycache__" in f for f in listed)
    assert not (checkpoint / "README.md").exists()  # nothing written either


def _results_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    return path
