"""Import policy: the layer table of docs/design.md, checked on the source with `ast` (nothing is imported).

A module imports only from its own layer or a lower one, anymodal modules form no import cycle, nothing
outside `anymodal.commands` imports it, and the heavy third-party libraries stay in the files named below.
Every import counts, also those inside functions and under `if TYPE_CHECKING:`. A new file must be placed
in LAYERS (and in the table of docs/design.md).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------
# The policy, as plain data (keep in step with the "Layout and layers" table of docs/design.md).
# Paths are relative to the repository root; a path ending in "/" is a folder and holds every file under it.
# Entries that do not exist (yet) are allowed.

LAYERS: dict[str, list[str]] = {
    "L0": ["anymodal/config.py", "anymodal/batch.py", "anymodal/hardware.py", "anymodal/__init__.py",
           "anymodal/atomic.py"],
    "L1": ["anymodal/masks.py", "anymodal/nn/", "anymodal/diffusion/", "anymodal/layout.py", "anymodal/flops.py",
           "anymodal/parallel.py"],
    "L2": ["anymodal/tokenizers/"],
    "L3": ["anymodal/model/", "anymodal/losses.py", "anymodal/data/", "anymodal/evaluate/"],
    "L4": ["anymodal/systems/", "anymodal/checkpoint.py", "anymodal/encode.py"],
    "L5": ["anymodal/generate/"],
    "L6": ["anymodal/benchmark.py", "anymodal/train.py", "anymodal/text_lm.py"],
    "L7": ["anymodal/commands/", "anymodal/app/"],
}

# The top layer: nothing imports it except itself.
TOP = "anymodal.commands"

_LIGHTNING = ["anymodal/systems/", "anymodal/data/datamodule.py", "anymodal/train.py", "anymodal/commands/"]
_HUGGING_FACE = ["anymodal/tokenizers/text.py", "anymodal/model/convert.py", "anymodal/model/hf.py"]

# Top-level package of an absolute import -> the only places that may import it. (`tokenizers` is Hugging
# Face's: the repository's top-level tokenizers/ folder holds no Python, and anymodal's is anymodal.tokenizers.)
THIRD_PARTY: dict[str, list[str]] = {
    "lightning": _LIGHTNING,
    "pytorch_lightning": _LIGHTNING,
    "lightning_fabric": _LIGHTNING,
    "transformers": _HUGGING_FACE,
    "tokenizers": _HUGGING_FACE,
    "deepspeed": ["anymodal/checkpoint.py", "anymodal/systems/", "anymodal/train.py", "anymodal/strategies.py"],
    "gradio": ["anymodal/commands/", "anymodal/app/"],
}

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "anymodal"


# ---------------------------------------------------------------------------------------------------------
# The checker. It works on {path: source}, so the meta-tests can feed it synthetic modules.


def _matches(path: str, entry: str) -> int:
    """How specifically `entry` covers `path`: 0 not at all, else longer is more specific (a file beats a folder)."""
    if entry.endswith("/"):
        return len(entry) if path.startswith(entry) else 0
    return len(entry) + 1_000 if path == entry else 0


def layer_of(path: str) -> str | None:
    best, layer = 0, None
    for name, entries in LAYERS.items():
        for entry in entries:
            score = _matches(path, entry)
            if score > best:
                best, layer = score, name
    return layer


def allowed(path: str, entries: list[str]) -> bool:
    return any(_matches(path, entry) for entry in entries)


def rank(layer: str) -> int:
    return int(layer[1:])


def module_of(path: str) -> str:
    """anymodal/data/sources.py -> anymodal.data.sources; anymodal/data/__init__.py -> anymodal.data."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def path_of(module: str, paths: dict[str, str]) -> str:
    """The file of an anymodal module: known ones from `paths` or the repository, others guessed."""
    if module in paths:
        return paths[module]
    if module in _repository_paths():
        return _repository_paths()[module]
    guesses = [module.replace(".", "/") + ".py", module.replace(".", "/") + "/__init__.py"]
    return next((guess for guess in guesses if layer_of(guess)), guesses[0])


def imports_of(path: str, source: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) for every import in the file, relative ones resolved."""
    module = module_of(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target, names))
    return sorted(found)


def anymodal_targets(target: str, names: list[str], modules: set[str]) -> list[str]:
    """The anymodal modules one import depends on: `from anymodal.pkg import name` is anymodal.pkg.name when
    that is a module, else anymodal.pkg; `import anymodal.a.b` is the deepest known module on that path."""
    if names:
        deps = {f"{target}.{name}" if f"{target}.{name}" in modules else target for name in names}
        return sorted(deps)
    while target not in modules and "." in target:
        if target.rpartition(".")[0] == PACKAGE:
            break  # an unknown anymodal.x: keep its own name (it has no file yet)
        target = target.rpartition(".")[0]
    return [target]


def _find_cycle(graph: dict[str, dict[str, tuple[str, int]]], component: set[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component: [a, b, ..., a]."""
    start = min(component)
    stack, seen = [(start, [start])], {start}
    while stack:
        node, trail = stack.pop()
        for nxt in sorted(graph.get(node, {})):
            if nxt == start:
                return trail + [start]
            if nxt in component and nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, trail + [nxt]))
    return sorted(component)


def _components(graph: dict[str, dict[str, tuple[str, int]]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        result.append(component)
    return result


def check(sources: dict[str, str], known: set[str] | None = None) -> dict[str, list[str]]:
    """Check {path: source}; returns the violations of each rule as one-line messages.

    `known` are the anymodal module names that exist (default: those of `sources` and the real package)."""
    paths = {module_of(path): path for path in sorted(sources)}
    modules = set(paths) | (known if known is not None else set(_repository_paths()))
    layers, third_party, top = [], [], []
    graph: dict[str, dict[str, tuple[str, int]]] = {module: {} for module in paths}
    for path, source in sorted(sources.items()):
        here, own_layer = module_of(path), layer_of(path)
        for line, target, names in imports_of(path, source):
            head = target.partition(".")[0]
            if head != PACKAGE:
                if head in THIRD_PARTY and not allowed(path, THIRD_PARTY[head]):
                    where = ", ".join(THIRD_PARTY[head])
                    third_party.append(f"{path}:{line} imports {target} (only allowed in {where})")
                continue
            for dep in anymodal_targets(target, names, modules):
                if dep == here:
                    continue  # a module naming itself (e.g. in a lazy import) is no dependency
                graph[here].setdefault(dep, (path, line))
                dep_layer = layer_of(path_of(dep, paths))
                is_top = dep == TOP or dep.startswith(TOP + ".")
                if is_top and not (here == TOP or here.startswith(TOP + ".")):
                    top.append(f"{path}:{line} imports {dep} ({dep_layer}) from {own_layer}; "
                               f"nothing outside {TOP} imports it")
                elif dep_layer is None:
                    layers.append(f"{path}:{line} imports {dep} (no layer) from {own_layer}")
                elif own_layer is not None and rank(dep_layer) > rank(own_layer):
                    layers.append(f"{path}:{line} imports {dep} ({dep_layer}) from {own_layer}")
    cycles = []
    for component in _components(graph):
        cycle = _find_cycle(graph, component)
        where = ", ".join(f"{graph[a][b][0]}:{graph[a][b][1]}" for a, b in zip(cycle, cycle[1:]))
        cycles.append(f"import cycle {' -> '.join(cycle)} ({where})")
    return {"layers": layers, "third_party": third_party, "top": top, "cycles": sorted(cycles)}


@cache
def _repository_paths() -> dict[str, str]:
    return {module_of(p): p for p in (f.relative_to(ROOT).as_posix() for f in (ROOT / PACKAGE).rglob("*.py"))}


@cache
def _repository_report() -> dict[str, list[str]]:
    sources = {path: (ROOT / path).read_text(encoding="utf-8") for path in _repository_paths().values()}
    return check(sources)


def _assert_none(rule: str):
    violations = _repository_report()[rule]
    assert not violations, f"{len(violations)} import-policy violation(s):\n" + "\n".join(violations)


# ---------------------------------------------------------------------------------------------------------
# The policy on the repository.


def test_every_module_has_a_layer():
    missing = sorted(path for path in _repository_paths().values() if layer_of(path) is None)
    assert not missing, ("place these files in LAYERS (tests/test_import_policy.py) and the table of "
                         "docs/design.md:\n" + "\n".join(missing))


def test_layer_entries_are_inside_the_package():
    for entries in list(LAYERS.values()) + list(THIRD_PARTY.values()):
        for entry in entries:
            assert entry.startswith(PACKAGE + "/") and (entry.endswith("/") or entry.endswith(".py")), entry


def test_imports_go_down_the_layers():
    _assert_none("layers")


def test_nothing_imports_the_command_layer():
    _assert_none("top")


def test_third_party_libraries_stay_where_they_belong():
    _assert_none("third_party")


def test_no_import_cycles():
    _assert_none("cycles")


# ---------------------------------------------------------------------------------------------------------
# The checker can fail.


def test_checker_reports_an_upward_import():
    report = check({"anymodal/config.py": "import torch\n\nfrom anymodal.generate.engine import Engine\n"})
    assert report["layers"] == ["anymodal/config.py:3 imports anymodal.generate.engine (L5) from L0"]


def test_checker_sees_imports_inside_functions_and_relative_ones():
    source = "def f():\n    from ..generate import engine\n    import anymodal.systems.unified\n"
    report = check({"anymodal/data/fake.py": source}, known={"anymodal.generate.engine", "anymodal.systems.unified"})
    assert report["layers"] == [
        "anymodal/data/fake.py:2 imports anymodal.generate.engine (L5) from L3",
        "anymodal/data/fake.py:3 imports anymodal.systems.unified (L4) from L3",
    ]


def test_checker_reports_a_cycle():
    report = check({
        "anymodal/data/one.py": "from anymodal.data.two import B\n",
        "anymodal/data/two.py": "def f():\n    from anymodal.data import one\n",
    })
    assert report["layers"] == []
    assert report["cycles"] == [
        "import cycle anymodal.data.one -> anymodal.data.two -> anymodal.data.one "
        "(anymodal/data/one.py:1, anymodal/data/two.py:2)"
    ]


def test_checker_reports_the_command_layer_and_third_party():
    report = check({
        "anymodal/generate/fake.py": "from anymodal.commands.cli import main\n",
        "anymodal/model/fake.py": "import lightning.pytorch as pl\nfrom transformers import AutoModel\n",
        "anymodal/model/hf.py": "from transformers import AutoModel\nfrom anymodal import tokenizers\n",
        "anymodal/commands/fake.py": "import gradio\nfrom anymodal.commands import cli\n",
    })
    assert report["top"] == [
        "anymodal/generate/fake.py:1 imports anymodal.commands.cli (L7) from L5; nothing outside "
        "anymodal.commands imports it"
    ]
    assert report["third_party"] == [
        "anymodal/model/fake.py:1 imports lightning.pytorch (only allowed in anymodal/systems/, "
        "anymodal/data/datamodule.py, anymodal/train.py, anymodal/commands/)",
        "anymodal/model/fake.py:2 imports transformers (only allowed in anymodal/tokenizers/text.py, "
        "anymodal/model/convert.py, anymodal/model/hf.py)",
    ]
    assert report["layers"] == [] and report["cycles"] == []
