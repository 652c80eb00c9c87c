"""The engine, data, output and runtime folders and the contract know no model: none of their modules imports
fair-esm (`esm`) or `extract.models`, read from their source."""

import ast
from pathlib import Path

import pytest

from jobs import REPO

MODEL_FREE = sorted([*(path for folder in ("engine", "data", "output", "runtime")
                       for path in (REPO / "extract" / folder).rglob("*.py")), REPO / "extract" / "contract.py"])
FORBIDDEN = ("esm", "extract.models")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def imported_modules(source: str, module: str) -> list[str]:
    """Every module that `source`, the text of `module`, imports, by absolute name: `import a.b` gives a.b,
    `from a import b` gives a and a.b (b may be a module), a relative import is resolved against `module`."""
    package = module.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level \
                else node.module
            base = base.rstrip(".")
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return names


def is_forbidden(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def test_the_folders_hold_modules_to_check():
    assert {path.parent.name for path in MODEL_FREE} >= {"engine", "data", "output", "runtime", "extract"}
    assert len(MODEL_FREE) > 20


@pytest.mark.parametrize("path", MODEL_FREE, ids=lambda path: str(path.relative_to(REPO)))
def test_imports_no_model(path):
    assert [name for name in imported_modules(path.read_text(), module_name(path)) if is_forbidden(name)] == []


@pytest.mark.parametrize("source, found", [
    ("import esm", ["esm"]),
    ("import esm.data as d", ["esm.data"]),
    ("from esm.constants import proteinseq_toks", ["esm.constants", "esm.constants.proteinseq_toks"]),
    ("from extract import models", ["extract.models"]),
    ("from extract.models.esm2 import embedder", ["extract.models.esm2", "extract.models.esm2.embedder"]),
    ("def f():\n    import extract.models.pooling", ["extract.models.pooling"]),
    ("from ..models import pooling", ["extract.models", "extract.models.pooling"]),
    ("from .. import models", ["extract.models"]),
    ("import esmfold_like\nfrom extract.modelsx import y\nfrom extract.data import fasta\nfrom . import job", []),
])
def test_every_form_of_import_is_seen(source, found):
    assert [name for name in imported_modules(source, "extract.engine.some_module") if is_forbidden(name)] == found
