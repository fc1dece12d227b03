"""The package's layout is its pipeline: every import goes to a module of the same or a lower level
(docs/architecture.md draws the levels) and no modules import each other in a cycle. Deferred imports
inside functions count; imports made only for type checkers do not."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dskd_batch"
LEVELS = [  # lowest first; a module's level is that of its first name under dskd_batch
    {"errors", "files", "locks", "logs", "data", "models", "losses", "distributed", "tracking", "generation"},
    {"cache"},  # the cache's format: records, codecs, the teacher head, writer, reader, alignment sidecars
    {"methods"},  # the methods and their registry
    {"config"},  # the typed configs, checked against the registries
    {"teacher"},  # stage one
    {"train"},  # stage two
    {"eval"},  # evaluation and comparison
    {"pipeline", "cli", "__main__", "__init__"},
]


def _level(module: str) -> int:
    head = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LEVELS) if head in names)


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = ("dskd_batch",) + f.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(f.read_text())
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.lineno in skip:
                continue
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for cand in [target] + [f"{target}.{a.name}" for a in node.names]:
                if cand in mods and cand != name:
                    graph[name].add(cand)
    return graph


def test_every_import_goes_to_the_same_or_a_lower_level() -> None:
    graph = import_graph()
    assert len(graph) > 30
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if _level(b) > _level(a))
    assert not upward, "imports that run back up the layout:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_documented_import_paths_still_work() -> None:
    from dskd_batch import open_cache  # noqa: F401
    from dskd_batch.config import AlignConfig, CacheConfig, DistillConfig, EvalConfig  # noqa: F401
    from dskd_batch.losses import DISTANCES
    from dskd_batch.methods import METHOD_CLASSES, LossInputs, LossSettings, Method  # noqa: F401

    assert {"fkl", "rkl", "js", "skl", "srkl", "akl"} <= set(DISTANCES)
    assert {"sft", "seqkd", "kd", "dskd", "dskd-eta", "dskd-cma", "mined", "uld"} <= set(METHOD_CLASSES)
