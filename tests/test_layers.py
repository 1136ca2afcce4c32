"""The packages' layering: a module imports only from its own layer or those below it, and the library
never imports the front ends. The table is the README's "Development" picture; a move that breaks it
fails here, naming the import and the line."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import persres

PACKAGE = Path(persres.__file__).parent

# Bottom to top. A module's layer is that of the longest name here its dotted path starts with.
LAYERS: list[tuple[str, ...]] = [
    # the root: settings, errors, files, images, strict reading; the method table they validate against
    ("persres", "persres.methods.catalog"),
    ("persres.testing",),  # tiny pipelines and published configs, for tests and benchmarks
    ("persres.backbones",),  # what each base-model family is: layers, conditioning, target, names
    ("persres.core",),  # residual layers, attention capture, LAG masks, tokens, pipeline loading
    ("persres.formats",),  # residual files, LoRA files, the run folder
    ("persres.methods",),  # residuals and the peer methods, each behind one protocol
    ("persres.inference",),  # sampling (normal, LAG), outputs, merge
    ("persres.training",),  # the training loop, checkpoints, data, prior images, validation
    ("persres.evaluation",),  # scorers, CC101, the benchmark, results, the report, the macro class
    ("persres.toyworld", "persres.app", "persres.cli", "persres.__main__"),  # front ends
]
FRONT_ENDS = ("persres.app", "persres.cli", "persres.__main__")
ROOT_NAMES = {"__version__"}  # what any module may take from the package itself


def layer_of(module: str) -> int:
    best, best_length = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every persres import in ``path``, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "persres":
            if node.module == "persres":
                found += [(node.lineno, f"persres.{a.name}") for a in node.names if a.name not in ROOT_NAMES]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "persres"]
    return found


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if module == "persres":
            continue  # the package's lazy table names what it re-exports, from every layer
        own = layer_of(module)
        for line, target in imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if target.startswith(FRONT_ENDS) and not module.startswith(FRONT_ENDS):
                found.append(f"{where}: the library imports the front end {target}")
            elif layer_of(target) > own:
                found.append(f"{where}: {module} (layer {own}) imports {target} (layer {layer_of(target)})")
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = [module_name(p) for p in PACKAGE.rglob("*.py") if layer_of(module_name(p)) < 0]
    assert not unplaced


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk itself: an import of the training loop from a core module is reported."""
    fake = tmp_path / "persres"
    (fake / "core").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "core" / "bad.py").write_text("from persres.training.train import train\nimport persres.cli\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = violations()
    assert len(found) == 2 and "persres.core.bad (layer 3) imports persres.training.train" in found[0]
    assert "front end persres.cli" in found[1]


def test_every_public_name_of_the_package_still_imports() -> None:
    """``from persres import ...`` keeps the names it had before the subpackages (their modules moved)."""
    before = {
        "ResidualConfig", "TrainConfig", "ResidualProjOut", "add_residuals", "count_parameters",
        "find_residuals", "fold_residuals", "merge_residuals", "remove_residuals", "residuals_disabled",
        "unmerge_residuals", "load_residuals", "read_residual_file", "save_residuals", "train",
        "SampleSettings", "sample", "Concept", "load_concepts", "load_pipeline",
    }  # fmt: skip
    assert before <= set(persres.__all__)
    for name in before:
        value = getattr(persres, name)
        assert callable(value) and value.__name__ == name, name
