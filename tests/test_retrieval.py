import numpy as np
import pytest
import torch

import multimodal_moe.training.retrieval as retrieval
from multimodal_moe.eval.metrics import load_metric
from multimodal_moe.training.retrieval import VectorStore, rankings_from_scores, retrieval_metrics

N, D, K = 2000, 48, 10


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    candidates = rng.standard_normal((N, D)).astype(np.float32)
    queries = rng.standard_normal((7, D)).astype(np.float32)
    return candidates, queries


@pytest.fixture(scope="module")
def store(data):
    return VectorStore.from_embeddings(data[0], {"caption": [f"caption {i}" for i in range(N)]})


@pytest.fixture(scope="module")
def metric():
    return load_metric("retrieval_recall")


def brute_force(candidates, queries, k):
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ c.T  # (queries, candidates)
    indices = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, indices, 1), indices


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_matches_brute_force(data, store, backend):
    scores, indices = brute_force(*data, K)
    out = store.search(torch.from_numpy(data[1]), K, backend=backend)
    assert out.indices.shape == out.scores.shape == (7, K)
    np.testing.assert_array_equal(out.indices.numpy(), indices)
    np.testing.assert_allclose(out.scores.numpy(), scores, atol=1e-5)
    rows = out.rows(3)
    assert [r["index"] for r in rows] == indices[3].tolist()
    assert rows[0]["caption"] == f"caption {indices[3, 0]}"


def test_torch_chunked_topk_merge(data, store, monkeypatch):
    monkeypatch.setattr(retrieval, "CHUNK_SCORES", 7 * 64)  # 64 candidates per chunk -> 32 merges
    _, indices = brute_force(*data, K)
    np.testing.assert_array_equal(store.search(data[1], K).indices.numpy(), indices)


def test_single_query_is_batched(data, store):
    out = store.search(data[1][0], K)  # (d,) -> (1, k)
    assert out.indices.shape == (1, K)
    np.testing.assert_array_equal(out.indices[0].numpy(), brute_force(*data, K)[1][0])


def test_save_load_round_trip(data, store, tmp_path):
    store.add_faiss_index()
    store.save(tmp_path / "store")
    store.save(tmp_path / "store")  # overwriting an existing store works
    loaded = VectorStore.load(tmp_path / "store")
    assert len(loaded) == N and loaded.has_faiss_index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temp dirs left behind
    for backend in ["torch", "faiss"]:
        a, b = store.search(data[1], K, backend=backend), loaded.search(data[1], K, backend=backend)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    assert loaded.search(data[1], K).rows(0) == store.search(data[1], K).rows(0)


def test_errors(data, store, tmp_path):
    with pytest.raises(ValueError, match=f"query dim 12 != store dim {D}"):
        store.search(torch.randn(2, 12))
    with pytest.raises(ValueError, match="k=2001"):
        store.search(data[1], k=N + 1)
    with pytest.raises(ValueError, match="unknown backend 'annoy'"):
        store.search(data[1], backend="annoy")
    with pytest.raises(ValueError, match="0 embeddings"):
        VectorStore.from_embeddings(torch.empty(0, D))
    with pytest.raises(ValueError, match="metadata column 'caption' has 3 values"):
        VectorStore.from_embeddings(data[0][:5], {"caption": ["a", "b", "c"]})
    with pytest.raises(FileNotFoundError, match="not a VectorStore"):
        VectorStore.load(tmp_path)


def test_metric_hand_computed(metric):
    ranking = list(range(10))
    # correct ids 0, 1, 5 sit at ranks 1, 2, 6; id 99 is missing from the 10-long list -> rank 11
    out = metric.compute(predictions=[ranking] * 4, references=[0, 1, 5, 99])
    assert out["recall@1"] == 0.25 and out["recall@5"] == 0.5 and out["recall@10"] == 0.75
    assert out["median_rank"] == 4.0
    assert out["mean_reciprocal_rank"] == pytest.approx((1 + 1 / 2 + 1 / 6 + 1 / 11) / 4)
    assert metric.compute(predictions=[ranking], references=[3], k_values=(3, 4)) == {
        "recall@3": 0.0, "recall@4": 1.0, "median_rank": 4.0, "mean_reciprocal_rank": 0.25}


def test_metric_multiple_references(metric):
    # several correct ids per query (COCO: 5 captions per image): the best-ranked one counts
    out = metric.compute(predictions=[[4, 2, 0, 1, 3], [0, 1, 2, 3, 4]], references=[[0, 1], [4, 3]], k_values=(1, 3))
    assert out == {"recall@1": 0.0, "recall@3": 0.5, "median_rank": 3.5, "mean_reciprocal_rank": (1 / 3 + 1 / 4) / 2}


def test_retrieval_metrics_equals_evaluate_module(metric):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 60, generator=g)  # (images, texts)
    scores[0, :] = 0.0  # ties: both sides break them by the lower id first
    image_of_text = torch.randint(0, 40, (60,), generator=g)
    texts_of_image = [torch.nonzero(image_of_text == i).flatten().tolist() or [i] for i in range(40)]
    for s, targets in [(scores, texts_of_image), (scores.T, image_of_text)]:  # image->text, text->image
        ours = retrieval_metrics(s, targets)
        theirs = metric.compute(predictions=rankings_from_scores(s), references=targets if isinstance(targets, list) else targets.tolist())
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key]), key
    assert rankings_from_scores(scores, k=3) == [row[:3] for row in rankings_from_scores(scores)]


def test_load_metric_unknown_name():
    with pytest.raises(ValueError, match="unknown metric 'no_such_metric'.*available: .*retrieval_recall"):
        load_metric("no_such_metric")
