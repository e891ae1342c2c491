"""lmcore's import graph, read from the source files with ``ast`` (nothing is imported).

Two users: the stage wiring (``lmcore.stages``), which declares each stage's code dependencies as
the import closure of its entry module, so that DVC (``dvc.yaml``) and the Prefect cache key
agree on what a stage runs; and the architecture test, which fails on an import circle or an
import that goes up a layer.
"""

from __future__ import annotations

import ast
import dataclasses
from functools import cache
from pathlib import Path

from lmcore.core.io import fingerprint

PACKAGE = "lmcore"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
"""The folder of the ``lmcore`` package."""


@dataclasses.dataclass(frozen=True)
class Import:
    """One import of a module inside the package."""

    source: str
    """The importing module (``lmcore.eval.evaluate``)."""
    target: str
    """The imported module: ``from lmcore.x import y`` names ``lmcore.x.y`` when that is a module,
    else ``lmcore.x``."""
    line: int
    top_level: bool
    """At module level (else inside a function or class body)."""
    reason: str | None
    """The text after ``lazy:`` in a comment on the line or the line above (the one-line reason
    a function-level import must give)."""


def module_path(name: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py``), or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    rel = Path(path).resolve().relative_to(package_dir.resolve()).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every module of the package, sorted."""
    return sorted(module_name(p, package_dir) for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)


def _reason(lines: list[str], node: ast.stmt) -> str | None:
    """The ``# lazy: <reason>`` comment on the import's line or on the comment and import lines
    right above it (one comment may cover a group of imports)."""
    i = node.lineno - 1
    while i >= 0:
        text = lines[i]
        if "# lazy:" in text:
            return text.split("# lazy:", 1)[1].strip() or None
        if i < node.lineno - 1 and not text.strip().startswith(("#", "from ", "import ")):
            return None
        i -= 1
    return None


def _top_level_nodes(tree: ast.Module) -> set[int]:
    """ids of the import statements at module level, including under ``if``/``try`` there."""
    out: set[int] = set()
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.add(id(node))
        elif isinstance(node, (ast.If, ast.Try)):
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            for h in getattr(node, "handlers", []):
                stack.extend(h.body)
    return out


@cache
def _parsed(name: str, package_dir: Path) -> tuple[Path, ast.Module, list[str], set[int]]:
    """Module ``name``'s file, syntax tree, source lines and module-level import nodes (ids)."""
    path = module_path(name, package_dir)
    if path is None:
        raise KeyError(name)
    src = path.read_text(encoding="utf-8")
    tree = ast.parse(src)
    return path, tree, src.splitlines(), _top_level_nodes(tree)


@cache
def imports_of(name: str, package_dir: Path = PACKAGE_DIR) -> tuple[Import, ...]:
    """The imports of package modules in module ``name``, in source order. A ``TYPE_CHECKING``
    block counts as not imported at run time (left out)."""
    path, tree, lines, top = _parsed(name, package_dir)
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for b in node.body for n in ast.walk(b)}
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                targets.append(sub if module_path(sub, package_dir) else mod)
        else:
            continue
        for t in targets:
            if t.split(".")[0] == PACKAGE and module_path(t, package_dir) is not None:
                found.append(Import(name, t, node.lineno, id(node) in top, _reason(lines, node)))
    return tuple(sorted(found, key=lambda i: (i.line, i.target)))


def clear_cache() -> None:
    """Forget what was read: for a caller that edits source files between two reads."""
    _parsed.cache_clear()
    imports_of.cache_clear()


def function_level_imports(name: str, package_dir: Path = PACKAGE_DIR) -> list[tuple[int, str, str | None]]:
    """Every import inside a function or class body of module ``name``, of any module (lmcore's
    or another package's): ``(line, imported module, the # lazy: reason or None)``."""
    _, tree, lines, top = _parsed(name, package_dir)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            mod = node.names[0].name if isinstance(node, ast.Import) else "." * node.level + (node.module or "")
            out.append((node.lineno, mod, _reason(lines, node)))
    return sorted(out)


def parents(name: str) -> list[str]:
    """The packages Python imports before module ``name``: ``lmcore``, ``lmcore.data``..."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any level)."""
    return {m: {i.target for i in imports_of(m, package_dir)} for m in modules(package_dir)}


def closure(entry: str, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every package module that importing ``entry`` and running its functions may execute: the
    modules it imports, at module level or inside functions, transitively, with their parent
    packages' ``__init__`` modules. Sorted."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(i.target for i in imports_of(m, package_dir))
        todo.extend(p for p in parents(m) if module_path(p, package_dir))
    return sorted(seen)


def closure_files(entry: str, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The source files of :func:`closure`, as paths relative to the project folder
    (``lmcore/eval/evaluate.py``), sorted."""
    root = package_dir.parent
    files = {module_path(m, package_dir).relative_to(root).as_posix() for m in closure(entry, package_dir)}  # type: ignore[union-attr]
    return sorted(files)


def closure_fingerprint(entry: str, package_dir: Path = PACKAGE_DIR) -> str:
    """A hash of the contents of :func:`closure_files`: the code a stage run of ``entry`` ran."""
    return fingerprint(*(package_dir.parent / f for f in closure_files(entry, package_dir)))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of a graph: its strongly connected components with more than one module
    (or a module importing itself), each sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)
