"""Omni-SMoLA layer, forward + backward: frozen base linear, peft LoRA r=8, a Python-loop mixture and SMoLALinear.

    python benchmarks/bench_smola.py                  # CUDA: the issue's shapes (d=4096, 16,384 tokens) in bf16;
                                                      # CPU: scaled down (d=1024, 2,048 tokens), fp32
    python benchmarks/bench_smola.py --out benchmarks/results/smola_cpu.md

Every column is one d x d linear with the input requiring grad (as inside a network); one step = forward +
backward. Mixtures have E experts of rank 4 in one group (softmax over all E), scaling alpha / r = 2:
  - "loop": router Linear(d, E), then for each expert y += w_e * B_e (A_e x), the experts as separate parameters;
  - "SMoLALinear": ours (router and all A in one matmul, the rank blocks scaled, all B in one matmul).
Medians over `--repeats` runs after `--warmup`, the columns interleaved in every run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

from timing import make_step, time_round_robin  # benchmarks/timing.py

from multimodal_moe.modeling.smola_layers import SMoLALinear




class LoopMixture(nn.Module):
    """The mixture written the obvious way: one Python iteration (two small matmuls) per expert."""

    def __init__(self, base: nn.Linear, num_experts: int, r: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.router = nn.Linear(d_in, num_experts, bias=False, **kw)
        self.A = nn.ParameterList([nn.Parameter(torch.randn(r, d_in, **kw) / d_in**0.5) for _ in range(num_experts)])
        self.B = nn.ParameterList([nn.Parameter(torch.randn(d_out, r, **kw) * 0.01) for _ in range(num_experts)])
        self.scaling = alpha / r

    def forward(self, x):
        y = self.base(x)
        w = self.router(x).float().softmax(-1).to(x.dtype) * self.scaling
        for e, (a, b) in enumerate(zip(self.A, self.B)):
            y = y + w[..., e:e + 1] * F.linear(F.linear(x, a), b)
        return y


class Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)






def run(d: int, tokens: int, experts_list, rank: int, device, dtype, warmup: int, repeats: int):
    torch.manual_seed(0)
    kw = dict(device=device, dtype=dtype)
    x = torch.randn(tokens, d, **kw).requires_grad_(True)
    grad = torch.randn(tokens, d, **kw)
    base = nn.Linear(d, d, bias=False, **kw).requires_grad_(False)
    lora = get_peft_model(Wrap(nn.Linear(d, d, bias=False, **kw)), LoraConfig(r=8, lora_alpha=16, target_modules=["lin"]))
    common = {
        "frozen base": make_step(base, x, grad),
        "peft LoRA r=8": make_step(lora, x, grad),
    }
    base_ms = {k: v * 1e3 for k, v in time_round_robin(common, device, warmup, repeats).items()}
    rows = []
    for experts in experts_list:
        smola = SMoLALinear(nn.Linear(d, d, bias=False, **kw), ["shared"], ["shared"], experts, rank, 2.0 * rank)
        with torch.no_grad():
            smola.lora_B.normal_(0, 0.01)
        loop = LoopMixture(nn.Linear(d, d, bias=False, **kw), experts, rank, 2.0 * rank)
        steps = dict(common, loop=make_step(loop, x, grad), smola=make_step(smola, x, grad))
        ms = {k: v * 1e3 for k, v in time_round_robin(steps, device, warmup, repeats).items()}
        rows.append((experts, ms))
        print(experts, {k: round(v, 2) for k, v in ms.items()}, file=sys.stderr)
    return base_ms, rows


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the issue's shapes even on CPU")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" or args.full:
        d, tokens, dtype = 4096, 16384, (torch.bfloat16 if device.type == "cuda" else torch.float32)
    else:
        d, tokens, dtype = 1024, 2048, torch.float32
    base_ms, rows = run(d, tokens, args.experts, args.rank, device, dtype, args.warmup, args.repeats)
    lines = [
        "## Omni-SMoLA layer, forward + backward",
        "",
        f"Machine: {machine(device)}; {dtype}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, Python {platform.python_version()}; d = {d}, {tokens} tokens, experts of rank "
        f"{args.rank} (one group, router included), input requires grad; median of {args.repeats} runs, columns "
        "interleaved. Overhead = time over the frozen base linear.",
        "",
        f"Frozen base linear: {base_ms['frozen base']:.2f} ms; peft LoRA r=8: {base_ms['peft LoRA r=8']:.2f} ms "
        f"(overhead {base_ms['peft LoRA r=8'] - base_ms['frozen base']:.2f} ms).",
        "",
        "| experts | frozen base (ms) | peft LoRA r=8 (ms) | Python loop (ms) | SMoLALinear (ms) | SMoLA overhead (ms) "
        "| SMoLA / LoRA | loop / SMoLA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for experts, ms in rows:
        lines.append(
            f"| {experts} | {ms['frozen base']:.2f} | {ms['peft LoRA r=8']:.2f} | {ms['loop']:.2f} | {ms['smola']:.2f} "
            f"| {ms['smola'] - ms['frozen base']:.2f} | {ms['smola'] / ms['peft LoRA r=8']:.2f}x "
            f"| {ms['loop'] / ms['smola']:.1f}x |"
        )
    if device.type == "cpu":
        lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f} (other jobs share this machine)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
