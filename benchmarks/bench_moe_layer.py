"""Uni-MoE's sparse MoE layer, forward + backward, side by side with transformers' Mixtral block and a dense GEMM.

    python benchmarks/bench_moe_layer.py                 # CUDA: the issue's shapes in bf16; CPU: scaled down, fp32
    python benchmarks/bench_moe_layer.py --full          # the issue's shapes on CPU too
    python benchmarks/bench_moe_layer.py --out benchmarks/results/moe_layer_cpu.md

Rows: (hidden, ffn, experts, top-k, tokens). Columns: our `UniMoESparseMoeBlock` (router + SwiGLU experts) and
`MixtralSparseMoeBlock` under each experts implementation (same shapes, same `config._experts_implementation`
switch), and a dense SwiGLU FFN of intermediate size k * ffn, which has exactly the FLOPs of the k active experts.
TFLOP/s count 3x the forward FLOPs of the k active experts (6 * tokens * k * hidden * ffn per forward; the router's
2 * tokens * hidden * experts is left out), medians over `--repeats` timed runs after `--warmup` runs.
Then generation tokens/s of a tiny Uni-MoE LLM (text only, greedy, KV cache) at batch 1 and 32.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from timing import make_step, time_round_robin  # benchmarks/timing.py

from multimodal_moe.modeling import UniMoEConfig, UniMoEForConditionalGeneration
from multimodal_moe.modeling.modeling_uni_moe import UniMoESparseMoeBlock


ISSUE_SHAPES = [(2048, 5632, 8, 2, 16384), (4096, 14336, 8, 2, 8192), (1024, 2048, 64, 8, 16384)]
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def scaled(shape):
    hidden, ffn, experts, top_k, tokens = shape
    return hidden // 8, ffn // 8, experts, top_k, tokens // 16


class DenseSwiGLU(torch.nn.Module):
    """A dense FFN with intermediate k * ffn: the same FLOPs as k active experts of width ffn."""

    def __init__(self, hidden, intermediate, dtype, device):
        super().__init__()
        self.gate_up = torch.nn.Parameter(torch.randn(2 * intermediate, hidden, dtype=dtype, device=device) * 0.02)
        self.down = torch.nn.Parameter(torch.randn(hidden, intermediate, dtype=dtype, device=device) * 0.02)

    def forward(self, x):
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


def build_ours(hidden, ffn, experts, top_k, impl, dtype, device):
    text = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=1, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=16)
    config = UniMoEConfig(text_config=text, num_experts=experts, num_experts_per_tok=top_k)
    config._experts_implementation = impl
    block = UniMoESparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.to(device=device, dtype=dtype)


def build_mixtral(hidden, ffn, experts, top_k, impl, dtype, device):
    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                           num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=16, router_jitter_noise=0.0)
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.to(device=device, dtype=dtype)


def batched_mm_bytes(hidden, ffn, tokens, top_k, elem):
    # batched_mm gathers one full expert weight set per (token, slot): forward copies + their gradients.
    return 2 * tokens * top_k * 3 * hidden * ffn * elem


def bench_layers(shapes, dtype, device, warmup, repeats, memory_budget):
    rows = []
    elem = torch.finfo(dtype).bits // 8
    for shape in shapes:
        hidden, ffn, experts, top_k, tokens = shape
        flops = 3 * 6 * tokens * top_k * hidden * ffn
        torch.manual_seed(0)
        x = torch.randn(1, tokens, hidden, dtype=dtype, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        row, modules = {"shape": shape}, {}
        for name, builder in (("ours", build_ours), ("mixtral", build_mixtral)):
            for impl in IMPLEMENTATIONS:
                gathered = batched_mm_bytes(hidden, ffn, tokens, top_k, elem)
                if impl == "batched_mm" and gathered > memory_budget:
                    row[f"{name}/{impl}"] = f"skip ({gathered / 2**30:.0f} GiB gathered)"
                    continue
                modules[f"{name}/{impl}"] = builder(hidden, ffn, experts, top_k, impl, dtype, device)
        modules["dense"] = DenseSwiGLU(hidden, top_k * ffn, dtype, device)
        seconds = time_round_robin({k: make_step(m, x, grad) for k, m in modules.items()}, device, warmup, repeats)
        for key, sec in seconds.items():
            row[key] = (flops / sec / 1e12, sec * 1e3)
        rows.append(row)
        del modules
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"done {shape}", file=sys.stderr, flush=True)
    return rows


def bench_generation(dtype, device, new_tokens, prompt_len, batch_sizes, repeats=3):
    text = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512, eos_token_id=None,
                       bos_token_id=None, pad_token_id=0)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    steps = {}
    for impl in IMPLEMENTATIONS:
        torch.manual_seed(0)
        config = UniMoEConfig(text_config=text, num_experts=8, num_experts_per_tok=2, experts_implementation=impl)
        model = UniMoEForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
        for batch in batch_sizes:
            ids = torch.randint(1, 1024, (batch, prompt_len), device=device)
            steps[(impl, batch)] = (lambda m, i: lambda: m.generate(i, **kwargs))(model, ids)
    with torch.no_grad():
        seconds = time_round_robin(steps, device, warmup=1, repeats=repeats)
    return {key: key[1] * new_tokens / sec for key, sec in seconds.items()}


def machine(device, dtype) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        where = f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        if hasattr(os, "getloadavg"):
            # Shared machines: other jobs' load skews CPU timings.
            where += f", load average at the end {os.getloadavg()[0]:.1f}"
    return (f"{where}; {dtype}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def cell(value):
    if isinstance(value, str):
        return value
    tflops, ms = value
    return f"{tflops:.3f} ({ms:.1f} ms)" if tflops < 10 else f"{tflops:.0f} ({ms:.1f} ms)"


def render(rows, gen, header, dtype_name, repeats) -> str:
    cols = [f"{n}/{i}" for n in ("ours", "mixtral") for i in IMPLEMENTATIONS] + ["dense"]
    titles = [f"Uni-MoE {i}" for i in IMPLEMENTATIONS] + [f"Mixtral {i}" for i in IMPLEMENTATIONS]
    titles.append("dense equal-FLOPs")
    lines = [
        "## MoE layer, forward + backward",
        "",
        f"Machine: {header}",
        "",
        f"TFLOP/s (3x forward FLOPs of the k active experts; median of {repeats} runs, the columns interleaved in each "
        "run; ms per forward + backward in parentheses). Shape = (hidden, ffn, experts, top-k, tokens).",
        "",
        "| shape | " + " | ".join(titles) + " |",
        "|---|" + "---|" * len(titles),
    ]
    for row in rows:
        lines.append(f"| {row['shape']} | " + " | ".join(cell(row[c]) for c in cols) + " |")
    lines += [
        "",
        "batched_mm gathers a full expert weight set per (token, slot), so it is skipped where that exceeds the memory "
        "budget: it is meant for decoding-sized batches (see the generation table).",
    ]
    if gen:
        batches = sorted({b for _, b in gen})
        lines += [
            "",
            "## Generation (tiny Uni-MoE LLM: hidden 256, 4 layers, 8 experts top-2, vocab 1024; text only, greedy, "
            f"KV cache, {dtype_name})",
            "",
            "| experts implementation | " + " | ".join(f"batch {b} tokens/s" for b in batches) + " |",
            "|---|" + "---|" * len(batches),
        ]
        for impl in IMPLEMENTATIONS:
            lines.append(f"| {impl} | " + " | ".join(f"{gen[(impl, b)]:.0f}" for b in batches) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--full", action="store_true", help="the issue's shapes on CPU (default there: scaled down)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="skip batched_mm where its gathered weights exceed this (default 4 CPU / 40 CUDA)")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    shapes = ISSUE_SHAPES if (cuda or args.full) else [scaled(s) for s in ISSUE_SHAPES]
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    repeats = args.repeats if args.repeats is not None else (20 if cuda else 5)
    budget = (args.memory_budget_gib if args.memory_budget_gib is not None else (40 if cuda else 4)) * 2**30

    rows = bench_layers(shapes, dtype, device, warmup, repeats, budget)
    gen = None if args.no_generation else bench_generation(dtype, device, args.gen_tokens, 16, (1, 32))
    header = machine(device, dtype)
    if not cuda and not args.full:
        header += "; shapes scaled down from the issue's (hidden / 8, ffn / 8, tokens / 16)"
    table = render(rows, gen, header, str(dtype).replace("torch.", ""), repeats)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
