"""
Real-time retrieval over pre-stored embeddings, and the ranking metrics that go with it.

The store is a `datasets.Dataset` (column `embedding` + any metadata columns), so it saves,
memory-maps and indexes with the ecosystem's own tools:

    store = VectorStore.from_embeddings(image_embeds, {"image_id": ids})
    hits = store.search(text_embeds, k=5)                  # exact torch matmul + topk
    hits = store.search(text_embeds, k=5, backend="faiss")  # IndexFlatIP via datasets.add_faiss_index
    hits.rows(0)                                            # [{"index": 17, "score": 0.41, "image_id": ...}, ...]
    store.save("runs/coco_images"); store = VectorStore.load("runs/coco_images")

All vectors are L2-normalised, so inner product == cosine similarity.
"""

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from datasets import Dataset

COLUMN = "embedding"  # the vector column, and the name of its faiss index
INDEX_FILE = "embedding.faiss"  # saved beside the dataset's arrow files
CHUNK_SCORES = 2**26  # max (queries x candidates) scores held at once by the torch backend (256 MB fp32)


@dataclass
class SearchResult:
    scores: torch.Tensor  # (queries, k) float32, best first
    indices: torch.Tensor  # (queries, k) int64 row ids in the store
    dataset: Dataset = field(repr=False)

    def rows(self, i: int = 0) -> list[dict]:
        """The k hits of query i as dicts: row `index`, `score` and the store's metadata columns."""
        ids = self.indices[i].tolist()
        batch = self.dataset[ids]  # dict of columns; ds[list] is allowed with an index attached, ds.select is not
        meta = [c for c in batch if c != COLUMN]
        return [
            {"index": idx, "score": score, **{c: batch[c][j] for c in meta}}
            for j, (idx, score) in enumerate(zip(ids, self.scores[i].tolist()))
        ]


class VectorStore:
    """L2-normalised candidate embeddings in a datasets.Dataset (column `embedding`, plus any metadata columns),
    searchable exactly with torch (matmul + topk) or with FAISS (IndexFlatIP through datasets' add_faiss_index)."""

    def __init__(self, dataset: Dataset):
        if COLUMN not in dataset.column_names:
            raise ValueError(f"dataset has no {COLUMN!r} column (columns: {dataset.column_names})")
        if len(dataset) == 0:
            raise ValueError("cannot build a VectorStore from 0 embeddings")
        self.dataset = dataset
        self.to("cpu")

    @classmethod
    def from_embeddings(cls, embeddings, metadata: dict[str, list] | None = None, *, normalize: bool = True) -> "VectorStore":
        x = torch.as_tensor(embeddings).detach().float().cpu()  # (N, d); faiss wants float32
        if x.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (N, d), got shape {tuple(x.shape)}")
        if len(x) == 0:
            raise ValueError("cannot build a VectorStore from 0 embeddings")
        if normalize:
            x = F.normalize(x, dim=-1)
        metadata = dict(metadata or {})
        if COLUMN in metadata:
            raise ValueError(f"metadata cannot have a column named {COLUMN!r}")
        for name, values in metadata.items():
            if len(values) != len(x):
                raise ValueError(f"metadata column {name!r} has {len(values)} values for {len(x)} embeddings")
        # hand arrow a fixed-size list built from the flat buffer: row-by-row conversion takes minutes at 1M rows
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.numpy().reshape(-1)), x.shape[1])
        return cls(Dataset.from_dict({COLUMN: vectors, **metadata}))

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def numpy(self) -> np.ndarray:
        """(N, d) float32 view of the arrow buffer: zero-copy, memory-mapped when the store was loaded from disk."""
        column = self.dataset.data.column(COLUMN)
        array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)  # a sharded save loads as chunks: copy once
        return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), -1)

    def to(self, device, dtype: torch.dtype | None = None) -> "VectorStore":
        """Keep the torch backend's (N, d) matrix on `device` (fp16 by default on GPU, fp32 elsewhere)."""
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        with warnings.catch_warnings():  # arrow buffers are read-only; we never write to the matrix
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.from_numpy(self.numpy())
        self.matrix = matrix.to(device, dtype)  # no copy for CPU fp32
        return self

    def add_faiss_index(self) -> None:
        import faiss

        self.dataset.add_faiss_index(column=COLUMN, metric_type=faiss.METRIC_INNER_PRODUCT, batch_size=65536)

    @property
    def has_faiss_index(self) -> bool:
        return self.dataset.is_index_initialized(COLUMN)

    def search(self, queries, k: int = 10, *, backend: str = "torch", normalize: bool = True) -> SearchResult:
        """Top-k candidates per query by cosine similarity. queries (n, d) or (d,) -> scores, indices (n, k)."""
        q = torch.as_tensor(queries).detach()
        q = q[None] if q.ndim == 1 else q  # (n, d)
        if q.ndim != 2:
            raise ValueError(f"queries must be (n, d) or (d,), got shape {tuple(q.shape)}")
        if q.shape[1] != self.dim:
            raise ValueError(f"query dim {q.shape[-1]} != store dim {self.dim}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} must be between 1 and the store size {len(self)}")
        q = F.normalize(q.float(), dim=-1) if normalize else q.float()
        if backend == "torch":
            scores, indices = self._torch_topk(q.to(self.matrix.device, self.matrix.dtype), k)
        elif backend == "faiss":
            if not self.has_faiss_index:
                self.add_faiss_index()
            out = self.dataset.search_batch(COLUMN, np.ascontiguousarray(q.cpu().numpy()), k=k)
            scores, indices = torch.from_numpy(out.total_scores), torch.from_numpy(out.total_indices)
        else:
            raise ValueError(f"unknown backend {backend!r}, expected 'torch' or 'faiss'")
        return SearchResult(scores.float().cpu(), indices.long().cpu(), self.dataset)

    @torch.no_grad()
    def _torch_topk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # exact search; over very large N, scan candidates in chunks and merge a running top-k
        chunk = max(k, CHUNK_SCORES // len(q))
        best_scores = best_ids = None
        for start in range(0, len(self), chunk):
            scores = q @ self.matrix[start : start + chunk].T  # (queries, chunk)
            scores, ids = scores.topk(min(k, scores.shape[1]), dim=1)
            ids += start
            if best_scores is not None:  # merge with what earlier chunks kept
                scores, pick = torch.cat([best_scores, scores], 1).topk(k, dim=1)
                ids = torch.cat([best_ids, ids], 1).gather(1, pick)
            best_scores, best_ids = scores, ids
        return best_scores, best_ids

    def save(self, directory) -> None:
        """Dataset (save_to_disk) + faiss index beside it. Written to a temp dir then renamed, so a crash never
        leaves a half-written store at `directory`."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))  # same filesystem: rename is atomic
        try:
            # datasets refuses to save a dataset with an attached index, so save an index-free view of the same table
            Dataset(self.dataset.data, info=self.dataset.info.copy()).save_to_disk(str(tmp))
            if self.has_faiss_index:
                self.dataset.save_faiss_index(COLUMN, tmp / INDEX_FILE)
            old = None
            if directory.exists():  # a directory can't be renamed over a non-empty one: move the old store aside first
                old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
                directory.rename(old)
            tmp.rename(directory)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory) -> "VectorStore":
        """Memory-mapped dataset + its faiss index if one was saved."""
        directory = Path(directory)
        if not (directory / "state.json").is_file():
            raise FileNotFoundError(f"{directory} is not a VectorStore directory (no dataset saved by VectorStore.save)")
        store = cls(Dataset.load_from_disk(str(directory)))
        if (directory / INDEX_FILE).is_file():
            store.dataset.load_faiss_index(COLUMN, directory / INDEX_FILE)
        return store

    def __repr__(self) -> str:
        extra = [c for c in self.dataset.column_names if c != COLUMN]
        return f"VectorStore(n={len(self)}, dim={self.dim}, metadata={extra}, faiss={self.has_faiss_index})"


# ----------------------------------------------------------------------------- metrics from a score matrix


def rankings_from_scores(scores: torch.Tensor, k: int | None = None) -> list[list[int]]:
    """(queries, candidates) scores -> per query, candidate ids best first (ties: lower id first), cut to k.
    This is the `predictions` input of the `retrieval_recall` evaluate metric."""
    order = torch.as_tensor(scores).argsort(dim=1, descending=True, stable=True)
    return order[:, :k].tolist()


@torch.no_grad()
def retrieval_metrics(scores: torch.Tensor, targets, k_values=(1, 5, 10)) -> dict[str, float]:
    """Recall@k, median rank and MRR straight from a (queries, candidates) score matrix, in torch.

    targets: the correct candidate id per query, as ints / a (queries,) tensor, or a list of ids per query
    (e.g. COCO image->text: 5 captions per image; the best-ranked one counts). Text->image uses scores.T.
    Equal to `load_metric("retrieval_recall")` on `rankings_from_scores(scores)`.
    """
    scores = torch.as_tensor(scores).float()
    n, num_candidates = scores.shape
    if isinstance(targets, (torch.Tensor, np.ndarray)):
        targets = targets.tolist()
    targets = [[int(t)] if np.ndim(t) == 0 else [int(x) for x in t] for t in targets]
    if len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} queries")
    width = max(len(t) for t in targets)
    targets = torch.tensor([t + t[:1] * (width - len(t)) for t in targets])  # (queries, width), padded by repeating
    ids = torch.arange(num_candidates)
    ranks = torch.full((n,), num_candidates + 1)
    for j in range(width):  # one target column at a time keeps memory at (queries, candidates)
        t = targets[:, j : j + 1]  # (queries, 1)
        s = scores.gather(1, t)  # (queries, 1)
        # 1-based position in a stable descending sort: strictly better candidates + ties with a lower id
        rank = (scores > s).sum(1) + ((scores == s) & (ids < t)).sum(1) + 1
        ranks = torch.minimum(ranks, rank)
    ranks = ranks.double()
    out = {f"recall@{k}": (ranks <= k).double().mean().item() for k in k_values}
    out["median_rank"] = ranks.quantile(0.5).item()  # averages the middle two, like np.median
    out["mean_reciprocal_rank"] = (1 / ranks).mean().item()
    return out
