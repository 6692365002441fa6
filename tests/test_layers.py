"""docs/DESIGN.md's layering: each layer imports only from the layers listed before it (lazy
imports inside functions count too), so data flows one way and no import cycle can form."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastdiff"
# DESIGN.md's order; the root modules (config, files, progress, choices, distributed) serve every layer
LAYERS = [
    "ops",
    "diffusion",
    "models",
    "export",
    "evaluation",
    "engines",
    "training",
    "runs",
    "compat",
    "cli",
]
SHARED = {"config", "files", "progress", "choices", "distributed", "assets"}


def _imported_layers(path: Path) -> set[str]:
    """The fastdiff top-level packages ``path`` imports, relative imports resolved."""
    parts = path.relative_to(PACKAGE).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(parts[:-1])[: len(parts) - node.level]
            names = [".".join([*base, node.module or ""])]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastdiff."):
            names = [node.module.removeprefix("fastdiff.")]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("fastdiff.") for a in node.names if a.name.startswith("fastdiff.")]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n)
    return found


def test_each_layer_imports_only_the_layers_before_it():
    wrong = []
    for layer in LAYERS:
        allowed = set(LAYERS[: LAYERS.index(layer)]) | SHARED | {layer}
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for other in sorted(_imported_layers(path) - allowed):
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports fastdiff.{other}")
    assert not wrong, "\n".join(wrong)


def test_every_package_is_a_listed_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS) | SHARED, packages - set(LAYERS) - SHARED


def _private_imports(path: Path) -> list[str]:
    """The ``_name``s ``path`` imports from other fastdiff modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fastdiff.")):
            found += [
                f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_") and a.name[1] != "_"
            ]
    return found


def test_no_module_imports_another_modules_private_names():
    """A private helper is its module's own: a caller elsewhere uses a public name, so changing the
    helper cannot break a module that does not show it (tensorrt_engine used onnx_runtime's)."""
    found = {
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name in _private_imports(path)
    }
    # compat's unet keeps the original's public names only; its class map serves its sibling
    assert found == {"fastdiff/compat/guided_diffusion.py: unet._COMPAT_CLASS"}
