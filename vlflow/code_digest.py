"""Which source files a stage runs, found statically (ast), so its cache key follows exactly that code.

A stage executes its entry module, every module that module imports transitively, and the engine code that hosts it:
`vlflow.execute` (builds the context and validates params) for a local stage, `vlflow.launch.worker` (which imports
`vlflow.launch.booster`, the code that builds the Colossal-AI plugin) for a distributed one. The walk follows
`import a.b`, `from a import b` (b a submodule or a name), relative imports and imports inside functions, and counts
each imported module's parent packages (their `__init__` runs too). It stays inside the packages that make up a
stage's code: `vlflow` (with the stage library `vlflow.stages`) and the top-level package of the entry module (a
third-party stage package); torch, transformers etc. are versions, recorded in the environment, not hashed here.

Nothing is imported: files are located from the parent package's directories (`importlib.util.find_spec` is used
only for top-level packages and for subpackages mapped elsewhere by an installer, e.g. `vlflow.stages` -> stages/,
whose parent is already imported). Results are cached per process: a no-op run parses each file once.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ENGINE_ROOTS = {False: ("vlflow.execute",), True: ("vlflow.launch.worker",)}  # by StageSpec.distributed
NOT_RUN = frozenset({"vlflow.code_digest"})  # reached through vlflow.stage, but it only computes this digest


@dataclass(frozen=True)
class _Module:
    name: str
    path: Path  # the .py file (a package's __init__.py)
    search: tuple[str, ...] | None  # a package's directories; None for a plain module


@dataclass(frozen=True)
class CodeDigest:
    digest: str  # sha256 over (module name, file bytes) of every module below, in name order
    files: dict[str, str]  # display path (e.g. "stages/common/training.py") -> sha256 of the file


@lru_cache(maxsize=None)
def _locate(name: str) -> _Module | None:
    parent, _, leaf = name.rpartition(".")
    if not parent:
        spec = importlib.util.find_spec(name)  # top-level: finds, does not import
        return _from_spec(name, spec)
    owner = _locate(parent)
    if owner is None or owner.search is None:
        return None  # `from module import name`: a name, not a submodule
    for directory in owner.search:
        package = Path(directory) / leaf / "__init__.py"
        if package.is_file():
            return _Module(name, package, (str(package.parent),))
        module = Path(directory) / f"{leaf}.py"
        if module.is_file():
            return _Module(name, module, None)
    if parent in sys.modules:  # a subpackage an installer maps elsewhere (setup.py's package_dir)
        try:
            return _from_spec(name, importlib.util.find_spec(name))
        except (ImportError, ValueError):
            return None
    return None


def _from_spec(name: str, spec) -> _Module | None:
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    search = tuple(spec.submodule_search_locations) if spec.submodule_search_locations is not None else None
    return _Module(name, Path(spec.origin), search)


@lru_cache(maxsize=None)
def _imports(module: _Module) -> tuple[str, ...]:
    """Dotted names a module may import: modules, and `module.name` candidates for `from module import name`."""
    try:
        tree = ast.parse(module.path.read_bytes(), filename=str(module.path))
    except (SyntaxError, ValueError):  # the stage will fail when it runs; its bytes are still hashed
        return ()
    package = module.name if module.search is not None else module.name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    continue
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return tuple(found)


def _in_scope(name: str, scopes: tuple[str, ...]) -> bool:
    return any(name == scope or name.startswith(scope + ".") for scope in scopes)


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _display(module: _Module) -> str:
    """The file's path relative to the directory holding its top-level package (stages/... in a checkout)."""
    top = _locate(module.name.split(".")[0])
    if top is not None:
        root = top.path.parent.parent if top.search is not None else top.path.parent
        try:
            return module.path.relative_to(root).as_posix()
        except ValueError:
            pass
    top_dir = module.path
    for _ in module.name.split("."):
        top_dir = top_dir.parent
    try:
        return module.path.relative_to(top_dir).as_posix()
    except ValueError:
        return module.name


def modules_run_by(entry_module: str, distributed: bool) -> list[_Module]:
    """The in-scope modules a stage with this entry module executes (entry, its imports, engine host), by name."""
    scopes = tuple(sorted({"vlflow", entry_module.split(".")[0]}))
    roots = (entry_module, *ENGINE_ROOTS[bool(distributed)])
    seen: dict[str, _Module] = {}
    todo = [name for root in roots for name in _with_parents(root)]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_RUN or not _in_scope(name, scopes):
            continue
        module = _locate(name)
        if module is None:
            continue
        seen[name] = module
        for imported in _imports(module):
            todo += [n for n in _with_parents(imported) if n not in seen]
    return [seen[name] for name in sorted(seen)]


@lru_cache(maxsize=None)
def code_digest(entry_module: str, distributed: bool, salt: str = "") -> CodeDigest:
    """Digest of the code a stage runs (see the module docstring); `salt` is mixed in (stage name, version)."""
    overall = hashlib.sha256(salt.encode() + b"\0")
    files: dict[str, str] = {}
    for module in modules_run_by(entry_module, distributed):
        data = module.path.read_bytes()
        overall.update(module.name.encode() + b"\0" + data + b"\0")
        files[_display(module)] = hashlib.sha256(data).hexdigest()
    return CodeDigest(overall.hexdigest(), files)


def clear_cache() -> None:
    """Forget what was read (tests that edit source files within one process)."""
    _locate.cache_clear()
    _imports.cache_clear()
    code_digest.cache_clear()
