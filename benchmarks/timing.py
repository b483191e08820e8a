"""Timing helpers shared by the benchmark scripts (run them from the repository root: `python benchmarks/x.py`)."""

import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(module, x, grad):
    """One forward + backward of `module` on `x`, gradients cleared first."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(grad)

    return step


def time_round_robin(steps: dict, device, warmup: int, repeats: int) -> dict:
    """Median seconds per step. Steps are interleaved in every repeat, so load from other jobs on a shared machine
    hits every column alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
