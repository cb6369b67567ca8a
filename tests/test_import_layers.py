"""The package's import structure: no circles, and the layering rules of the README's Layout section.

Every import counts, at module level, inside a function or under `if TYPE_CHECKING:` alike: a lazy import
is still a dependency, and a circle hidden in a function is still a circle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# capo_fast/kernels is kernels/ at the repository root (setup.py's package_dir)
PACKAGES = {"capo_fast": ROOT / "capo_fast", "capo_fast.kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[0] == "kernels" and package == "capo_fast":  # the symlink, when present
                continue
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules an AST imports (`from capo_fast import x` counts as capo_fast.x when x is one)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph = {}
    for name, path in files.items():
        edges = imported_modules(ast.parse(path.read_text()), set(files)) - {name}
        # a package's __init__ re-exporting its own modules is not an arrow back up
        graph[name] = {m for m in edges if not m.startswith(name + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_and_type_checking_blocks_count():
    code = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from capo_fast.config import Config\n" \
           "def f():\n    from capo_fast import train\n    import capo_fast.kernels.aot\n"  # fmt: skip
    modules = {"capo_fast", "capo_fast.config", "capo_fast.train", "capo_fast.kernels", "capo_fast.kernels.aot"}
    assert imported_modules(ast.parse(code), modules) == {
        "capo_fast", "capo_fast.config", "capo_fast.train", "capo_fast.kernels.aot"
    }  # fmt: skip


def test_the_package_has_no_import_circles():
    graph = import_graph()
    assert "capo_fast.config" in graph and "capo_fast.kernels.policy_loss" in graph  # the walk found the package
    assert circles(graph) == []


# Registries and the pieces the config names are below it; tools never import the training loop; model
# resolution sits below the engines and the trainer.
BELOW_CONFIG = ["errors", "plugins", "reward", "critique", "credit", "data", "chain_arithmetic", "policy_losses",
                "critics", "engines", "weights", "distributed", "seeds", "metrics", "text_files", "local_models",
                "kernels"]
TOOLS = ["evaluate", "evaluate_judge", "memory_budget", "gpu_cost", "integrations.trl"]
BELOW_ENGINES_AND_TRAINER = ["models", "local_models", "weights"]


def depends_on(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_layering_rules():
    graph = import_graph()
    broken = []
    for low in BELOW_CONFIG:
        if "capo_fast.config" in depends_on(graph, f"capo_fast.{low}"):
            broken.append(f"{low} depends on config")
    for low in BELOW_ENGINES_AND_TRAINER:
        reached = depends_on(graph, f"capo_fast.{low}")
        broken += [f"{low} depends on {high}" for high in ("engines", "trainer") if f"capo_fast.{high}" in reached]
    assert broken == []


def layout_order() -> list[str]:
    """The modules of the README's Layout section, top to bottom, as dotted names."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") : readme.index("\n## ", readme.index("## Layout") + 1)]
    order, package = [], None
    for line in layout.splitlines():
        if not line.startswith(" "):
            package = {"capo_fast/": "capo_fast", "kernels/": "capo_fast.kernels"}.get(line.split(" ")[0])
            continue
        names = re.match(r"^  ((?:[\w/]+\.py(?:, )?)+)", line)
        if package and names:
            order += [f"{package}.{name.replace('/', '.')}" for name in re.findall(r"([\w/]+)\.py", names.group(1))]
    return order


def test_the_readme_layout_names_every_module_above_what_it_imports():
    order, graph = layout_order(), import_graph()
    files = [p for folder in PACKAGES.values() for p in folder.glob("*.py") if p.name != "__init__.py"]
    listed = {name.rpartition(".")[2] for name in order}
    assert files and [p.name for p in files if p.stem not in listed] == []
    position = {name: i for i, name in enumerate(order)}
    upward = [(m, d) for m in order for d in graph.get(m, ()) if d in position and position[d] < position[m]]
    assert upward == []


# The loop and the command-line tools sit on top side by side: what they share lives below them (scoring,
# model_shapes, deepspeed_settings), so none of them pulls in another's command.
TOP = ["train", *TOOLS]


def crossings(graph: dict[str, set[str]], top: list[str]) -> list[str]:
    """`a depends on b` for every two of `top` where a imports b, directly or through other modules."""
    names = {f"capo_fast.{m}": m for m in top}
    return sorted(f"{names[a]} depends on {names[b]}" for a in names for b in depends_on(graph, a) & set(names))


def test_the_crossing_finder_finds_a_planted_crossing():
    graph = {"capo_fast.train": {"capo_fast.low"}, "capo_fast.low": {"capo_fast.memory_budget"},
             "capo_fast.evaluate": {"capo_fast.data"}, "capo_fast.memory_budget": {"capo_fast.data"},
             "capo_fast.gpu_cost": {"capo_fast.low"}}  # fmt: skip
    # through a module below them, not only directly; sharing a lower module is no crossing
    assert crossings(graph, ["train", "evaluate", "memory_budget", "gpu_cost"]) == [
        "gpu_cost depends on memory_budget", "train depends on memory_budget"
    ]  # fmt: skip


def test_the_loop_and_the_tools_never_import_each_other():
    graph = import_graph()
    assert all(f"capo_fast.{m}" in graph for m in TOP)
    assert crossings(graph, TOP) == []

