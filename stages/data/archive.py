"""Safe extraction of .zip / .tar / .tar.gz / .tgz / .tar.bz2 / .tar.xz archives.

Every entry is checked before anything is written, and the extraction itself is ours rather than
`TarFile.extractall` / `ZipFile.extractall`, so it behaves the same on every supported Python (3.10+, with or without
tarfile's extraction filters; CVE-2025-4517 showed that even `filter="data"` can be walked out of with symlinks).
The rules:

- names are relative POSIX paths: absolute paths, drive letters, `..` components, NUL bytes and components longer
  than 255 bytes are refused;
- only directories, regular files and links are extracted; device files, FIFOs and anything else are refused;
- **no link is ever created on disk.** A symlink or hard link whose target (resolved lexically from the link's
  folder, or from the root for hard links) is a regular file of the same archive is extracted as a copy of that
  file's bytes; a link to a directory, to another link, to a missing entry or to anything outside is refused. With
  no links on disk every path is lexical, so what the checks see is what is written;
- a name used twice, or used both as a file and as a directory (`a` a file and `a/b` a file), is refused;
- an archive whose files would not fit in the free space of the destination is refused before writing;
- nothing is overwritten: a file that already exists at an entry's place is an error, and every file is created with
  O_EXCL | O_NOFOLLOW below a directory whose real path is checked to lie inside the destination.
Modes are normalised (0o644, or 0o755 for executables; directories 0o755); owners are never set.
"""
from __future__ import annotations

import lzma
import os
import posixpath
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from .errors import DataError

ARCHIVE_SUFFIXES = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar", ".tgz": "tar", ".tar.bz2": "tar",
                    ".tar.xz": "tar"}
NAME_MAX = 255  # bytes in one path component on Linux/macOS file systems
# What a damaged or unusual archive makes the standard library raise (unsupported zip versions and compression
# methods, encrypted members, bad headers, truncated streams) besides a full disk.
READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, struct.error, OSError,
               NotImplementedError, RuntimeError, ValueError)


def archive_kind(path) -> str | None:
    """'zip', 'tar' or None, from the file name."""
    name = Path(path).name.lower()
    for suffix, kind in ARCHIVE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


@dataclass
class _Entry:
    name: str  # as written in the archive (for messages)
    path: str  # normalised relative POSIX path ("" for the root itself)
    kind: str  # "dir", "file", "symlink" or "hardlink"
    open: Callable[[], IO[bytes]] | None = None  # the bytes of a file entry
    link: str = ""  # a link's target as written
    size: int = 0  # bytes of a file entry (exact for tar; zip enforces its declared size while reading)
    executable: bool = False
    mtime: float | None = None


def _check_space(archive: Path, dest: Path, entries: list[_Entry], sources: dict[str, _Entry]) -> None:
    """Refuse an archive that would not fit on the destination's disk (a zip bomb fills it instead of failing)."""
    needed = sum(sources.get(entry.path, entry).size for entry in entries if entry.kind != "dir")
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise DataError(f"extracting needs {needed:,} bytes but only {free:,} are free in {dest}; nothing was "
                        "extracted", file=str(archive))


def _refuse(archive: Path, entry: str, reason: str, checked: bool = True) -> DataError:
    """`checked`: refused by the checks that run before anything is written."""
    after = "; nothing was extracted" if checked else ""
    shown = entry if len(entry) <= 120 else f"{entry[:60]}...{entry[-40:]}"  # hostile names run to kilobytes
    return DataError(f"refusing to extract entry {shown!r}: {reason}{after}", file=str(archive))


def _normalise(archive: Path, name: str) -> str:
    """The entry's relative path inside the destination ("" for `.`), or a DataError saying why it has none."""
    if "\x00" in name:
        raise _refuse(archive, name, "NUL byte in the name")
    text = name.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise _refuse(archive, name, "absolute path")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, name, "path contains '..'")
    for part in parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise _refuse(archive, name, f"a path component is longer than {NAME_MAX} bytes")
    return "/".join(parts)


def _link_target(archive: Path, entry: _Entry) -> str:
    """The normalised path a link points at (symlinks from their folder, hard links from the root)."""
    target = entry.link.replace("\\", "/")
    kind = "symlink" if entry.kind == "symlink" else "hard link"
    if not target or "\x00" in target:
        raise _refuse(archive, entry.name, f"{kind} with an empty or invalid target")
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise _refuse(archive, entry.name, f"{kind} to {entry.link!r} points outside the target dir")
    base = posixpath.dirname(entry.path) if entry.kind == "symlink" else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../"):
        raise _refuse(archive, entry.name, f"{kind} to {entry.link!r} points outside the target dir")
    return "" if resolved == "." else resolved


def _plan(archive: Path, entries: list[_Entry]) -> dict[str, _Entry]:
    """Check the whole archive; returns for each link entry the file entry whose bytes it gets."""
    kinds: dict[str, str] = {"": "dir"}  # path -> "dir", "file", "symlink" or "hardlink"
    owner: dict[str, _Entry] = {}
    for entry in entries:
        parents = entry.path.split("/")[:-1] if entry.path else []
        for depth in range(1, len(parents) + 1):
            parent = "/".join(parents[:depth])
            parent_kind = kinds.setdefault(parent, "dir")
            if parent_kind in ("symlink", "hardlink"):
                raise _refuse(archive, entry.name, f"it lies below {parent!r}, a link of this archive (nothing is "
                                                   "extracted through links)")
            if parent_kind != "dir":
                raise _refuse(archive, entry.name, f"{parent!r} is both a file and a directory in this archive")
        previous = kinds.get(entry.path)
        if previous is not None and (previous != "dir" or entry.kind != "dir"):
            what = "twice" if (previous == "dir") == (entry.kind == "dir") else "both as a file and as a directory"
            raise _refuse(archive, entry.name, f"the path {entry.path or '.'!r} appears {what} in this archive")
        kinds[entry.path] = entry.kind
        owner[entry.path] = entry
    sources: dict[str, _Entry] = {}
    for entry in entries:
        if entry.kind not in ("symlink", "hardlink"):
            continue
        target = _link_target(archive, entry)
        source = owner.get(target)
        kind = "symlink" if entry.kind == "symlink" else "hard link"
        if source is None:
            why = "a directory" if kinds.get(target) == "dir" else "no entry of this archive"
            raise _refuse(archive, entry.name, f"{kind} to {entry.link!r} names {why} (links are extracted as "
                                               "copies of regular files of the same archive only)")
        if source.kind != "file":
            what = {"dir": "a directory", "symlink": "a symlink", "hardlink": "a hard link"}[source.kind]
            raise _refuse(archive, entry.name, f"{kind} to {entry.link!r} names {what}, not a regular file "
                                               "(links are extracted as copies of regular files only)")
        sources[entry.path] = source
    return sources


def _inside(dest_real: str, path: str) -> bool:
    return path == dest_real or path.startswith(dest_real.rstrip(os.sep) + os.sep)


def _write(archive: Path, dest: Path, dest_real: str, entries: list[_Entry], sources: dict[str, _Entry]) -> None:
    for entry in entries:
        target = dest / entry.path if entry.path else dest
        try:
            if entry.kind == "dir":
                target.mkdir(mode=0o755, parents=True, exist_ok=True)
                if not _inside(dest_real, os.path.realpath(target)):
                    raise _refuse(archive, entry.name, "its directory resolves outside the target dir", False)
                continue
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if not _inside(dest_real, os.path.realpath(target.parent)):
                raise _refuse(archive, entry.name, "its directory resolves outside the target dir", False)
            source = sources.get(entry.path, entry)
            mode = 0o755 if source.executable else 0o644
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(target, flags, mode)
            except FileExistsError:
                raise _refuse(archive, entry.name, f"{target} already exists (extraction never overwrites)",
                              False) from None
            with os.fdopen(fd, "wb") as out, source.open() as data:
                shutil.copyfileobj(data, out, 1 << 20)
            if source.mtime is not None:
                os.utime(target, (source.mtime, source.mtime))
        except DataError:
            raise
        except READ_ERRORS as exc:  # a full disk, a truncated stream, an encrypted zip member...
            raise DataError(f"cannot extract entry {entry.name!r}: {exc}", file=str(archive)) from None


def _tar_entries(archive: Path, tar: tarfile.TarFile) -> list[_Entry]:
    entries = []
    for member in tar.getmembers():
        path = _normalise(archive, member.name)
        if member.isdir():
            kind = "dir"
        elif member.isreg():
            kind = "file"
        elif member.issym():
            kind = "symlink"
        elif member.islnk():
            kind = "hardlink"
        elif member.isdev() or member.isfifo():
            raise _refuse(archive, member.name, "device or fifo entry")
        else:
            raise _refuse(archive, member.name, f"unsupported entry type {member.type!r}")
        if not path and kind != "dir":
            raise _refuse(archive, member.name, "a file entry without a name")

        def open_member(member=member):
            stream = tar.extractfile(member)
            if stream is None:
                raise DataError(f"cannot read entry {member.name!r}", file=str(archive))
            return stream

        entries.append(_Entry(member.name, path, kind, open_member if kind == "file" else None, member.linkname,
                              member.size if kind == "file" else 0, bool(member.mode & 0o100),
                              float(member.mtime)))
    return entries


def _zip_entries(archive: Path, zf: zipfile.ZipFile) -> list[_Entry]:
    entries = []
    for info in zf.infolist():
        path = _normalise(archive, info.filename)
        mode = info.external_attr >> 16
        file_type = stat.S_IFMT(mode)
        if info.is_dir():
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "symlink"
        elif file_type in (0, stat.S_IFREG):
            kind = "file"
        else:
            raise _refuse(archive, info.filename, "device, fifo or socket entry")
        if not path and kind != "dir":
            raise _refuse(archive, info.filename, "a file entry without a name")
        link = ""
        if kind == "symlink":
            if info.file_size > 4096:
                raise _refuse(archive, info.filename, "symlink target longer than 4096 bytes")
            link = zf.read(info).decode("utf-8", "replace")
        entries.append(_Entry(info.filename, path, kind, (lambda info=info: zf.open(info)) if kind == "file" else None,
                              link, info.file_size if kind == "file" else 0, bool(mode & 0o100)))
    return entries


def safe_extract(archive, dest) -> list[str]:
    """Extract `archive` into `dest` after checking every entry (see the module doc); returns the entry names."""
    archive, dest = Path(archive), Path(dest)
    kind = archive_kind(archive)
    if kind is None:
        raise DataError(f"not a supported archive (expected one of {', '.join(ARCHIVE_SUFFIXES)})",
                        file=str(archive))
    try:
        dest.mkdir(parents=True, exist_ok=True)
        dest_real = os.path.realpath(dest)
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                entries = _zip_entries(archive, zf)
                sources = _plan(archive, entries)
                _check_space(archive, dest, entries, sources)
                _write(archive, dest, dest_real, entries, sources)
        else:
            with tarfile.open(archive, "r:*") as tar:
                entries = _tar_entries(archive, tar)
                sources = _plan(archive, entries)
                _check_space(archive, dest, entries, sources)
                _write(archive, dest, dest_real, entries, sources)
    except DataError:
        raise
    except READ_ERRORS as exc:
        raise DataError(f"cannot read archive: {exc or type(exc).__name__}", file=str(archive)) from None
    return [entry.name for entry in entries]
