"""The package tree is the pipeline: each stage imports only the shared modules and the stages before it, and no
module imports itself back through others. Read from the source (ast), so a lazy import inside a function counts
as much as one at the top."""

import ast
from pathlib import Path

import bolaco

ROOT = Path(bolaco.__file__).parent
# pipeline order; a stage may import any stage of lower rank. Measurement (evaluate) is used by every stage, so it
# sits just above the shared modules; the command layer (cli, workspace, report) sees everything.
SHARED = {"_version", "errors", "registry", "store", "layers", "heatmap", "data", "study", "model", "arch"}
RANK = {**{m: 0 for m in SHARED}, "evaluate": 1, "calibrate": 2, "decompose": 3, "search": 4, "finetune": 5,
        "export": 6, "workspace": 7, "report": 7, "plan": 7, "__init__": 7, "commands": 8, "cli": 9, "__main__": 10}


def _module_name(path: Path) -> str:
    return ".".join(("bolaco", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """bolaco module -> the bolaco modules (or packages) it imports."""
    out = {}
    for path in ROOT.rglob("*.py"):
        if "resources" in path.parts:
            continue
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] != "bolaco":
                    continue
                for alias in node.names:    # `from bolaco import search` imports the package search
                    sub = f"{base}.{alias.name}"
                    found.add(sub if (ROOT / Path(*sub.split(".")[1:])).with_suffix(".py").exists()
                              or (ROOT / Path(*sub.split(".")[1:])).is_dir() else base)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "bolaco"}
        out[name] = found - {name}
    return out


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_each_stage_imports_only_earlier_stages():
    wrong = [f"{m} -> {t}" for m, targets in _imports().items() for t in targets
             if _stage(t) != _stage(m) and RANK[_stage(t)] >= RANK[_stage(m)] and _stage(m) not in SHARED]
    wrong += [f"{m} -> {t}" for m, targets in _imports().items() for t in targets
              if _stage(m) in SHARED and RANK[_stage(t)] > 1]   # shared modules may use measurement, nothing else
    assert not wrong, "imports against the pipeline order:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = _imports()
    # a package's __init__ imports its submodules; an import of the package reaches them through it
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt])
                                     if nxt in path else f"{node} -> {nxt}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_every_module_belongs_to_a_stage():
    assert {_stage(m) for m in _imports()} <= set(RANK)
