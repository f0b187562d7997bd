"""The package's layers run one way, and tools and tests use only its public names (read from the source with `ast`).

Layers, lowest first: common -> format -> convert / pipelines / models -> trainer -> trainer.api -> the command lines
(trainer.cli, convert.cli, studies) -> the top-level package. A module may import a lower layer or its own
subpackage, never a higher layer or a sibling subpackage of its own layer, and the imports inside the library form
no cycle (a registry imports nothing of its adapters). Across subpackages, and from benchmarks/, tests/, launch/,
examples/ and train.py, only names a module lists in its `__all__` are imported, never an underscore name, and no
`._private` attribute is read (of our objects, Accelerate's or FFCV's). Each check also runs on a planted mistake,
so that a checker that found nothing because it looked at nothing would fail.
"""

from __future__ import annotations

import ast
import gc
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "beton_trainer"
SUBPACKAGES = ("common", "format", "convert", "pipelines", "models", "trainer", "studies", "recipes")
LAYERS = {  # module prefix -> layer; the longest prefix decides
    "beton_trainer.recipes": 0,
    "beton_trainer.common": 0,
    "beton_trainer.format": 1,
    "beton_trainer.convert": 2,
    "beton_trainer.pipelines": 2,
    "beton_trainer.models": 2,
    "beton_trainer.trainer": 3,
    "beton_trainer.trainer.api": 4,
    "beton_trainer.trainer.cli": 5,
    "beton_trainer.convert.cli": 5,
    "beton_trainer.convert.__main__": 5,
    "beton_trainer.studies": 5,
    "beton_trainer": 6,
}
TOOLS = ("benchmarks", "tests", "launch", "scripts", "train.py")
# torch's own testing hooks (not ours, Accelerate's or FFCV's) and namedtuple's public methods
ALLOWED_PRIVATE = {"_replace", "_asdict", "_fields", "_dynamo", "_python_dispatch"}


@dataclass(frozen=True)
class Import:
    importer: str  # module name (tools: their path)
    module: str  # what is imported from
    names: tuple[str, ...]  # the names taken from it (empty for `import module`)
    line: int
    typing_only: bool = False  # inside `if TYPE_CHECKING:` (never runs: no part of an import cycle)


def library_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for the package as a wheel lays it out."""
    found = {f"{PACKAGE}.{p.stem}" if p.stem != "__init__" else PACKAGE: p for p in (root / PACKAGE).glob("*.py")}
    for sub in SUBPACKAGES:
        for path in (root / sub).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)))
            found[name] = path
    return found


def tool_files(root: Path) -> list[Path]:
    files = []
    for tool in TOOLS:
        path = root / tool
        files += [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
    return [p for p in files if p.is_file()]


def parse(path: Path) -> ast.Module:
    """The file's syntax tree. CPython 3.11 keeps the AST constructor's depth counter in state that threads and
    re-entrant calls share (python/cpython gh-106905), so finalizers run by a garbage collection in the middle of
    `ast.parse` (CI saw numba's) can fail it with a spurious "AST constructor recursion depth mismatch". With the
    collector off no Python code runs, and no other thread is scheduled, while the tree is built."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text(), filename=str(path))
    finally:
        if enabled:
            gc.enable()


def imports_of(path: Path, name: str, is_package: bool) -> list[Import]:
    """Every import statement in the file, at any depth (functions, TYPE_CHECKING blocks), made absolute."""
    tree = parse(path)
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for stmt in block.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, (), node.lineno, id(node) in typing_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                module = ".".join([*base, module] if module else base)
            found.append(Import(name, module, tuple(a.name for a in node.names), node.lineno, id(node) in typing_only))
    return found


def layer(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return LAYERS[best] if best else None


def group(module: str) -> str:
    """The subpackage a module belongs to (the package's own __init__ is its own group)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def exported(path: Path) -> set[str] | None:
    """The module's `__all__` (a literal list or tuple, whose `*NAME` items unpack a literal dict's keys), or None
    without one."""
    body = parse(path).body
    literals = {t.id: node.value for node in body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name) and isinstance(node.value, ast.Dict)}
    for node in body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            names = set()
            for item in node.value.elts:
                if isinstance(item, ast.Starred) and isinstance(item.value, ast.Name):
                    names |= {k.value for k in literals[item.value.id].keys}
                else:
                    names.add(ast.literal_eval(item))
            return names
    return None


def direction_problems(root: Path) -> list[str]:
    modules = library_modules(root)
    problems, graph = [], {name: set() for name in modules}
    for name, path in modules.items():
        for imp in imports_of(path, name, path.stem == "__init__"):
            targets = [imp.module] + [f"{imp.module}.{n}" for n in imp.names]
            if imp.module.split(".")[0] not in (PACKAGE, *SUBPACKAGES):
                continue
            if imp.module.split(".")[0] in SUBPACKAGES:
                problems.append(f"{path.relative_to(root)}:{imp.line} imports top-level '{imp.module}' (a name a "
                                f"user's own folder can shadow); import {PACKAGE}.{imp.module}")
                continue
            target = next((t for t in reversed(targets) if t in modules), imp.module)
            mine, theirs = layer(name), layer(target)
            if theirs is None or mine is None:
                continue
            if theirs > mine or (theirs == mine and group(target) != group(name)):
                problems.append(f"{path.relative_to(root)}:{imp.line} imports {target} (layer {theirs}) from layer "
                                f"{mine}: against the layers' direction")
            if target in modules and target != name and not imp.typing_only:
                graph[name].add(target)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other (package __init__s excluded: a
    package imports its submodules to export them)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt.rsplit(".", 1)[0] == node or node.rsplit(".", 1)[0] == nxt:  # a package and its own module
                continue
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def public_name_problems(root: Path) -> list[str]:
    modules = library_modules(root)
    problems = []
    sources = [(name, path, path.stem == "__init__", True) for name, path in modules.items()]
    sources += [(str(p.relative_to(root)), p, False, False) for p in tool_files(root)]
    for name, path, is_package, in_library in sources:
        for imp in imports_of(path, name, is_package):
            if imp.module.split(".")[0] != PACKAGE or imp.module not in modules:
                if imp.module.split(".")[0] in ("accelerate", "ffcv", "nvidia") and not in_library:
                    problems += [f"{path.relative_to(root)}:{imp.line} imports private {imp.module}.{n}"
                                 for n in imp.names if n.startswith("_")]
                continue
            if in_library and group(imp.module) == group(name):
                continue  # inside one subpackage, anything goes
            public = exported(modules[imp.module])
            for n in imp.names:
                if f"{imp.module}.{n}" in modules:
                    continue  # a submodule
                if n.startswith("_") or public is None or n not in public:
                    problems.append(f"{path.relative_to(root)}:{imp.line} imports {imp.module}.{n}, which is not in "
                                    "its __all__")
        if not in_library:
            for node in ast.walk(parse(path)):
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                        and node.attr not in ALLOWED_PRIVATE \
                        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    problems.append(f"{path.relative_to(root)}:{node.lineno} reads the private attribute "
                                    f".{node.attr}")
    return problems


def test_every_library_module_says_what_it_exports():
    missing = [str(p.relative_to(ROOT)) for p in library_modules(ROOT).values()
               if exported(p) is None and p.name != "__main__.py"]
    assert not missing, f"modules without __all__: {missing}"


def test_imports_run_one_way_without_cycles():
    assert direction_problems(ROOT) == []


def test_tools_and_tests_use_public_names_only():
    assert public_name_problems(ROOT) == []


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A copy of the package's sources and tools to plant mistakes in."""
    for folder in (PACKAGE, *SUBPACKAGES, "benchmarks", "tests", "launch", "scripts"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "train.py", tmp_path / "train.py")
    return tmp_path


def plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


@pytest.mark.parametrize(("file", "line", "expected"), [
    ("format/beton.py", "from beton_trainer.pipelines.base import Loader", "against the layers' direction"),
    ("pipelines/memory.py", "from beton_trainer.convert.build import convert_dataset", "against the layers' direction"),
    ("trainer/loop.py", "from beton_trainer.trainer.api import Trainer", "against the layers' direction"),
    ("trainer/loop.py", "from models import build_model", "imports top-level 'models'"),
    ("models/registry.py", "from beton_trainer.models import timm_models", "import cycle"),
])
def test_a_planted_upward_import_is_found(planted, file, line, expected):
    plant(planted / file, line)
    problems = direction_problems(planted)  # an upward import also closes import cycles, listed after it
    module = "beton_trainer." + file.removesuffix(".py").replace("/", ".")
    assert problems and expected in problems[0] and (file in problems[0] or module in problems[0])


@pytest.mark.parametrize(("file", "line", "expected"), [
    ("benchmarks/loaders.py", "from beton_trainer.convert.build import _check_options", "not in its __all__"),
    ("tests/test_convert.py", "from beton_trainer.trainer.loop import prepare_phase", "not in its __all__"),
    ("benchmarks/cold_cache.py", "x = loader._loader", "private attribute ._loader"),
    ("tests/test_api.py", "from accelerate.state import _reset", "imports private accelerate.state._reset"),
])
def test_a_planted_private_use_is_found(planted, file, line, expected):
    plant(planted / file, line)
    problems = public_name_problems(planted)
    assert len(problems) == 1 and expected in problems[0]
