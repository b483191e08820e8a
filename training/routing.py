"""Expert-routing statistics of a Uni-MoE model: which experts each modality's tokens go to, per MoE layer.

```python
>>> from multimodal_moe.training.routing import save_routing_report
>>> stats = save_routing_report(model, [processor(text=..., images=...), ...], "runs/routing", "step_1000")
>>> stats["top_k_fraction"]["image"][0]  # layer moe_layer_indices[0]: share of the image tokens' top-k slots per expert
```

`routing_statistics` runs the model (eval, no grad) with `output_router_logits=True` and, for every MoE layer and every
modality seen (text / image / video / audio, from the placeholder ids, padding excluded through `attention_mask`),
accumulates

- `top_k_fraction`: the fraction of the modality's top-k assignments (tokens x k slots) each expert receives; a row sums
  to 1 (it is `expert_usage` of moe_layers.py, restricted to one modality);
- `mean_probability`: the mean over the modality's tokens of the softmax over *all* experts of the router logits.

A dense model (`moe_layers=[]`) has no router: the statistics then hold no layer and no PNG is written.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from ..modeling.configuration_uni_moe import MODALITIES


logger = logging.getLogger(__name__)

_DROP_KEYS = ("labels",)  # a batch from a training collator: no loss needed here


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def _find_uni_moe_model(model: torch.nn.Module):
    """The `UniMoEModel` inside `model` (itself, `.model` of the LM, or under a peft wrapper); None if absent."""
    from ..modeling.modeling_uni_moe import UniMoEModel

    for module in model.modules():
        if isinstance(module, UniMoEModel) or type(module).__name__ == "UniMoEModel":
            return module
    return None


def _moe_layer_indices(model: torch.nn.Module) -> list[int]:
    """The MoE layer indices of the config, or [] when the model has no sparse MoE block (dense)."""
    config = getattr(model, "config", None)
    indices = list(getattr(config, "moe_layer_indices", None) or [])
    has_blocks = any(type(m).__name__ == "UniMoESparseMoeBlock" for m in model.modules())
    return indices if has_blocks else []


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _atomic_write_bytes(path: Path, write) -> None:
    """Calls `write(tmp_path)` on a temporary file next to `path`, then renames it over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _empty_stats(num_experts: int, top_k: int) -> dict:
    return {
        "num_experts": num_experts,
        "top_k": top_k,
        "layers": [],
        "modalities": [],
        "tokens": {},
        "top_k_fraction": {},
        "mean_probability": {},
    }


# ---------------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def routing_statistics(model: torch.nn.Module, batches: Iterable[Mapping], progress: bool = True) -> dict:
    """Per MoE layer and per modality routing statistics of `model` over `batches` (processor outputs).

    Returns a JSON-serialisable dict: `num_experts`, `top_k`, `layers` (decoder-layer indices of the MoE blocks),
    `modalities` (those seen, in `MODALITIES` order), `tokens` ({modality: non-padding token count}),
    `top_k_fraction` and `mean_probability` ({modality: [[per expert] per layer]}). Labels in a batch are dropped; the
    model runs in eval mode without gradients and gets its training mode back afterwards.
    """
    config = model.config
    num_experts = int(config.num_experts)
    top_k = int(config.num_experts_per_tok)
    layers = _moe_layer_indices(model)
    if not layers:
        logger.info("routing_statistics: the model has no MoE layer (dense); nothing to measure")
        return _empty_stats(num_experts, top_k)

    uni_moe = _find_uni_moe_model(model)
    if uni_moe is None:
        raise ValueError(f"routing_statistics needs a Uni-MoE model, got {type(model).__name__}")

    n_mod = len(MODALITIES)
    counts = torch.zeros(n_mod, len(layers), num_experts, dtype=torch.float64)  # top-k assignments
    prob_sums = torch.zeros(n_mod, len(layers), num_experts, dtype=torch.float64)
    tokens = torch.zeros(n_mod, dtype=torch.long)

    device = _model_device(model)
    was_training = model.training
    model.eval()
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="routing statistics", unit="batch")
    try:
        for batch in batches:
            inputs = {
                key: value.to(device) if isinstance(value, torch.Tensor) else value
                for key, value in dict(batch).items()
                if key not in _DROP_KEYS
            }
            input_ids = inputs.get("input_ids")
            if input_ids is None:
                raise ValueError("routing_statistics needs `input_ids` in every batch (to tell the modalities apart)")
            inputs["use_cache"] = False
            out = model(**inputs, output_router_logits=True)
            router_logits = getattr(out, "router_logits", None)
            if not router_logits:  # None or (): a model whose MoE blocks did not run; nothing to count
                continue
            if len(router_logits) != len(layers):
                raise RuntimeError(
                    f"the model returned {len(router_logits)} router logits for {len(layers)} MoE layers {layers}"
                )

            mods = uni_moe.modality_ids(input_ids).reshape(-1).cpu()  # (batch * seq,)
            mask = inputs.get("attention_mask")
            if mask is not None and mask.ndim == 2:
                keep = mask[:, -input_ids.shape[1]:].reshape(-1).bool().cpu()
            else:
                keep = torch.ones_like(mods, dtype=torch.bool)
            mods = mods[keep]
            tokens += torch.bincount(mods, minlength=n_mod)[:n_mod]

            for layer_pos, logits in enumerate(router_logits):
                logits = logits.detach().float().cpu()[keep]  # (kept tokens, experts)
                top_k_index = logits.topk(top_k, dim=-1).indices  # (kept tokens, k)
                probs = logits.softmax(dim=-1).double()
                for m in mods.unique().tolist():
                    sel = mods == m
                    counts[m, layer_pos] += torch.bincount(top_k_index[sel].reshape(-1), minlength=num_experts).double()
                    prob_sums[m, layer_pos] += probs[sel].sum(dim=0)
    finally:
        model.train(was_training)

    stats = _empty_stats(num_experts, top_k)
    stats["layers"] = layers
    for m, modality in enumerate(MODALITIES):
        n = int(tokens[m])
        if n == 0:
            continue
        stats["modalities"].append(modality)
        stats["tokens"][modality] = n
        stats["top_k_fraction"][modality] = (counts[m] / (n * top_k)).tolist()
        stats["mean_probability"][modality] = (prob_sums[m] / n).tolist()
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# plot and report
# ---------------------------------------------------------------------------------------------------------------------
def plot_routing_heatmap(stats: Mapping, path: str | os.PathLike, title: str | None = None) -> Path:
    """Writes one PNG with a heatmap per modality (rows: MoE layers, columns: experts, colour: top-k fraction).

    Cells are annotated with their value when the grid is small. Uses matplotlib's Agg canvas (no display, no pyplot
    state); the file is written to a temporary name and renamed. Returns the path.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plot_routing_heatmap needs matplotlib: `pip install matplotlib` (or `pip install multimodal-moe[demo]`)"
        ) from err

    layers = list(stats["layers"])
    modalities = [m for m in stats["modalities"] if m in stats["top_k_fraction"]]
    if not layers or not modalities:
        raise ValueError("no routing to plot: the statistics hold no MoE layer or no modality (a dense model?)")
    num_experts = int(stats["num_experts"])
    top_k = stats.get("top_k")
    grids = {m: np.asarray(stats["top_k_fraction"][m], dtype=np.float64) for m in modalities}
    for modality, grid in grids.items():
        if grid.shape != (len(layers), num_experts):
            raise ValueError(f"top_k_fraction[{modality!r}] has shape {grid.shape}, expected {(len(layers), num_experts)}")
    vmax = max(float(g.max()) for g in grids.values()) or 1.0
    annotate = num_experts <= 16 and len(layers) <= 32  # small grids: write the values in the cells

    n = len(modalities)
    panel_width = min(8.0, max(2.8, 0.45 * num_experts + 1.2))
    width = panel_width * n + 1.2  # + colour bar
    height = min(12.0, max(2.8, 0.35 * len(layers) + 1.8))
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, modality in zip(axes, modalities):
        grid = grids[modality]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{modality} ({stats['tokens'].get(modality, 0)} tok)", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(i) for i in layers])
        ax.tick_params(labelsize=7)
        if annotate:
            for r in range(grid.shape[0]):
                for c in range(grid.shape[1]):
                    value = grid[r, c]
                    colour = "black" if value > 0.6 * vmax else "white"
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6, color=colour)
    axes[0].set_ylabel("MoE layer", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.9, label="top-k fraction")
    fig.suptitle(title or f"expert routing (top-{top_k} of {num_experts})", fontsize=10)

    path = Path(path)
    _atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def save_routing_report(
    model: torch.nn.Module,
    batches: Iterable[Mapping],
    output_dir: str | os.PathLike,
    name: str,
    progress: bool = True,
) -> dict:
    """Computes `routing_statistics`, writes `{output_dir}/{name}.json` and `{output_dir}/{name}.png` (both atomically;
    no PNG for a dense model) and returns the statistics."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stats = routing_statistics(model, batches, progress=progress)
    payload = json.dumps(stats, indent=2)
    _atomic_write_bytes(output_dir / f"{name}.json", lambda tmp: Path(tmp).write_text(payload))
    if stats["layers"] and stats["modalities"]:
        plot_routing_heatmap(stats, output_dir / f"{name}.png", title=f"expert routing: {name}")
    else:
        logger.info("save_routing_report: no MoE routing to plot (dense model or no tokens); wrote %s.json only", name)
    return stats
