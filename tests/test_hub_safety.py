"""Files copied into checkpoints import only torch, transformers, safetensors (and the stdlib / numpy that
transformers itself needs), and their siblings by flat relative import."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"torch", "transformers", "safetensors", "numpy", "huggingface_hub"}
HUB_FILES = sorted(p for d in ("modeling", "processing") for p in (ROOT / d).glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", HUB_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_hub_copied_files_import_only_allowed_modules(path):
    siblings = {p.stem for p in path.parent.glob("*.py")}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            # `from .x import y` is copied with the file; `from .x.y import z` or `from .. import` is not
            assert node.level == 1 and node.module in siblings, f"{path.name}:{node.lineno}: non-flat relative import"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED or top in sys.stdlib_module_names, f"{path.name}:{node.lineno}: imports {name}"
