"""`multimodal-moe eval`: the offline emoji-retrieval benchmark on a tiny Alt-MoE checkpoint, checked against the
retrieval metrics computed directly from the score matrix; its JSON feeds the model card."""

import json

import pytest
import torch

from multimodal_moe.cli import main
from multimodal_moe.eval.benchmarks import BENCHMARKS, run_benchmark
from multimodal_moe.model_cards.card import build_model_card
from multimodal_moe.training.data import build_emoji_dataset, train_heldout_split
from multimodal_moe.training.retrieval import retrieval_metrics
from test_alt_moe import make, processor

LIMIT = 60  # glyphs before the split: 12 held out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    make().save_pretrained(path)
    processor().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def data_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MULTIMODAL_MOE_HOME", str(tmp_path_factory.getbasetemp() / "mm_home"))


def test_emoji_retrieval_matches_direct_computation():
    model, proc = make(), processor()
    # one batch, as below: the random tiny model gives near-tied scores, which ~1e-7 float differences between
    # batchings can reorder
    results = run_benchmark(model, "emoji-retrieval", processor=proc, limit=LIMIT, batch_size=16)
    heldout = train_heldout_split(build_emoji_dataset(limit=LIMIT, progress=False))["heldout"]
    assert results["dataset"]["images"] == results["dataset"]["texts"] == len(heldout) == 12
    with torch.no_grad():
        inputs = dict(proc(text=heldout["name"], images=[im.convert("RGB") for im in heldout["image"]]))
        scores = model.get_query_embeddings("text", "vision", **inputs) @ model.get_candidate_embeddings(
            "vision", **inputs).T
        scores_v2t = model.get_query_embeddings("vision", "text", **inputs) @ model.get_candidate_embeddings(
            "text", **inputs).T
    for name, s in (("text_to_vision", scores), ("vision_to_text", scores_v2t)):
        expected = retrieval_metrics(s, list(range(12)))
        got = results["metrics"][name]
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (name, key)


def test_eval_cli_writes_json_and_markdown_and_feeds_the_card(checkpoint, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--benchmark", "emoji-retrieval", "--output-dir", str(tmp_path),
                 "--limit", str(LIMIT)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["benchmark"] == "emoji-retrieval" and set(results["metrics"]) == {"text_to_vision",
                                                                                    "vision_to_text"}
    assert all(0 <= v["recall@1"] <= v["recall@5"] <= v["recall@10"] <= 1 for v in results["metrics"].values())
    table = (tmp_path / "results.md").read_text()
    assert "| direction | recall@1 | recall@5 | recall@10 | median_rank | mean_reciprocal_rank |" in table
    assert table.count("| text_to_vision |") == 1 and "| text_to_vision |" in capsys.readouterr().out
    card = build_model_card(checkpoint, results, base_models=None, datasets=None)
    metrics = {(r.metric_config, r.metric_type) for r in card.data.eval_results}
    assert ("vision_to_text", "recall_at_10") in metrics and ("text_to_vision", "median_rank") in metrics
    assert {r.dataset_type for r in card.data.eval_results} == {"emoji-retrieval"}


def test_eval_errors_name_the_problem(checkpoint, capsys):
    assert main(["eval", str(checkpoint), "--benchmark", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--benchmark", "list"]) == 0
    assert "emoji-retrieval" in capsys.readouterr().out and BENCHMARKS["emoji-retrieval"].offline
