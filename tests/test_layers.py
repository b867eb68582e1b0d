"""The house: no module imports one of a higher layer (the README's house table, bottom to top)."""

import ast
from pathlib import Path

import pytest

import parlay

LAYERS = [
    ("base", ["parlay.errors", "parlay.files"]),
    ("rules", ["parlay.games"]),
    ("settings", ["parlay.config", "parlay.specs"]),
    ("protocol", ["parlay.protocol", "parlay.prompts"]),
    ("records", ["parlay.episode", "parlay.lewis", "parlay.run", "parlay.seeds", "parlay.locking", "parlay.proxy"]),
    ("agents", ["parlay.agents"]),
    ("rollout", ["parlay.rollout", "parlay.testing"]),
    ("scale", ["parlay.distributed"]),
    ("improve", ["parlay.improve"]),
    ("evaluate", ["parlay.evaluate", "parlay.tracking"]),
    ("loop", ["parlay.league", "parlay.loop"]),
    ("serve", ["parlay.web"]),
    ("face", ["parlay.cli", "parlay.__main__"]),
]
ROOT = Path(parlay.__file__).parent


def layer_of(module: str) -> int | None:
    """Index of the layer that owns ``module`` (``parlay`` itself, the version, belongs to none)."""
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def imports(path: Path, module: str) -> set[str]:
    """Every parlay module ``path`` imports, at the top or inside a function."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "parlay" or m.startswith("parlay.")}


def test_every_module_has_a_layer():
    assert [m for m, _ in modules() if m != "parlay" and layer_of(m) is None] == []


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_no_module_imports_a_higher_layer(module, path):
    own = layer_of(module)
    if own is None:
        return
    above = sorted(
        f"{m} ({LAYERS[layer_of(m)][0]})"
        for m in imports(path, module)
        if layer_of(m) is not None and layer_of(m) > own
    )
    assert above == [], f"{module} ({LAYERS[own][0]}) imports from a higher layer: {above}"
