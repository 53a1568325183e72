"""Dependencies run one way. Read from the source (every `import`, at module level or inside a function), so a
stage that reaches into another, or a core module that imports a stage, fails here before it becomes a cycle:

- `exporter.core` imports nothing of r1deploy's outside itself;
- `quantize` imports only itself and `exporter.core`;
- nothing but the CLI (`exporter.cli`, `exporter.commands`) imports the CLI;
- the python models copied into a Triton repository import nothing of r1deploy's (they run without it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "quantize")
PYTHON_MODELS = ("exporter", "repository", "python_models")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """The r1deploy modules (or packages) one file imports, relative imports resolved."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] in PACKAGES:
                # `from exporter.core import artifacts` imports the module exporter.core.artifacts
                for alias in node.names:
                    sub = REPO.joinpath(*target.split("."), alias.name)
                    out.add(f"{target}.{alias.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
    return out


def graph() -> dict[str, tuple[Path, set[str]]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    return {module_name(p): (p, imported(p)) for p in files}


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


RULES = {
    "exporter.core imports only exporter.core": (lambda m: within(m, "exporter.core"), ("exporter.core",)),
    "quantize imports only quantize and exporter.core": (lambda m: within(m, "quantize"), ("quantize", "exporter.core")),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_dependencies_run_one_way(rule):
    applies, allowed = RULES[rule]
    g = graph()
    bad = sorted(f"{m} imports {t}" for m, (_, targets) in g.items() if applies(m)
                 for t in targets if not within(t, *allowed))
    assert any(applies(m) for m in g), f"{rule}: no module found (the rule would pass on nothing)"
    assert not bad, f"{rule}: " + "; ".join(bad)


def test_only_the_cli_imports_the_cli():
    cli = ("exporter.cli", "exporter.commands")
    bad = sorted(f"{m} imports {t}" for m, (_, targets) in graph().items() if not within(m, *cli)
                 for t in targets if within(t, *cli))
    assert not bad, "; ".join(bad)


def test_python_models_import_nothing_of_r1deploy():
    models = list(REPO.joinpath(*PYTHON_MODELS).glob("*.py"))
    assert len(models) >= 5
    bad = {p.name: sorted(imported(p)) for p in models if imported(p)}
    assert not bad, bad


def test_the_graph_sees_what_a_file_imports():
    """The reader itself: a relative import, a function-local one and a `from package import module` are all
    resolved (else every rule above would pass on an empty graph)."""
    g = graph()
    _, stage = g["quantize.stage"]
    assert {"exporter.core.artifacts", "exporter.core.errors", "quantize.config", "quantize.rewrite"} <= stage
    _, pipeline = g["exporter.pipeline"]
    assert "quantize" in pipeline  # imported inside run_pipeline
    assert "exporter.core.artifacts" in pipeline  # `from .core import artifacts`
