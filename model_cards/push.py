"""Publish a checkpoint folder to the Hugging Face Hub: safetensors weights, code files, processor, card, results.

    push_checkpoint("runs/demo/model", "org/alt-moe-demo", dry_run=True)   # the files it would send
    push_checkpoint("runs/demo/model", "org/alt-moe-demo")                 # create_repo + upload_folder

HF_ENDPOINT and HF_TOKEN are honoured by huggingface_hub as usual.
"""

from __future__ import annotations

import json
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# never sent: caches, editor and OS droppings, training state that is not part of the model
IGNORE_PATTERNS = ["**/__pycache__/**", "__pycache__/**", "*.pyc", ".DS_Store", ".git/**", "**/.ipynb_checkpoints/**"]


def pickle_files(checkpoint) -> list[str]:
    root = Path(checkpoint)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def files_to_upload(checkpoint) -> list[str]:
    """Relative paths under `checkpoint` that upload_folder sends (IGNORE_PATTERNS left out), sorted."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(checkpoint)
    paths = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS))


def push_checkpoint(
    checkpoint,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    *,
    results: dict | str | Path | None = None,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    commit_message: str | None = None,
) -> list[str]:
    """Upload `checkpoint` to `repo_id` (created if missing) and return the repo paths sent (or, with dry_run, that
    would be sent; nothing is written then, the card included).

    Refuses checkpoints holding pickle files (torch.load of a downloaded pickle can run arbitrary code): save with
    safetensors (`save_pretrained` does by default). Writes README.md with `build_model_card` if the folder has none;
    `results` (eval JSON dict or file; default: results.json in the folder or its parent) fills the card's model-index
    and is published as results.json. Card and results are written into the folder before upload_folder sends it.
    """
    root = Path(checkpoint)
    if not (root / "config.json").is_file():
        raise ValueError(f"{root} is not a checkpoint folder (no config.json)")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    unsafe = pickle_files(root)
    if unsafe:
        raise ValueError(
            f"refusing to push {root}: it contains pickle files ({', '.join(unsafe)}), which can run arbitrary code "
            "when loaded. Save with safetensors (model.save_pretrained(..., safe_serialization=True)) and remove them."
        )
    if not any(p.suffix == ".safetensors" for p in root.rglob("*.safetensors")):
        raise ValueError(f"refusing to push {root}: no *.safetensors weights")

    results_file = _results_file(root, results)
    files = files_to_upload(root)
    added = ["README.md"] + (["results.json"] if results_file or isinstance(results, dict) else [])
    files = sorted(set(files) | set(added))
    if dry_run:
        return files

    # the folder is made to match the repo: card and eval results are written into it, then the folder is uploaded
    loaded = results if isinstance(results, dict) else json.loads(results_file.read_text()) if results_file else None
    if loaded is not None and (results_file is None or results_file.resolve() != (root / "results.json").resolve()):
        (root / "results.json").write_text(json.dumps(loaded, indent=2))
    if not (root / "README.md").is_file():
        from .card import build_model_card

        card = build_model_card(root, loaded, base_models=base_models, datasets=datasets, repo_id=repo_id)
        card.save(root / "README.md")

    from huggingface_hub import CommitOperationAdd, create_commit, create_repo

    create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main"):
        from huggingface_hub import create_branch

        create_branch(repo_id, branch=revision, exist_ok=True)
    # what upload_folder would send, except that config.json goes without this machine's local paths
    operations = [
        CommitOperationAdd(path_in_repo=f, path_or_fileobj=_public_config(root / f) if f == "config.json" else str(root / f))
        for f in files_to_upload(root)
    ]
    create_commit(repo_id, operations, revision=revision,
                  commit_message=commit_message or f"Upload {root.name} with multimodal-moe")
    return files


def _public_config(path: Path) -> bytes:
    """config.json without `backbone_sources.*.local_path`: a path on the uploader's disk means nothing on the Hub
    (connector-only checkpoints reload their backbones from `name_or_path` + `revision` there)."""
    config = json.loads(path.read_text())
    for source in (config.get("backbone_sources") or {}).values():
        if isinstance(source, dict):
            source.pop("local_path", None)
    return json.dumps(config, indent=2, sort_keys=True).encode()


def _results_file(root: Path, results) -> Path | None:
    """The eval JSON to publish: `results` if a path, else results.json in the folder or (demo layout) its parent."""
    if isinstance(results, dict):
        return None
    if results:
        if not Path(results).is_file():
            raise ValueError(f"results file {results} not found")
        return Path(results)
    return next((p for p in (root / "results.json", root.parent / "results.json") if p.is_file()), None)
