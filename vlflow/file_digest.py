"""Content digests of the local files and directories that stage params name (weights, checkpoints, tokenizers).

A param marked `LocalFileParam` (vlflow.stage) whose value is an existing local path enters a stage's cache key by
what the path holds, as DVC keys a dependency: sha256 of a file, for a directory a digest over its files' relative
paths and sha256s. So replacing a checkpoint at the same path reruns the stage; a hub name stays keyed by its string.

Hashing a multi-GB checkpoint on every no-op run would cost seconds, so each file's digest is memoised in
`<state dir>/file_digests.json` under its real path with (size, mtime_ns, ctime_ns, inode, device): any write, touch,
replacement or rename changes one of them and the file is hashed again. A file changed within RACY_WINDOW_NS of the
hash is not memoised (its next write could fall in the same timestamp tick and leave all five unchanged: git's
"racily clean" case). The memo is only a cache: unreadable, damaged or lost, it is rebuilt by hashing.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

from vlflow.errors import VlflowError

MEMO_FILE = "file_digests.json"
RACY_WINDOW_NS = 2_000_000_000  # 2 s: the coarsest timestamp granularity of common filesystems (FAT, some NFS)
MAX_MEMO_ENTRIES = 100_000  # least recently used entries beyond this are dropped when the memo is written
_CHUNK = 1 << 20


def local_path(value: str) -> Path | None:
    """The existing local file or directory `value` names (a plain path, relative to the cwd as the stage process
    resolves it, or a file:// URL), else None: a hub name, another URL, or a path that does not exist."""
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif "://" in value or not value:
        return None
    path = Path(value)
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):  # missing, or a name no filesystem accepts: the stage's own validation says so
        return None
    return path if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else None


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class FileDigests:
    """sha256 digests of local files and directories, memoised across runs in `memo_path` (None: in memory only)."""

    def __init__(self, memo_path: Path | None = None):
        self.memo_path = memo_path
        self._memo: dict[str, list] | None = None
        self._dirty = False
        self.hashed: list[Path] = []  # files read by this instance (a no-op run reads none)

    def digest(self, path: Path, label: str) -> str:
        """`sha256:<hex>` of a file or `tree:<hex>` of a directory; `label` (e.g. `with.backbone_weights`) names
        the param in the one error an unreadable path gets."""
        try:
            if path.is_dir():
                result = "tree:" + self._tree(path)
            else:
                result = "sha256:" + self._file(path)
        except OSError as exc:
            raise VlflowError(f"{label}: cannot read {exc.filename or path}: {exc.strerror or exc}",
                              field=label) from None
        self._save()
        return result

    def _file(self, path: Path) -> str:
        real = os.path.realpath(path)
        before = os.stat(real)
        memo = self._load()
        entry = memo.get(real)
        if entry is not None and entry[:5] == _signature(before):
            entry[6] = time.time_ns()  # written with the next change: a no-op run writes nothing
            return entry[5]
        started = time.time_ns()
        sha = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
        self.hashed.append(Path(real))
        hexdigest = sha.hexdigest()
        after = os.stat(real)
        newest_change = max(after.st_mtime_ns, after.st_ctime_ns)
        if _signature(after) == _signature(before) and newest_change < started - RACY_WINDOW_NS:
            memo[real] = _signature(after) + [hexdigest, time.time_ns()]
        else:  # changed while read, or so recently that a same-tick write would go unseen: hash it next time too
            memo.pop(real, None)
        self._dirty = True
        return hexdigest

    def _tree(self, root: Path) -> str:
        """Digest over every file below `root` (symlinks followed, each directory once): its relative path and its
        sha256, in sorted order, plus the relative paths of the directories (an added empty one counts)."""
        lines = []
        seen: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_raise):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a second link to one directory
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            if rel_dir != ".":
                lines.append(f"d {rel_dir}")
            for name in sorted(filenames):
                full = Path(dirpath) / name
                if not full.is_file():  # broken symlinks, sockets, fifos: no contents a stage could load
                    continue
                lines.append(f"f {(full.relative_to(root)).as_posix()} {self._file(full)}")
        return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()

    def _load(self) -> dict[str, list]:
        if self._memo is None:
            self._memo = {}
            if self.memo_path is not None:
                try:
                    data = json.loads(self.memo_path.read_text())
                except (OSError, ValueError):
                    data = {}
                for path, entry in (data.items() if isinstance(data, dict) else ()):
                    if (isinstance(entry, list) and len(entry) == 7 and isinstance(entry[5], str)
                            and len(entry[5]) == 64 and all(type(v) is int for v in entry[:5] + entry[6:])):
                        self._memo[path] = entry
        return self._memo

    def _save(self) -> None:
        if not self._dirty or self.memo_path is None or self._memo is None:
            return
        self._dirty = False
        if not self.memo_path.parent.is_dir():  # `vlflow plan` before any run creates no state dir
            return
        entries = sorted(self._memo.items(), key=lambda item: item[1][6], reverse=True)[:MAX_MEMO_ENTRIES]
        tmp = self.memo_path.with_name(f".{self.memo_path.name}.{os.getpid()}.tmp")
        try:  # written beside and renamed: a concurrent run sees the old memo or this one, never half of one
            tmp.write_text(json.dumps(dict(entries)))
            os.replace(tmp, self.memo_path)
        except OSError:  # a read-only state dir: the digests stay correct, only the next run hashes again
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def _raise(exc: OSError) -> None:
    raise exc
