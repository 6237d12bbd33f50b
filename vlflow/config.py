"""Project defaults from `vlflow.toml`, overridable by environment and CLI flags.

Precedence (lowest first): built-in defaults < vlflow.toml < VLFLOW_CACHE / VLFLOW_STATE_DIR < --cache / --state-dir.
Relative paths in vlflow.toml are relative to the file's directory, so a project behaves the same from any cwd.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from vlflow.errors import VlflowError

CONFIG_NAME = "vlflow.toml"


@dataclass
class ProjectConfig:
    cache_url: str = ".vlflow/cache"
    state_dir: Path = Path(".vlflow")
    launch: dict = field(default_factory=dict)  # defaults for every distributed stage's `launch`
    jobs: int = 1  # stages run concurrently when independent
    storage_options: dict = field(default_factory=dict)
    path: Path | None = None  # the vlflow.toml that was read, if any


def find_config(start: Path) -> Path | None:
    """The nearest vlflow.toml in `start` or its parents."""
    start = start.resolve()
    for folder in [start, *start.parents]:
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


def _is_url(value: str) -> bool:
    return "://" in value


def load_config(start: Path | None = None, cache: str | None = None, state_dir: str | None = None) -> ProjectConfig:
    start = Path.cwd() if start is None else start
    path = find_config(start if start.is_dir() else start.parent) or find_config(Path.cwd())
    config = ProjectConfig()
    base = Path.cwd()
    if path is not None:
        base = path.parent
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise VlflowError(f"invalid TOML: {exc}", file=str(path)) from None
        known = {"cache", "state", "launch", "run"}
        for section in data:
            if section not in known:
                raise VlflowError(f"unknown section [{section}] (known: {', '.join(sorted(known))})", file=str(path))
        cache_section = data.get("cache", {})
        config.cache_url = cache_section.get("url", config.cache_url)
        config.storage_options = cache_section.get("storage_options", {})
        config.state_dir = Path(data.get("state", {}).get("dir", str(config.state_dir)))
        config.launch = dict(data.get("launch", {}))
        config.jobs = int(data.get("run", {}).get("jobs", config.jobs))
        config.path = path
    if not _is_url(config.cache_url):
        config.cache_url = str((base / config.cache_url).resolve())
    config.state_dir = (base / config.state_dir).resolve()
    # values from the command line or environment are relative to the current directory
    override = cache or os.environ.get("VLFLOW_CACHE")
    if override:
        config.cache_url = override if _is_url(override) else str(Path(override).resolve())
    override = state_dir or os.environ.get("VLFLOW_STATE_DIR")
    if override:
        config.state_dir = Path(override).resolve()
    return config
