"""The project's one metric loader: evaluate modules that live in eval/metrics/<name>/<name>.py, loaded offline."""

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent / "metrics"


def available_metrics() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """load_metric("retrieval_recall") -> evaluate module; kwargs go to evaluate.load."""
    if name not in available_metrics():
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(available_metrics())}")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
