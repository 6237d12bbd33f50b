"""Project defaults from `vlflow.toml`, overridable by environment and CLI flags.

Precedence (lowest first): built-in defaults < vlflow.toml < VLFLOW_CACHE / VLFLOW_STATE_DIR < --cache / --state-dir.
Relative paths in vlflow.toml are relative to the file's directory, so a project behaves the same from any cwd.
Every section is a pydantic model with strict types: `jobs = true`, `jobs = "4"` or `url = 3` are errors naming
vlflow.toml and the line, never coerced. The `[launch]` section is checked against `LaunchSpec` here too, so a bad
project default is reported against vlflow.toml rather than against whichever workflow happens to use it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pydantic
import tomllib
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from vlflow.errors import VlflowError

CONFIG_NAME = "vlflow.toml"


def _plain_text(value: str) -> str:
    if any(ord(c) < 32 for c in value):
        raise ValueError("NUL bytes and control characters are not allowed in paths and URLs")
    return value


PathText = Annotated[StrictStr, AfterValidator(_plain_text)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CacheSection(_Section):
    url: PathText = Field(".vlflow/cache", min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)


class StateSection(_Section):
    dir: PathText = Field(".vlflow", min_length=1)


class RunSection(_Section):
    jobs: StrictInt = Field(1, ge=1, le=1024)


class WorkflowSection(_Section):
    include_paths: list[PathText] = Field(
        default_factory=list, description="directories (besides a workflow's own) that include/extends may read")


class ConfigFile(_Section):
    cache: CacheSection = Field(default_factory=CacheSection)
    state: StateSection = Field(default_factory=StateSection)
    launch: dict[str, Any] = Field(default_factory=dict)  # checked against LaunchSpec in load_config
    executor: dict[str, Any] = Field(default_factory=dict)  # checked against ExecutorSpec in _read_file
    run: RunSection = Field(default_factory=RunSection)
    workflow: WorkflowSection = Field(default_factory=WorkflowSection)


@dataclass
class ProjectConfig:
    cache_url: str = ".vlflow/cache"
    state_dir: Path = Path(".vlflow")
    launch: dict = field(default_factory=dict)  # defaults for every distributed stage's `launch`
    executor: dict = field(default_factory=dict)  # defaults for every stage's `executor` (shared_dirs absolute)
    jobs: int = 1  # stages run concurrently when independent
    storage_options: dict = field(default_factory=dict)
    include_paths: list[Path] = field(default_factory=list)  # absolute; include/extends may read below them
    path: Path | None = None  # the vlflow.toml that was read, if any
    state_dir_origin: str = "the default state dir"  # where state_dir came from, for error messages

    def ensure_state_dir(self) -> Path:
        """The state dir, created if needed; a VlflowError naming its origin when it is not a writable directory."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.state_dir, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except (FileExistsError, NotADirectoryError):
            raise VlflowError(f"state dir {self.state_dir} (from {self.state_dir_origin}) is not a directory; "
                              "give a directory with --state-dir") from None
        except OSError as exc:
            raise VlflowError(f"cannot use state dir {self.state_dir} (from {self.state_dir_origin}): "
                              f"{exc.strerror or exc}; give a writable directory with --state-dir") from None
        return self.state_dir


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


def _line_of(text: str, section: str | None, key: str | None) -> int | None:
    """The line of `key = ...` inside `[section]` (or of the section header), for error messages."""
    current = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(1)
            if key is None and current == section:
                return number
            continue
        if key is not None and current == section and re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", line):
            return number
    return None


def _read_file(path: Path) -> ConfigFile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VlflowError(f"cannot read the project config: {exc}", file=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise VlflowError(f"invalid TOML: {message}", file=str(path),
                          line=int(match.group(1)) if match else None) from None
    try:
        config = ConfigFile.model_validate(data)
        if config.launch:
            from vlflow.stage import LaunchSpec
            from vlflow.workflow import bool_for_number, launch_conflict

            try:
                problem = bool_for_number(LaunchSpec, config.launch) or launch_conflict(LaunchSpec(**config.launch))
            except pydantic.ValidationError as exc:
                raise _config_error(exc, path, text, prefix=("launch",)) from None
            if problem is not None:
                key, message = problem
                raise VlflowError(f"{key}: {message}", file=str(path), line=_line_of(text, "launch", key))
        if config.executor:
            from vlflow.executors.spec import ExecutorSpec
            from vlflow.workflow import bool_for_number

            problem = bool_for_number(ExecutorSpec, config.executor)
            if problem is not None:
                raise VlflowError(f"{problem[0]}: {problem[1]}", file=str(path),
                                  line=_line_of(text, "executor", problem[0]))
            try:
                ExecutorSpec(**config.executor)
            except pydantic.ValidationError as exc:
                raise _config_error(exc, path, text, prefix=("executor",)) from None
        return config
    except pydantic.ValidationError as exc:
        raise _config_error(exc, path, text) from None


def _config_error(exc: pydantic.ValidationError, path: Path, text: str, prefix: tuple = ()) -> VlflowError:
    error = exc.errors()[0]
    loc = [*prefix, *(str(part) for part in error["loc"])]
    section = loc[0] if loc else None
    key = loc[1] if len(loc) > 1 else None
    if error["type"] == "extra_forbidden" and key is None:
        known = ", ".join(ConfigFile.model_fields)
        message = f"unknown section [{section}] (known: {known})"
    elif error["type"] == "extra_forbidden":
        message = f"unknown key {key!r} in [{section}]"
        if prefix == ("executor",):
            import difflib

            from vlflow.executors.spec import ExecutorSpec

            close = difflib.get_close_matches(key, list(ExecutorSpec.model_fields), n=1)
            message += f" (did you mean {close[0]!r}?)" if close else ""
    else:
        got = error.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 60 else type(got).__name__
        problem = error["msg"].removeprefix("Value error, ")
        if problem[:1].isupper() and not problem[1:2].isupper():  # "Input should be" -> "input should be"; not "NUL"
            problem = problem[0].lower() + problem[1:]
        message = f"{'.'.join(loc[1:]) or section}: {problem}, got {shown}"
        if prefix == ("launch",):
            message += " (the [launch] section holds the defaults of every distributed stage's `launch`)"
        if prefix == ("executor",):
            message += " (the [executor] section holds the defaults of every stage's `executor`)"
    line = _line_of(text, section, key) if key else (_line_of(text, section, None) or _line_of(text, None, section))
    return VlflowError(message, file=str(path), line=line)


def load_config(start: Path | None = None, cache: str | None = None, state_dir: str | None = None) -> ProjectConfig:
    start = Path.cwd() if start is None else start
    path = find_config(start if start.is_dir() else start.parent) or find_config(Path.cwd())
    config = ProjectConfig()
    base = Path.cwd()
    if path is not None:
        base = path.parent
        data = _read_file(path)
        _check_cache_url(data.cache.url, None, path, _line_of(path.read_text(encoding="utf-8"), "cache", "url"))
        config.cache_url = data.cache.url
        config.storage_options = data.cache.storage_options
        config.state_dir = Path(data.state.dir)
        config.state_dir_origin = f"[state] dir in {path}"
        config.launch = dict(data.launch)
        config.executor = dict(data.executor)
        if "shared_dirs" in config.executor:  # relative to vlflow.toml, like the cache and state dirs
            config.executor["shared_dirs"] = [str((base / d).resolve()) for d in config.executor["shared_dirs"]]
        config.jobs = data.run.jobs
        config.include_paths = [(base / p).resolve() for p in data.workflow.include_paths]
        config.path = path
    if not _is_url(config.cache_url):
        config.cache_url = str((base / config.cache_url).resolve())
    config.state_dir = (base / config.state_dir).resolve()
    # values from the command line or environment are relative to the current directory
    for flag, value in (("--cache", cache), ("--state-dir", state_dir)):
        if value is not None and not value.strip():
            wanted = "cache URL or directory" if flag == "--cache" else "directory"
            raise VlflowError(f"{flag} is empty; give a {wanted} (or leave the flag out to use vlflow.toml's)")
    override, origin = (cache, "--cache") if cache is not None else (os.environ.get("VLFLOW_CACHE"), "VLFLOW_CACHE")
    if override:
        _check_cache_url(override, origin)
        config.cache_url = override if _is_url(override) else str(Path(override).resolve())
    override, origin = ((state_dir, "--state-dir") if state_dir is not None
                        else (os.environ.get("VLFLOW_STATE_DIR"), "VLFLOW_STATE_DIR"))
    if override:
        config.state_dir = Path(override).resolve()
        config.state_dir_origin = origin
    return config


def _check_cache_url(url: str, origin: str | None, file: Path | None = None, line: int | None = None) -> None:
    """`origin` names the flag or variable; `file`/`line` the vlflow.toml entry."""
    from vlflow.secrets import strip_userinfo

    prefix = f"{origin}: " if origin else ""
    where = {"file": str(file) if file else None, "line": line}
    if any(ord(c) < 32 for c in url):
        raise VlflowError(f"{prefix}the cache URL contains control characters", **where)
    if strip_userinfo(url) != url:  # fsspec would take `KEY:SECRET@bucket` for a bucket name and print it
        raise VlflowError(f"{prefix}credentials in the cache URL ({strip_userinfo(url).split('://')[0]}://***@...) "
                          "are not supported; give them through the environment (e.g. AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY) or [cache] storage_options in vlflow.toml", **where)
