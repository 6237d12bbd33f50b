"""The software versions that shape a stage's results, recorded in each artifact's manifest.

Read from package metadata (and torch's generated `version.py` for its CUDA version) so that the engine process
never imports torch: `plan` and no-op runs stay fast.
"""
from __future__ import annotations

import ast
import importlib.util
import platform
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Distribution names whose versions change what a stage computes.
PACKAGES = ("torch", "transformers", "colossalai", "timm", "pyarrow", "tokenizers")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _torch_cuda() -> str | None:
    """`torch.version.cuda` (None for CPU builds), read from torch/version.py without importing torch."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "cuda" and isinstance(node.value, ast.Constant):
            return None if node.value.value is None else str(node.value.value)
    return None


@lru_cache(maxsize=1)
def current_environment() -> dict[str, str | None]:
    """{"python": "3.11.7", "torch": "2.14.1", "cuda": "13.0", ...}; None for what is not installed."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        found[name] = _package_version(name)
        if name == "torch":
            found["cuda"] = _torch_cuda() if found["torch"] else None
    return found


def environment_changes(recorded: dict | None, current: dict[str, str | None]) -> list[str]:
    """`torch 2.13.0 -> 2.14.1`, one per version that differs; [] when `recorded` is unknown (older artifacts)."""
    if not isinstance(recorded, dict):
        return []
    return [f"{name} {recorded.get(name) or 'absent'} -> {current.get(name) or 'absent'}"
            for name in current if name in recorded and recorded.get(name) != current.get(name)]


def describe(env: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in env.items() if value is not None)
