"""
Exact top-k retrieval speed: our VectorStore (torch backend, faiss backend through datasets) vs a raw
faiss.IndexFlatIP, all on the same random L2-normalised vectors, printed as a Markdown table.

    python benchmarks/bench_retrieval.py            # N in {100k, 1M} x d in {384, 768, 1024}, ~4 min on an idle 2-core CPU
    python benchmarks/bench_retrieval.py --quick    # N=100k, d in {384, 768}, seconds
    python benchmarks/bench_retrieval.py --sizes 1000000 --dims 768 --batch 1024

float32 on CPU; on CUDA the torch backend keeps the matrix in fp16 on the GPU (faiss stays on CPU, faiss-cpu).
H100 anchor for the torch path, 1M x 768 fp16: 0.64 ms/query and ~105k queries/s at batch 1024.
"""

import argparse
import os
import platform
import statistics
import time

import datasets
import faiss
import numpy as np
import torch
import torch.nn.functional as F

from multimodal_moe.training.retrieval import VectorStore

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="store sizes N")
parser.add_argument("--dims", type=int, nargs="+", default=[384, 768, 1024], help="embedding dims d")
parser.add_argument("--batch", type=int, default=1024, help="batch size for throughput (capped on CPU for big N, see --max-scores)")
parser.add_argument("--max-scores", type=float, default=2.56e8, help="CPU only: shrink the batch so batch * N <= this, to keep the run short")
parser.add_argument("--queries", type=int, default=20, help="single queries timed for the median latency")
parser.add_argument("--k", type=int, default=10)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the torch backend")
parser.add_argument("--quick", action="store_true", help="N=100k, d in {384, 768}, batch 256")
args = parser.parse_args()
if args.quick:
    args.sizes, args.dims, args.batch = [100_000], [384, 768], 256
datasets.disable_progress_bars()
on_gpu = torch.device(args.device).type == "cuda"


def sync():
    if on_gpu:
        torch.cuda.synchronize()


def timed(fn, *a):
    sync()
    t = time.perf_counter()
    fn(*a)
    sync()
    return time.perf_counter() - t


def measure(search, queries, batch):
    """(median single-query latency in ms, queries/s at `batch`) for search(np.ndarray (n, d))."""
    search(queries[:1])  # warm-up: thread pools, first-touch of the matrix
    latency = statistics.median(timed(search, queries[i : i + 1]) for i in range(args.queries))
    times = [timed(search, queries[:batch])]
    while sum(times) < 1.0 and len(times) < 5:  # repeat fast batches for a stabler median
        times.append(timed(search, queries[:batch]))
    return latency * 1e3, batch / statistics.median(times)


# ----------------------------------------------------------------------------- machine
cpu = platform.processor() or platform.machine()
if os.path.exists("/proc/cpuinfo"):
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    cpu = names[0] if names else cpu
print(f"- CPU: {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()})")
if on_gpu:
    print(f"- GPU: {torch.cuda.get_device_name()} (torch backend in fp16)")
print(f"- load average at start: {os.getloadavg()[0]:.2f} (other processes on the cores make timings noisy)")
print(f"- torch {torch.__version__}, faiss {faiss.__version__}, datasets {datasets.__version__}, numpy {np.__version__}")
print(f"- exact inner-product top-{args.k}; latency = median over {args.queries} single queries; throughput = queries/s on one batch")
print("- vs raw faiss: latency / raw faiss latency (lower is better), throughput / raw faiss throughput (higher is better)")
print()
print("| N | d | backend | latency (ms) | vs raw faiss | batch | throughput (q/s) | vs raw faiss |")
print("|---:|---:|---|---:|---:|---:|---:|---:|")

gen = torch.Generator().manual_seed(0)
for n in args.sizes:
    batch = args.batch if on_gpu else max(1, min(args.batch, int(args.max_scores // n)))
    for d in args.dims:
        x = F.normalize(torch.randn(n, d, generator=gen), dim=-1).numpy()  # (N, d) float32
        queries = F.normalize(torch.randn(max(batch, args.queries), d, generator=gen), dim=-1).numpy()
        rows = {}

        index = faiss.IndexFlatIP(d)
        index.add(x)
        rows["raw faiss.IndexFlatIP"] = measure(lambda q: index.search(q, args.k), queries, batch)
        del index  # one copy of the vectors at a time: 1M x 1024 fp32 is 4 GB

        store = VectorStore.from_embeddings(x, normalize=False).to(args.device)
        del x
        store.add_faiss_index()
        rows["VectorStore faiss (datasets)"] = measure(lambda q: store.search(q, args.k, backend="faiss"), queries, batch)
        store.dataset.drop_index("embedding")
        device = "GPU fp16" if on_gpu else "CPU fp32"
        rows[f"VectorStore torch ({device})"] = measure(lambda q: store.search(q, args.k), queries, batch)
        del store

        ref_ms, ref_qps = rows["raw faiss.IndexFlatIP"]
        for name, (ms, qps) in rows.items():
            print(f"| {n:,} | {d} | {name} | {ms:.2f} | {ms / ref_ms:.2f}x | {batch} | {qps:,.0f} | {qps / ref_qps:.2f}x |", flush=True)
print(f"\n- load average at end: {os.getloadavg()[0]:.2f}")
