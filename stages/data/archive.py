"""Safe extraction of .zip / .tar / .tar.gz / .tgz archives.

Every entry is checked before anything is written: absolute paths, `..` components, links pointing outside the
target and device files are refused with an error naming the entry. Tar extraction then also runs with the
standard library's "data" filter.
"""
from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
from pathlib import Path

from .errors import DataError

ARCHIVE_SUFFIXES = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar", ".tgz": "tar", ".tar.bz2": "tar",
                    ".tar.xz": "tar"}


def archive_kind(path) -> str | None:
    """'zip', 'tar' or None, from the file name."""
    name = Path(path).name.lower()
    for suffix, kind in ARCHIVE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def _unsafe_name(name: str) -> str | None:
    """Why an entry name may not be extracted, or None."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        return "absolute path"
    if ".." in normalised.split("/"):
        return "path contains '..'"
    return None


def _link_escapes(entry_name: str, target: str, relative_to_entry: bool) -> bool:
    """Whether a link target resolves outside the extraction dir (symlinks resolve from the entry's folder)."""
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        return True
    base = posixpath.dirname(entry_name) if relative_to_entry else ""
    resolved = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    return resolved == ".." or resolved.startswith("../")


def _refuse(archive: Path, entry: str, reason: str) -> DataError:
    return DataError(f"refusing to extract entry {entry!r}: {reason}", file=str(archive))


def _check_tar(archive: Path, tar: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for member in members:
        reason = _unsafe_name(member.name)
        if reason is None and member.issym() and _link_escapes(member.name, member.linkname, True):
            reason = f"symlink to {member.linkname!r} points outside the target dir"
        if reason is None and member.islnk() and _link_escapes(member.name, member.linkname, False):
            reason = f"hard link to {member.linkname!r} points outside the target dir"
        if reason is None and (member.isdev() or member.isfifo()):
            reason = "device or fifo entry"
        if reason is None:
            try:
                tarfile.data_filter(member, str(dest))  # catches what the checks above may miss
            except tarfile.FilterError as exc:
                reason = str(exc)
        if reason is not None:
            raise _refuse(archive, member.name, reason)
    return members


def _check_zip(archive: Path, zf: zipfile.ZipFile) -> None:
    for info in zf.infolist():
        reason = _unsafe_name(info.filename)
        if reason is None and stat.S_ISLNK(info.external_attr >> 16):
            target = zf.read(info).decode("utf-8", "replace")
            if _link_escapes(info.filename, target, True):
                reason = f"symlink to {target!r} points outside the target dir"
        if reason is not None:
            raise _refuse(archive, info.filename, reason)


def safe_extract(archive, dest) -> list[str]:
    """Extract `archive` into `dest` after checking every entry; returns the entry names."""
    archive, dest = Path(archive), Path(dest)
    kind = archive_kind(archive)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                _check_zip(archive, zf)
                zf.extractall(dest)
                return zf.namelist()
        if kind == "tar":
            with tarfile.open(archive, "r:*") as tar:
                members = _check_tar(archive, tar, dest.resolve())
                tar.extractall(dest, members=members, filter="data")
                return [m.name for m in members]
    except (zipfile.BadZipFile, tarfile.ReadError, EOFError) as exc:
        raise DataError(f"cannot read archive: {exc}", file=str(archive)) from None
    raise DataError(f"not a supported archive (expected one of {', '.join(ARCHIVE_SUFFIXES)})", file=str(archive))

