"""Reads a workflow file with its `extends:` and `include:` files merged in, within the allowed directory trees and
the bounds on what one workflow may make the loader read (depth, file count, size; FIFOs and devices refused)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from vlflow.errors import WorkflowError
from vlflow.extend import merge_own_file
from vlflow.workflow.messages import suggest, type_name
from vlflow.workflow.yaml_lines import KeyPath, Locations, deep_merge, dotted, parse_yaml

TOP_LEVEL_KEYS = ("name", "include", "extends", "params", "defaults", "stages")
MAX_FILE_BYTES = 1 << 20  # one workflow or included file
MAX_INCLUDE_DEPTH = 32  # include/extends nesting
MAX_FILES_READ = 256  # include/extends files read in total (a file included twice counts twice)


class DocumentReader:
    def __init__(self, include_roots: list[Path]):
        self.include_roots = include_roots  # where include/extends may read
        self.files_read = 0

    def read_document(self, path: Path, chain: list[Path], origin: tuple[str, int | None, str] | None = None
                      ) -> tuple[dict, Locations]:
        """One file with its `extends` and `include`s merged in (the file itself wins)."""
        file = str(path)
        real = path.resolve()
        if real in chain:
            names = [str(p.name) for p in chain[chain.index(real):]] + [real.name]
            ofile, oline, ofield = origin
            raise WorkflowError("include cycle: " + " -> ".join(names), file=ofile, line=oline, field=ofield)
        if origin is not None:
            self.check_include(path, real, chain, origin)
        text = self.read_text(path, origin)
        data, locations = parse_yaml(text, file)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise WorkflowError(f"a workflow file must be a mapping of keys, got {type_name(data)}", file=file,
                                line=locations[()].line)
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                loc = locations[(key,)]
                raise WorkflowError(f"unknown top-level key {key!r}{suggest(key, TOP_LEVEL_KEYS)}", file=file,
                                    line=loc.line, field=key)
        chain = [*chain, real]
        merged: dict = {}
        merged_locs: Locations = {}
        bases: list[tuple[str, KeyPath]] = []
        if "extends" in data:
            extends = data.pop("extends")
            if not isinstance(extends, str) or not extends:
                loc = locations[("extends",)]
                raise WorkflowError(f"expected one file path, got {type_name(extends)}", file=file, line=loc.line,
                                    field="extends")
            bases.append((extends, ("extends",)))
        if "include" in data:
            includes = data.pop("include")
            if isinstance(includes, str):
                includes = [includes]
            if not isinstance(includes, list):
                loc = locations[("include",)]
                raise WorkflowError(f"expected a list of file paths, got {type_name(includes)}", file=file,
                                    line=loc.line, field="include")
            for index, item in enumerate(includes):
                item_path = ("include", index) if ("include", index) in locations else ("include",)
                if not isinstance(item, str) or not item:
                    raise WorkflowError(f"expected a file path, got {type_name(item)}", file=file,
                                        line=locations[item_path].line, field=dotted(item_path))
                bases.append((item, item_path))
        for relative, key_path in bases:
            origin_here = (file, locations[key_path].line, dotted(key_path))
            if "\x00" in relative or len(relative) > 4096:
                raise WorkflowError("invalid file path (a NUL byte, or longer than 4096 characters)", file=file,
                                    line=origin_here[1], field=origin_here[2])
            target = Path(os.path.normpath(path.parent / relative))
            base, base_locs = self.read_document(target, chain, origin_here)
            deep_merge(merged, merged_locs, base, base_locs)
        own_locs = {k: v for k, v in locations.items() if k and k[0] not in ("include", "extends")}
        merge_own_file(merged, merged_locs, data, own_locs, file)  # deep merge, but `replace:`/`delete:` stages
        merged_locs[()] = locations[()]
        return merged, merged_locs

    def check_include(self, path: Path, real: Path, chain: list[Path], origin: tuple[str, int | None, str]) -> None:
        """Refuse includes outside the allowed trees, too deep, or too many (before opening anything)."""
        ofile, oline, ofield = origin
        if not any(real.is_relative_to(root) for root in self.include_roots):
            roots = ", ".join(str(root) for root in self.include_roots)
            raise WorkflowError(f"included file {path} is outside the workflow's directory tree (allowed: {roots}; "
                                "add a directory to `[workflow] include_paths` in vlflow.toml to allow more)",
                                file=ofile, line=oline, field=ofield)
        if len(chain) >= MAX_INCLUDE_DEPTH:
            raise WorkflowError(f"include/extends nest more than {MAX_INCLUDE_DEPTH} files deep", file=ofile,
                                line=oline, field=ofield)
        self.files_read += 1
        if self.files_read > MAX_FILES_READ:
            raise WorkflowError(f"include/extends read more than {MAX_FILES_READ} files in total (a file included "
                                "from several places is read each time)", file=ofile, line=oline, field=ofield)

    def read_text(self, path: Path, origin: tuple[str, int | None, str] | None) -> str:
        """A regular file's text, at most MAX_FILE_BYTES; FIFOs and devices are refused without reading."""
        file = str(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it without reading.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            if origin is None:
                raise WorkflowError("workflow file not found", file=file) from None
            ofile, oline, ofield = origin
            raise WorkflowError(f"included file not found: {file}", file=ofile, line=oline, field=ofield) from None
        except OSError as exc:
            raise WorkflowError(f"cannot read workflow file: {exc.strerror or exc}", file=file) from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
            if origin is not None:
                ofile, oline, ofield = origin
                raise WorkflowError(f"included file {file} is {kind}, not a regular file", file=ofile,
                                    line=oline, field=ofield)
            raise WorkflowError(f"the workflow file is {kind}, not a regular file", file=file)
        with os.fdopen(fd, "rb") as handle:
            try:
                data = handle.read(MAX_FILE_BYTES + 1)
            except OSError as exc:
                raise WorkflowError(f"cannot read workflow file: {exc.strerror or exc}", file=file) from None
        if len(data) > MAX_FILE_BYTES:
            raise WorkflowError(f"file larger than {MAX_FILE_BYTES // (1 << 20)} MiB; workflow files are small",
                                file=file)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise WorkflowError(f"not UTF-8 text (byte 0x{data[exc.start]:02x})", file=file, line=line) from None
