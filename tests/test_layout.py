"""The layout shows the architecture, and the import rules written in the README hold (read from the code).

    .venv/bin/python -m pytest -q tests/test_layout.py

- Packages: `jobs` imports no other package of the project; `evaluation` imports only `jobs`; `slurm` imports only
  `jobs`; `orchestrator` may import them all; nothing imports `orchestrator`.
- Inside `orchestrator`, layers from the bottom up: jsonl, search, config, tracking, reports, study, cli (and
  __main__): a module imports only its own layer and those below (lazy imports inside functions included).
- No import cycle between modules, lazy imports inside functions included (two modules that need each other
  are one piece, or a third module holds what they share).
- The login node stays torch-free: no orchestrator module imports torch, transformers or peft.
"""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "jobs", "evaluation", "slurm")
MAY_IMPORT = {"jobs": set(), "evaluation": {"jobs"}, "slurm": {"jobs"},
              "orchestrator": {"jobs", "evaluation", "slurm"}}
LAYERS = ["orchestrator.jsonl", "orchestrator.search", "orchestrator.config", "orchestrator.tracking",
          "orchestrator.reports", "orchestrator.study", "orchestrator.cli", "orchestrator.__main__"]
HEAVY = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The project modules `path` imports (`from a.b import c` names a.b.c when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    known = modules()
    return {n for n in names if n in known or n.split(".")[0] in HEAVY}


def layer(module: str) -> int:
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def test_packages_import_only_what_the_layout_allows():
    bad = []
    for module, path in modules().items():
        package = module.split(".")[0]
        for name in imports(path, top_level_only=False):
            other = name.split(".")[0]
            if other in PACKAGES and other != package and other not in MAY_IMPORT[package]:
                bad.append(f"{module} imports {name}")
    assert not bad, "imports the layout forbids:\n" + "\n".join(sorted(bad))


def test_orchestrator_layers_import_downwards_only():
    bad = []
    for module, path in modules().items():
        if not module.startswith("orchestrator.") or module == "orchestrator":
            continue
        for name in imports(path, top_level_only=False):
            if name.startswith("orchestrator.") and layer(name) > layer(module):
                bad.append(f"{module} (layer {LAYERS[layer(module)]}) imports {name} (layer {LAYERS[layer(name)]})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    known = modules()
    graph = {m: {n for n in imports(p, top_level_only=False) if n in known and n != m} for m, p in known.items()}
    cycles, index, low, stack, on, counter = [], {}, {}, [], set(), [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_login_node_code_never_imports_torch():
    bad = [f"{m} imports {n}" for m, p in modules().items() if m.startswith("orchestrator")
           for n in imports(p, top_level_only=False) if n.split(".")[0] in HEAVY]
    assert not bad, "\n".join(bad)


def test_the_readme_layout_table_names_every_orchestrator_subpackage():
    readme = (REPO / "README.md").read_text()
    for sub in sorted({m.split(".")[1] for m in modules() if m.count(".") >= 1 and m.startswith("orchestrator.")}):
        if (REPO / "orchestrator" / sub).is_dir():
            assert f"`orchestrator/{sub}/`" in readme, f"README's Layout does not name orchestrator/{sub}/"


def test_every_import_of_the_projects_packages_names_a_module_of_this_tree():
    """`from orchestrator.x import y` anywhere (product, tests, benches, examples) names a module or package that
    exists in this checkout, or a name in one: a path left over from a regrouping fails here, not only on a
    fresh machine (an editable install of another checkout can resolve it locally)."""
    def exists(parts: list) -> bool:
        path = REPO.joinpath(*parts)
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    missing = []
    for folder in ("orchestrator", "jobs", "evaluation", "slurm", "tests", "bench", "examples"):
        for file in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    parts = name.split(".")
                    if parts[0] in ("orchestrator", "jobs", "evaluation", "slurm") and not exists(parts):
                        missing.append(f"{file.relative_to(REPO)}:{node.lineno} {name}")
    assert not missing, missing
