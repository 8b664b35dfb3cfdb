"""Package boundaries (STYLE.md "What we do here" 1): the model imports no training engines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_FOR_MODEL = {"torch", "diffusers", "transformers", "tokenizers", "safetensors", "kernels", "pretrain"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_model_package_imports_only_model_libraries():
    offending = {}
    for path in (ROOT / "pretrain" / "model").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if top not in ALLOWED_FOR_MODEL or (top == "pretrain" and not name.startswith("pretrain.model")):
                offending.setdefault(path.name, []).append(name)
    assert not offending, f"pretrain/model must not import these: {offending}"


def test_data_pipeline_does_not_import_the_trainer():
    for path in (ROOT / "data_pipeline").rglob("*.py"):
        assert not any(n.startswith(("pretrain", "deepspeed")) for n in _imports(path)), path
