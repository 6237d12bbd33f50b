"""Content-addressed artifact store on any fsspec filesystem (local dir, memory://, s3://, ...).

Layout under the store URL:

    artifacts/<key>/manifest.json     written last, in one step; the only thing readers trust
    artifacts/<key>/<attempt>/...     the files of one commit attempt (attempt = uuid4 hex)
    refs/<name>.json                  small JSON records (e.g. the last run of a workflow stage)

A commit copies (or, on the same local filesystem, moves) the files into a fresh attempt dir while hashing them, then
writes the manifest. A commit that dies midway leaves only an unreferenced attempt dir, which `garbage()` reports and
`gc()` deletes. Reading a manifest never touches artifact data, so checking a cached stage costs one small read.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Iterator, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from vlflow.secrets import Masker, looks_secret, strip_userinfo
from vlflow.store_packs import PACK_BYTES, PACK_FILE_LIMIT, build_pack, plan_packs, unpack

try:
    from vlflow.errors import StoreError
except ImportError:  # vlflow.errors not there yet: keep the store usable alone
    class StoreError(ValueError):  # type: ignore[no-redef]
        pass

log = logging.getLogger("vlflow.store")

MANIFEST_NAME = "manifest.json"
FILES_SUFFIX = ".files.json"  # artifacts/<key>/<attempt>.files.json: the file list of that attempt
MANIFEST_FORMAT = 2
META_DIR = "_vlflow"  # runner bookkeeping inside an artifact (logs, metrics): left out of `data_digest`
COMPLETE_MARKER = ".complete"
CHUNK = 4 * 1024 * 1024
REMOTE_WORKERS = 8  # concurrent uploads to object stores (I/O bound, so threads are fine)
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# Modules whose exceptions mean "the storage backend failed" (wrapped into StoreError), as opposed to bugs.
_STORAGE_ERROR_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs", "urllib3")

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)


def _plain_relative_path(path: str) -> str:
    """A file inside an artifact: relative, '/'-separated, no '.', '..' or empty parts (nothing outside the attempt)."""
    if "\0" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"{path!r} is not a plain relative path inside the artifact")
    return path


_Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_Count = Annotated[int, Field(ge=0, strict=True)]
_Name = Annotated[str, Field(pattern=_SAFE_KEY.pattern, max_length=200)]  # one plain path part: no '/', no '..'


class _ManifestSummary(BaseModel):
    """What `manifest.json` must hold; anything else makes the artifact unusable (the stage runs again)."""

    model_config = ConfigDict(extra="ignore")

    format: Literal[2]
    key: _Name
    attempt: _Name
    created: Annotated[float, Field(allow_inf_nan=False)]
    digest: _Hex64
    data_digest: _Hex64
    size: _Count
    file_count: _Count
    meta: dict = Field(default_factory=dict)


_RelativePath = Annotated[str, AfterValidator(_plain_relative_path)]


class _Pack(BaseModel):
    """One pack object of an object-store attempt (vlflow.store_packs): where its members lie."""

    model_config = ConfigDict(extra="forbid")

    path: _RelativePath  # inside the attempt dir
    size: _Count
    files: list[tuple[_Count, _Count]]  # (index into the file list, offset in the pack)


class _FileList(BaseModel):
    """What `<attempt>.files.json` must hold: [path, size, sha256] per file, and the packs holding the small files
    of an object-store attempt (absent on a local cache; a reader that ignores them finds those files missing)."""

    model_config = ConfigDict(extra="ignore")

    format: Literal[2]
    digest: _Hex64
    files: list[tuple[_RelativePath, _Count, _Hex64]]
    packs: list[_Pack] = Field(default_factory=list)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "value"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {error['msg']}{more}"


@dataclass
class FileEntry:
    path: str  # posix path relative to the artifact root
    size: int
    sha256: str
    pack: str | None = None  # object stores: the pack object (path inside the attempt dir) that holds the bytes
    offset: int = 0  # where they start in the pack


class Manifest:
    """A committed artifact.

    `manifest.json` holds this summary only; the file list lives beside it in `<attempt>.files.json` and is read on
    first use of `files`, so checking whether a stage is cached costs one small read even for 20k-file artifacts.
    """

    def __init__(self, key: str, attempt: str, created: float,
                 files: list[FileEntry] | Callable[[], list[FileEntry]], digest: str, meta: dict | None = None,
                 *, size: int | None = None, file_count: int | None = None, data_digest: str | None = None) -> None:
        self.key = key
        self.attempt = attempt
        self.created = created
        self.digest = digest  # sha256 over the sorted (path, size, sha256) triples: identifies the content
        self.meta = meta if meta is not None else {}  # runner-provided: stage, uses, params, metrics, duration, ...
        self._files, self._load_files = (None, files) if callable(files) else (list(files), None)
        self._size = size if size is not None else sum(entry.size for entry in self._files)
        self.file_count = file_count if file_count is not None else len(self._files)
        # Like `digest`, but without the runner's bookkeeping under `_vlflow/` (logs, metrics), which differ between
        # two runs that produce the same data.
        self.data_digest = data_digest if data_digest is not None else files_digest(self.files, exclude=META_DIR)

    @property
    def files(self) -> list[FileEntry]:
        if self._files is None:
            self._files = self._load_files()
        return self._files

    @property
    def size(self) -> int:
        """Total bytes of the artifact's files."""
        return self._size

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return self.summary() == other.summary()

    def __repr__(self) -> str:
        return (f"Manifest(key={self.key!r}, attempt={self.attempt!r}, files={self.file_count}, size={self.size}, "
                f"digest={self.digest[:12]!r})")

    def summary(self) -> dict:
        return {"format": MANIFEST_FORMAT, "key": self.key, "attempt": self.attempt, "created": self.created,
                "digest": self.digest, "data_digest": self.data_digest, "size": self.size,
                "file_count": self.file_count, "meta": self.meta}

    @classmethod
    def from_summary(cls, text: str | bytes, load_files: Callable[[str, str, str], list[FileEntry]]) -> "Manifest":
        """Parse `manifest.json`; `load_files(key, attempt, digest)` reads the file list when it is first needed.

        Raises ValueError when the summary is malformed: every field is validated (the key and attempt are plain
        names, so a hand-edited attempt can never point a reader outside the artifact's directory)."""
        try:
            data = _ManifestSummary.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(_first_error(exc)) from None
        if data.attempt == MANIFEST_NAME or data.attempt.endswith(FILES_SUFFIX):
            raise ValueError(f"attempt: {data.attempt!r} is not an attempt directory name")
        return cls(key=data.key, attempt=data.attempt, created=data.created,
                   files=functools.partial(load_files, data.key, data.attempt, data.digest), digest=data.digest,
                   meta=data.meta, size=data.size, file_count=data.file_count, data_digest=data.data_digest)

    def files_json(self) -> str:
        listing: dict = {"format": MANIFEST_FORMAT, "digest": self.digest,
                         "files": [[e.path, e.size, e.sha256] for e in self.files]}
        packs: dict[str, dict] = {}
        for index, entry in enumerate(self.files):
            if entry.pack is not None:
                pack = packs.setdefault(entry.pack, {"path": entry.pack, "size": 0, "files": []})
                pack["size"] = max(pack["size"], entry.offset + entry.size)
                pack["files"].append([index, entry.offset])
        if packs:
            listing["packs"] = list(packs.values())
        return json.dumps(listing, separators=(",", ":"))

    def pack_sizes(self) -> dict[str, int]:
        """{pack path inside the attempt dir: size} (empty unless the artifact's small files were packed)."""
        sizes: dict[str, int] = {}
        for entry in self.files:
            if entry.pack is not None:
                sizes[entry.pack] = max(sizes.get(entry.pack, 0), entry.offset + entry.size)
        return sizes


def files_digest(files: list[FileEntry], exclude: str | None = None) -> str:
    """sha256 over the sorted (path, size, sha256) triples, leaving out the top-level dir `exclude`."""
    skip = None if exclude is None else exclude.rstrip("/") + "/"
    lines = (f"{e.path}\0{e.size}\0{e.sha256}\n" for e in sorted(files, key=lambda e: e.path)
             if skip is None or not e.path.startswith(skip))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars in metrics
        return obj.item()
    return str(obj)


def _secret_values(options: dict) -> set[str]:
    """Values of credential-like storage options (nested), plus AWS credentials from the environment."""
    found: set[str] = set()

    def walk(value, name=""):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, str) and looks_secret(name):
            found.add(value)

    walk(options)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if len(os.environ.get(var, "")) >= 4:
            found.add(os.environ[var])
    return found


def _plain_local_root(url: str) -> str | None:
    """The absolute path that fsspec's LocalFileSystem would use for `url` when it is a plain local path (`DIR`,
    `./DIR/`, `~/DIR`, `file://DIR`), else None (any other protocol, or a chained `a::b` URL)."""
    path = url[len("file://"):] if url.startswith("file://") else url
    if not path or "://" in path or "::" in path:
        return None
    return os.path.abspath(os.path.expanduser(path)).rstrip("/")


def _protocol(url: str) -> str:
    """The protocol of an fsspec URL (`file` when it names none), without importing fsspec."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)(://|::)", url)
    return match.group(1) if match else "file"


def _is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORAGE_ERROR_MODULES


class ArtifactStore:
    """Committed artifacts under one fsspec URL. See the module docstring for the layout."""

    def __init__(self, url: str, storage_options: dict | None = None, *, local_cache: Path | None = None,
                 pack_file_limit: int = PACK_FILE_LIMIT, pack_bytes: int = PACK_BYTES,
                 keep_committed: bool = False) -> None:
        """`local_cache`: where `materialize` puts local copies of a remote store's artifacts (`<digest>/`).
        `pack_file_limit`: on an object store, files smaller than this are committed in pack objects of about
        `pack_bytes` (vlflow.store_packs; 0 stores every file as its own object). A local cache never packs.
        `keep_committed`: a commit to a remote store moves the committed dir into `local_cache` as the artifact's
        local copy (one rename: the caller neither deletes thousands of staged files nor downloads them again)."""
        options = dict(storage_options or {})
        local_root = _plain_local_root(url) if not options else None
        protocol = "file" if local_root is not None else _protocol(url)
        if protocol in ("s3", "s3a") and not _has_endpoint(options):
            endpoint = os.environ.get("VLFLOW_S3_ENDPOINT_URL") or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
            if endpoint:
                options["client_kwargs"] = {**options.get("client_kwargs", {}), "endpoint_url": endpoint}
        self._storage_options = options
        self._masker = Masker(_secret_values(options), env=os.environ)  # vlflow.secrets: the one masker
        self.url = strip_userinfo(url.rstrip("/")) or url
        self._fs = None  # a plain local path: fsspec's LocalFileSystem on first use of `fs` (see there)
        if local_root is not None:
            root, self.is_local = local_root, True
        else:
            try:
                import fsspec
                from fsspec.implementations.local import LocalFileSystem

                self._fs, root = fsspec.core.url_to_fs(url, **options)
            except Exception as exc:  # unknown protocol, missing backend package, bad options
                raise StoreError(f"cannot open the artifact store {self.url}: {self._scrub(exc)}") from None
            self.is_local = isinstance(self._fs, LocalFileSystem)
        self.pack_file_limit = 0 if self.is_local else pack_file_limit
        self.pack_bytes = pack_bytes
        self.keep_committed = keep_committed and not self.is_local
        self._root = root.rstrip("/")  # "" for the filesystem root: paths then start with "/"
        if local_cache is None:
            local_cache = Path(os.environ.get("VLFLOW_LOCAL_CACHE") or Path.home() / ".cache" / "vlflow" / "mirror")
        self.local_cache = Path(local_cache)
        self._ahead: dict[int, _ReadAhead] = {}  # per thread: manifests read ahead (read_ahead)
        self._file_lists: dict[tuple[str, str, str], list[FileEntry]] = {}  # object stores: (key, attempt, digest)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    @property
    def fs(self):
        """The fsspec filesystem. For a plain local path it is made on first use: importing fsspec (and asyncio)
        cost a no-op run about a tenth of its time, and a no-op on a local cache reads its manifests with open()."""
        if self._fs is None:
            from fsspec.implementations.local import LocalFileSystem

            self._fs = LocalFileSystem()
        return self._fs

    @property
    def identity(self) -> str:
        """Where the cache is, normalised (realpath for a local dir, protocol + path otherwise), without
        credentials: `DIR`, `./DIR/` and `file://DIR` are one cache."""
        if self.is_local:
            return "file://" + os.path.realpath(self._root or "/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self._root.lstrip('/')}"

    def lock(self, name: str, *, label: str, on_wait: Callable[[str], None] | None = None,
             timeout: float | None = None):
        """An exclusive lock called `name` ('/'-separated plain names, e.g. `keys/<key>`) that every run using this
        cache meets, whatever its state dir or spelling of the URL: a file lock under `<cache>/locks/` for a local
        cache, a lease object there for object stores (see vlflow.lock). `label` names it in messages."""
        from vlflow.lock import CacheLock, LeaseLock

        parts = name.split("/")
        if any(not _SAFE_KEY.match(part) for part in parts):
            raise StoreError(f"invalid lock name {name!r}: use letters, digits, '_', '-', '.' and '/' separators")
        if self.is_local:
            return CacheLock(Path(self._path("locks", *parts[:-1], parts[-1] + ".lock")), name=label,
                             on_wait=on_wait, timeout=timeout)
        return LeaseLock(self.fs, self._path("locks", *parts) + ".json", name=label, on_wait=on_wait,
                         timeout=timeout)

    # -- paths -------------------------------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self._root, *parts])

    def _key_dir(self, key: str) -> str:
        _check_key(key)
        return self._path("artifacts", key)

    def _manifest_path(self, key: str) -> str:
        return f"{self._key_dir(key)}/{MANIFEST_NAME}"

    def _ref_path(self, name: str) -> str:
        parts = name.split("/")
        if not name or any(not _SAFE_KEY.match(part) for part in parts):
            raise StoreError(f"invalid ref name {name!r}: use letters, digits, '_', '-', '.' and '/' separators")
        return self._path("refs", *parts[:-1], parts[-1] + ".json")

    # -- errors ------------------------------------------------------------------------------------------------------

    def _scrub(self, exc: BaseException | str) -> str:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        return self._masker.mask(text, assignments=True)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn backend failures (botocore, OSError, ...) into a StoreError naming the URL, without credentials."""
        try:
            yield
        except StoreError:
            raise
        except Exception as exc:
            if not _is_storage_error(exc):
                raise
            raise StoreError(f"cannot {action} in the artifact store {self.url}: {self._scrub(exc)}") from None

    # -- reading -----------------------------------------------------------------------------------------------------

    def manifest(self, key: str) -> Manifest | None:
        """The committed manifest of `key`, or None (also when it is corrupt, with a warning). One small read, or
        none inside `read_ahead` when that read it already."""
        path = self._manifest_path(key)
        ahead = self._ahead.get(threading.get_ident())
        if ahead is not None:
            ahead.asked.append(key)
            data = ahead.read.pop(key, None)
            if isinstance(data, FileNotFoundError):
                return None
            if isinstance(data, bytes):
                return self._parse_manifest(key, data)
        with self._errors(f"read the manifest of {key}"):
            try:
                data = self._read_small(path)
            except FileNotFoundError:
                return None
        return self._parse_manifest(key, data)

    @contextmanager
    def read_ahead(self, name: str) -> Iterator[None]:
        """Within the block, the manifests that the same caller (`name`, e.g. the planner of one workflow) asked
        for last time on this machine are read first, all at once, then served by `manifest()` on this thread
        (each once; what is left is dropped at the end). A chain of stages must read its manifests one after the
        other, as each key depends on the manifest before it; on an object store this turns N sequential requests
        into N concurrent ones. Only a hint: a key asked for that was not read ahead is read as usual. The keys
        asked for are remembered in a small local file (`local_cache/.read-ahead/`); a local store does nothing."""
        if self.is_local:
            yield
            return
        hint_file = self.local_cache / ".read-ahead" / (
            hashlib.sha256(f"{self.identity}\0{name}".encode()).hexdigest()[:32] + ".json")
        try:
            hinted = [key for key in json.loads(hint_file.read_text()) if isinstance(key, str) and _SAFE_KEY.match(key)]
        except (OSError, ValueError, TypeError):
            hinted = []
        ahead = _ReadAhead(read=self._read_many([self._manifest_path(key) for key in hinted], hinted))
        self._ahead[threading.get_ident()] = ahead
        try:
            yield
        finally:
            del self._ahead[threading.get_ident()]
        if ahead.asked != hinted:
            _write_quietly(hint_file, json.dumps(ahead.asked).encode())

    def _read_many(self, paths: list[str], keys: list[str]) -> dict[str, bytes | BaseException]:
        """{key: contents or the exception} of small objects, read concurrently (one GET each on s3)."""
        if not paths:
            return {}
        options = {"max_concurrency": 1} if getattr(self.fs, "max_concurrency", 1) > 1 else {}
        with self._errors("read manifests"):
            contents = self.fs.cat(paths, on_error="return", **options)
        return {key: contents.get(path, FileNotFoundError(path)) for key, path in zip(keys, paths)}

    def _read_small(self, path: str) -> bytes:
        """A small object in one request. s3fs's cat_file asks for the size first (a HEAD, to split large objects
        into concurrent ranged GETs) unless told to read with one connection: manifests, file lists and refs are
        small, so a no-op run makes one request per stage, not two."""
        if self.is_local:
            with open(path, "rb") as f:
                return f.read()
        if getattr(self.fs, "max_concurrency", 1) > 1:  # s3fs
            return self.fs.cat_file(path, max_concurrency=1)
        return self.fs.cat_file(path)

    def _parse_manifest(self, key: str, data: bytes) -> Manifest | None:
        try:
            manifest = Manifest.from_summary(data, self._load_files)
            if manifest.key != key:
                raise ValueError(f"it names key {manifest.key}")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring corrupt manifest of artifact %s in %s (%s); the stage will run again",
                        key, self.url, exc)
            return None
        return manifest

    def _load_files(self, key: str, attempt: str, digest: str) -> list[FileEntry]:
        known = self._file_lists.get((key, attempt, digest))
        if known is not None:  # an attempt's file list never changes: `open` of many files reads it once
            return known
        path = f"{self._key_dir(key)}/{attempt}{FILES_SUFFIX}"
        with self._errors(f"read the file list of artifact {key}"):
            data = self._read_small(path)
        try:
            parsed = _FileList.model_validate_json(data)
        except ValidationError as exc:
            raise StoreError(f"artifact {key} in {self.url} has a corrupt file list ({_first_error(exc)}); remove "
                             f"it with `vlflow verify --drop` or rerun its stage with --force") from None
        files = [FileEntry(path, size, sha) for path, size, sha in parsed.files]
        problem = _place_packed(files, parsed.packs)
        if problem:
            raise StoreError(f"artifact {key} in {self.url} has a corrupt file list ({problem}); remove it with "
                             f"`vlflow verify --drop` or rerun its stage with --force")
        if files_digest(files) != digest:
            raise StoreError(f"artifact {key} in {self.url}: its file list does not match the manifest digest; "
                             f"remove it with `vlflow verify --drop` or rerun its stage with --force")
        if not self.is_local:
            self._file_lists[(key, attempt, digest)] = files
        return files

    def has(self, key: str) -> bool:
        return self.manifest(key) is not None

    def _require(self, key: str) -> Manifest:
        manifest = self.manifest(key)
        if manifest is None:
            raise StoreError(f"no committed artifact {key} in the artifact store {self.url}")
        return manifest

    def _attempt_dir(self, manifest: Manifest) -> str:
        return f"{self._key_dir(manifest.key)}/{manifest.attempt}"

    # -- integrity ---------------------------------------------------------------------------------------------------

    def damage(self, manifest: Manifest) -> list[str]:
        """Cheap check that an artifact's files are there as committed: each recorded file exists with its recorded
        size and nothing else is in the attempt dir. A local store stats only; an object store lists the attempt once.
        Returns the problems found ([] when intact); `verify` also re-hashes the contents."""
        try:
            files = manifest.files
        except StoreError as exc:
            return [str(exc)]
        found, problems = self._sizes(self._attempt_dir(manifest))
        for entry in files:
            if entry.pack is not None:
                continue
            size = found.pop(entry.path, None)
            if size is None:
                problems.append(f"{entry.path} is missing")
            elif size != entry.size:
                problems.append(f"{entry.path} has {size} bytes, the manifest says {entry.size}")
        for pack, expected in manifest.pack_sizes().items():
            size = found.pop(pack, None)
            held = sum(1 for entry in files if entry.pack == pack)
            if size is None:
                problems.append(f"pack {pack} (holding {held} files) is missing")
            elif size != expected:
                problems.append(f"pack {pack} (holding {held} files) has {size} bytes, the manifest says {expected}")
        problems += [f"{path} is not in the manifest" for path in sorted(found)]
        return problems

    def _sizes(self, root: str) -> tuple[dict[str, int], list[str]]:
        """{relative path: size} of the regular files under `root`, and the entries that are not regular files."""
        if self.is_local:
            return _local_sizes(root)
        sizes: dict[str, int] = {}
        with self._errors(f"list {root}"):
            self.fs.invalidate_cache(root)
            try:
                listing = self.fs.find(root, detail=True)
            except FileNotFoundError:
                listing = {}
        prefix = root.rstrip("/") + "/"
        for path, info in listing.items():
            if info.get("type") == "file" and path.startswith(prefix):
                sizes[path[len(prefix):]] = int(info.get("size") or 0)
        return sizes, []

    def verify(self, manifest: Manifest, progress: ProgressCallback | None = None) -> list[str]:
        """Full check: `damage` plus a re-hash of every file against its recorded sha256."""
        problems = self.damage(manifest)
        if problems:
            return problems
        root = self._attempt_dir(manifest)
        tracker = _Progress(progress, manifest.size)
        for pack in manifest.pack_sizes():
            members = sorted((e for e in manifest.files if e.pack == pack), key=lambda e: e.offset)
            with self._errors(f"read {manifest.key}/{pack}"), self.fs.open(f"{root}/{pack}", "rb") as f:
                for entry in members:
                    f.seek(entry.offset)
                    digest, _ = _copy_hashing(_Window(f, entry.size), _NullWriter(), tracker)
                    if digest != entry.sha256:
                        problems.append(f"{entry.path} (in pack {pack}) has other contents than committed (sha256 "
                                        f"{digest[:12]}…, the manifest says {entry.sha256[:12]}…)")
        for entry in manifest.files:
            if entry.pack is not None:
                continue
            with self._errors(f"read {manifest.key}/{entry.path}"), self.fs.open(f"{root}/{entry.path}", "rb") as f:
                digest, size = _copy_hashing(f, _NullWriter(), tracker)
            if size != entry.size:
                problems.append(f"{entry.path} has {size} bytes, the manifest says {entry.size}")
            elif digest != entry.sha256:
                problems.append(f"{entry.path} has other contents than committed (sha256 {digest[:12]}…, "
                                f"the manifest says {entry.sha256[:12]}…)")
        return problems

    def open(self, key: str, relpath: str, mode: str = "rb"):
        """Open one file of a committed artifact for reading."""
        if "r" not in mode or any(c in mode for c in "wax+"):
            raise StoreError(f"artifacts are read-only: cannot open {key}/{relpath} with mode {mode!r}")
        manifest = self._require(key)
        parts = relpath.strip("/").split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise StoreError(f"invalid file name {relpath!r} in artifact {key}: use a plain relative path")
        relpath = "/".join(parts)
        if not self.is_local:  # a small file may be inside a pack: the file list says where (one more small read)
            entry = next((e for e in manifest.files if e.path == relpath), None)
            if entry is not None and entry.pack is not None:
                with self._errors(f"open {key}/{relpath}"):
                    data = self.fs.cat_file(f"{self._attempt_dir(manifest)}/{entry.pack}", start=entry.offset,
                                            end=entry.offset + entry.size) if entry.size else b""
                return io.BytesIO(data) if "b" in mode else io.TextIOWrapper(io.BytesIO(data))
        with self._errors(f"open {key}/{relpath}"):
            try:
                return self.fs.open(f"{self._attempt_dir(manifest)}/{relpath}", mode)
            except FileNotFoundError:
                raise StoreError(f"artifact {key} in {self.url} has no file {relpath!r}") from None

    def list(self) -> list[Manifest]:
        """All committed artifacts, oldest first."""
        key_dirs = self._key_dirs()
        if not key_dirs:
            return []
        paths = [f"{d}/{MANIFEST_NAME}" for d in key_dirs]
        contents = self._read_many(paths, paths)  # concurrent on object stores
        manifests = []
        for path in paths:
            data = contents.get(path)
            if data is None or isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):
                raise StoreError(f"cannot read {path} in the artifact store {self.url}: {self._scrub(data)}")
            key = path.rsplit("/", 2)[-2]
            manifest = self._parse_manifest(key, data)
            if manifest is not None:
                manifests.append(manifest)
        return sorted(manifests, key=lambda m: m.created)

    def _ls(self, path: str) -> list[dict]:
        self.fs.invalidate_cache(path)  # another process may have committed since the last listing
        try:
            return self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    def _key_dirs(self) -> list[str]:
        with self._errors("list artifacts"):
            entries = self._ls(self._path("artifacts"))
        return sorted(e["name"].rstrip("/") for e in entries if e["type"] == "directory")

    # -- materialising -----------------------------------------------------------------------------------------------

    def materialize(self, key: str, dest: Path | None = None) -> Path:
        """A local directory holding the artifact's files.

        Local store: the committed attempt dir itself (no copy; treat it as read-only). Other stores: downloaded into
        `dest` (default: `local_cache/<digest>`), reused when a `.complete` marker with the manifest digest is there.
        """
        manifest = self._require(key)
        if self.is_local:
            path = Path(self._attempt_dir(manifest))
            if not path.is_dir():
                raise StoreError(f"artifact {key} in {self.url} is committed but its files are missing ({path})")
            return path
        dest = Path(dest) if dest is not None else self.local_cache / manifest.digest
        with _lock_for(dest):  # parallel stages of one run often need the same upstream artifact
            if _read_marker(dest) == manifest.digest:
                if not _copy_damage(manifest, dest):
                    return dest
                log.warning("the local copy %s of artifact %s was changed since it was downloaded; downloading it "
                            "again", dest, key)
                (dest / COMPLETE_MARKER).unlink(missing_ok=True)
            with self._errors(f"materialize artifact {key} into {dest}"):
                self._download_into(manifest, dest)
        return dest

    def _download_into(self, manifest: Manifest, dest: Path) -> None:
        # Download next to dest and rename into place, so that no reader (in another process too) ever sees a
        # half-filled dir, and a complete copy is never deleted while someone may be using it.
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.partial"
        try:
            self._download(manifest, tmp)
            (tmp / COMPLETE_MARKER).write_text(manifest.digest)
            for _ in range(3):
                try:
                    os.replace(tmp, dest)
                    return
                except OSError:  # dest exists and is not empty
                    if _read_marker(dest) == manifest.digest:
                        return  # another process finished first
                    stale = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.stale"
                    os.replace(dest, stale)  # an interrupted download, or a copy of an older commit
                    shutil.rmtree(stale, ignore_errors=True)
            raise StoreError(f"cannot materialize artifact {manifest.key} into {dest}: it keeps being replaced")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _download(self, manifest: Manifest, target: Path) -> None:
        """Every file into `target`: the unpacked ones and whole packs in one concurrent `get`, then the packs are
        cut into their files (and deleted)."""
        remote = self._attempt_dir(manifest)
        target.mkdir(parents=True, exist_ok=True)
        rpaths, lpaths = [], []
        for entry in manifest.files:
            if entry.pack is None:
                local = target / entry.path
                local.parent.mkdir(parents=True, exist_ok=True)
                rpaths.append(f"{remote}/{entry.path}")
                lpaths.append(str(local))
        pack_dir = Path(f"{target}.packs")
        packs = {path: pack_dir / f"{index:05d}" for index, path in enumerate(manifest.pack_sizes())}
        if packs:
            pack_dir.mkdir()
        try:
            rpaths += [f"{remote}/{path}" for path in packs]
            lpaths += [str(local) for local in packs.values()]
            if rpaths:
                with self._errors(f"download artifact {manifest.key}"):
                    self.fs.get(rpaths, lpaths)  # concurrent on object stores
            for path, local in packs.items():
                unpack(local, [(e.path, e.size, e.offset) for e in manifest.files if e.pack == path], target)
        finally:
            shutil.rmtree(pack_dir, ignore_errors=True)
        for entry in manifest.files:
            local = str(target / entry.path)
            size = os.path.getsize(local) if os.path.exists(local) else None
            if size != entry.size:
                raise StoreError(f"artifact {manifest.key} in {self.url}: {entry.path} has {size} bytes after "
                                 f"download, the manifest says {entry.size}")

    # -- writing -----------------------------------------------------------------------------------------------------

    def commit(self, key: str, local_dir: Path, meta: dict, progress: ProgressCallback | None = None) -> Manifest:
        """Store every file under `local_dir` as artifact `key`; the manifest is written last.

        On a local store on the same filesystem the files are moved out of `local_dir` (not copied); if such a commit
        fails midway, the files moved so far are in the unreferenced attempt dir named in `garbage()`.
        `progress(done_bytes, total_bytes)` is called after each file. Empty directories are not stored.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StoreError(f"cannot commit {key} to {self.url}: {local_dir} is not a directory")
        key_dir = self._key_dir(key)
        meta_json = json.loads(json.dumps(meta, default=_json_default))  # fail before uploading, not after
        attempt = uuid.uuid4().hex
        attempt_dir = f"{key_dir}/{attempt}"
        sources = _list_files(local_dir)
        total = sum(size for _, _, size in sources)
        tracker = _Progress(progress, total)

        with self._errors(f"commit artifact {key}"):
            if self.is_local:
                entries = self._commit_local(local_dir, sources, attempt_dir, tracker)
            else:
                entries = self._upload_all(sources, attempt_dir, tracker)
            manifest = Manifest(key=key, attempt=attempt, created=time.time(), files=entries,
                                digest=files_digest(entries), meta=meta_json)
            self._write_manifest(key_dir, manifest)
        if self.keep_committed:
            self._keep_as_local_copy(local_dir, manifest)
        log.debug("committed %s (%d files, %d bytes) to %s", key, len(entries), manifest.size, self.url)
        return manifest

    def _keep_as_local_copy(self, local_dir: Path, manifest: Manifest) -> None:
        """Make the dir just uploaded the artifact's local copy (what `materialize` would download), by renaming it
        into `local_cache/<digest>` with its `.complete` marker; skipped when its files are not exactly the committed
        ones (links), a copy is there already, or it is on another filesystem. Only a shortcut: failures are quiet."""
        dest = self.local_cache / manifest.digest
        sizes, odd = _local_sizes(local_dir)
        if odd or sizes != {entry.path: entry.size for entry in manifest.files} or COMPLETE_MARKER in sizes:
            return
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with _lock_for(dest):
                if dest.exists():
                    return
                tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.partial"
                os.rename(local_dir, tmp)
                try:
                    (tmp / COMPLETE_MARKER).write_text(manifest.digest)
                    os.rename(tmp, dest)  # a copy that appeared meanwhile (another process) wins
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)  # gone unless the rename failed
        except OSError as exc:  # another filesystem, permissions: the caller removes its staging dir as before
            log.debug("cannot keep %s as the local copy of %s: %s", local_dir, manifest.key, exc)

    def _commit_local(self, local_dir: Path, sources, attempt_dir: str, tracker: "_Progress") -> list[FileEntry]:
        """Move plain files into the attempt dir (same filesystem), copy the rest; hash each file once."""
        os.makedirs(attempt_dir, exist_ok=True)
        same_filesystem = os.stat(local_dir).st_dev == os.stat(attempt_dir).st_dev
        local_real = os.path.realpath(local_dir)
        entries = []
        for src, rel, _ in sources:
            dst = f"{attempt_dir}/{rel}"
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            # Files reached through symlinks belong to someone else (often an input artifact): copy, never move.
            if same_filesystem and os.path.realpath(src) == os.path.join(local_real, *rel.split("/")):
                try:
                    os.replace(src, dst)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:  # bind mounts can share st_dev yet refuse renames
                        raise
                else:
                    digest, size = _hash_file(dst)
                    tracker.add(size)
                    entries.append(FileEntry(rel, size, digest))
                    continue
            entries.append(self._copy_in(src, rel, attempt_dir, tracker))
        return entries

    def _copy_in(self, src: Path, rel: str, attempt_dir: str, tracker: "_Progress") -> FileEntry:
        with open(src, "rb") as reader, self.fs.open(f"{attempt_dir}/{rel}", "wb") as writer:
            digest, size = _copy_hashing(reader, writer, tracker)
        return FileEntry(rel, size, digest)

    def _upload_all(self, sources, attempt_dir: str, tracker: "_Progress") -> list[FileEntry]:
        """Small files in pack objects, the others one object each, all uploaded concurrently."""
        packs, direct = plan_packs(sources, self.pack_file_limit, self.pack_bytes)
        with ThreadPoolExecutor(max_workers=REMOTE_WORKERS, thread_name_prefix="vlflow-upload") as pool:
            futures = [pool.submit(self._upload_pack, pack, attempt_dir, tracker) for pack in packs]
            futures += [pool.submit(lambda *a: [self._copy_in(*a)], src, rel, attempt_dir, tracker)
                        for src, rel, _ in direct]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:  # stop early: the attempt is garbage anyway
                pool.shutdown(wait=True, cancel_futures=True)
                raise failed[0].exception()
            entries = {entry.path: entry for future in futures for entry in future.result()}
        return [entries[rel] for _, rel, _ in sources]  # the order of a local commit

    def _upload_pack(self, pack, attempt_dir: str, tracker: "_Progress") -> list[FileEntry]:
        built = build_pack(pack)
        self.fs.pipe_file(f"{attempt_dir}/{pack.path}", built.data)  # one PUT (multipart above s3fs's chunk size)
        tracker.add(len(built.data))
        return [FileEntry(rel, size, sha, pack=pack.path, offset=offset) for rel, size, sha, offset in built.members]

    def _write_manifest(self, key_dir: str, manifest: Manifest) -> None:
        self.fs.pipe_file(f"{key_dir}/{manifest.attempt}{FILES_SUFFIX}", manifest.files_json().encode())
        data = json.dumps(manifest.summary(), indent=1, default=_json_default).encode()
        path = f"{key_dir}/{MANIFEST_NAME}"
        if self.is_local:
            tmp = f"{key_dir}/.manifest-{manifest.attempt}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old manifest or the new one
        else:
            self.fs.pipe_file(path, data)  # one PUT: an object store never shows a partial object
            self.fs.invalidate_cache(key_dir)

    # -- refs --------------------------------------------------------------------------------------------------------

    def put_ref(self, name: str, data: dict) -> None:
        path = self._ref_path(name)
        payload = json.dumps(data, indent=1, default=_json_default).encode()
        with self._errors(f"write ref {name}"):
            if self.is_local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
                with open(tmp, "wb") as f:
                    f.write(payload)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, payload)

    def get_ref(self, name: str) -> dict | None:
        path = self._ref_path(name)
        with self._errors(f"read ref {name}"):
            try:
                data = self._read_small(path)
            except FileNotFoundError:
                return None
        try:
            return json.loads(data)
        except ValueError:
            log.warning("ignoring corrupt ref %s in %s", name, self.url)
            return None

    # -- removal -----------------------------------------------------------------------------------------------------

    def _du(self, path: str) -> int:
        try:
            return int(self.fs.du(path, total=True))
        except FileNotFoundError:
            return 0

    def remove(self, key: str) -> int:
        """Delete an artifact (manifest first, so it is never seen half-deleted); returns the bytes freed."""
        key_dir = self._key_dir(key)
        with self._errors(f"remove artifact {key}"):
            self.fs.invalidate_cache(key_dir)
            freed = self._du(key_dir)
            try:
                self.fs.rm_file(f"{key_dir}/{MANIFEST_NAME}")
            except FileNotFoundError:
                pass
            if self.fs.exists(key_dir):
                self.fs.rm(key_dir, recursive=True)
            self.fs.invalidate_cache(key_dir)
        return freed

    def garbage(self, min_age: float = 0.0) -> list[str]:
        """Store-relative paths (`artifacts/<key>/<attempt>`) of attempts that no manifest references.

        These are leftovers of failed, killed or replaced commits (an attempt dir and/or its file list; also temp
        manifests). A commit in progress looks the same, so when other processes may be committing, pass `min_age`
        (seconds since the newest file of the attempt was written).
        """
        found = []
        now = time.time()
        with self._errors("list unreferenced attempts"):
            for key_dir in self._key_dirs():
                key = key_dir.rsplit("/", 1)[-1]
                manifest = self.manifest(key)
                attempts: dict[str, list[dict]] = {}  # attempt name -> its dir and/or its file list
                for entry in self._ls(key_dir):
                    name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                    attempts.setdefault(name.removesuffix(FILES_SUFFIX), []).append(entry)
                attempts.pop(MANIFEST_NAME, None)
                if manifest is not None:
                    attempts.pop(manifest.attempt, None)
                for name, entries in sorted(attempts.items()):
                    if min_age > 0 and now - max(self._newest_mtime(e) for e in entries) < min_age:
                        continue
                    found.append(f"artifacts/{key}/{name}")
        return found

    def _newest_mtime(self, entry: dict) -> float:
        paths = [entry["name"]] if entry["type"] != "directory" else self.fs.find(entry["name"])
        newest = 0.0
        for path in paths:
            try:
                newest = max(newest, self.fs.modified(path).timestamp())
            except (NotImplementedError, FileNotFoundError):
                return time.time()  # unknown age: treat as fresh, never delete what might be in use
        return newest

    def gc(self, keep: set[str], min_age: float = 0.0) -> tuple[int, int]:
        """Remove artifacts whose key is not in `keep`, then unreferenced attempts; returns (count, bytes freed)."""
        count = freed = 0
        for manifest in self.list():
            if manifest.key not in keep:
                freed += self.remove(manifest.key)
                count += 1
        for relpath in self.garbage(min_age=min_age):
            attempt_path = self._path(*relpath.split("/"))
            with self._errors(f"remove {relpath}"):
                for path in (attempt_path, attempt_path + FILES_SUFFIX):
                    if self.fs.exists(path):
                        freed += self._du(path)
                        self.fs.rm(path, recursive=True)
                count += 1
                if self.is_local:  # drop the key dir when its only (uncommitted) attempt is gone
                    try:
                        os.rmdir(os.path.dirname(attempt_path))
                    except OSError:
                        pass
        return count, freed


# -- helpers -------------------------------------------------------------------------------------------------------


def _place_packed(files: list[FileEntry], packs: list[_Pack]) -> str | None:
    """Record on each packed file its pack and offset; the problem when the packs do not fit the file list."""
    paths = {entry.path for entry in files}
    for pack in packs:
        if pack.path in paths:
            return f"pack {pack.path} is also a file of the artifact"
        paths.add(pack.path)
        end = 0
        for index, offset in pack.files:
            if index >= len(files) or files[index].pack is not None:
                return f"pack {pack.path} names file {index}, which is not in the list or is in another pack"
            entry = files[index]
            entry.pack, entry.offset = pack.path, offset
            end = max(end, offset + entry.size)
        if end != pack.size:
            return f"pack {pack.path} has {pack.size} bytes, its files end at {end}"
    return None


def _has_endpoint(options: dict) -> bool:
    return bool(options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url"))


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _SAFE_KEY.match(key):
        raise StoreError(f"invalid artifact key {key!r}: use letters, digits, '_', '-' and '.'")


def _list_files(root: Path) -> list[tuple[Path, str, int]]:
    """(path, posix path relative to root, size) of every file under root, sorted; symlinks are followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not path.is_file():
                raise StoreError(f"cannot commit {path}: not a regular file (broken link, socket or device?)")
            found.append((path, path.relative_to(root).as_posix(), path.stat().st_size))
    return found


def _local_sizes(root: str | Path) -> tuple[dict[str, int], list[str]]:
    """{posix path relative to root: size} of the regular files under a local dir (one scandir pass, no hashing),
    and the entries that are not regular files (symlinks, fifos, ...)."""
    sizes: dict[str, int] = {}
    odd: list[str] = []
    stack = [(str(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, rel + "/"))
            elif entry.is_file(follow_symlinks=False):
                sizes[rel] = entry.stat(follow_symlinks=False).st_size
            else:
                odd.append(f"{rel} is not a regular file")
    return sizes, odd


def _copy_damage(manifest: "Manifest", copy: Path) -> bool:
    """Whether a local copy of an artifact (a materialised download) no longer has the manifest's files and sizes."""
    sizes, odd = _local_sizes(copy)
    sizes.pop(COMPLETE_MARKER, None)
    return bool(odd) or sizes != {entry.path: entry.size for entry in manifest.files}


def _copy_hashing(reader, writer, tracker: "_Progress") -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := reader.read(CHUNK):
        h.update(chunk)
        writer.write(chunk)
        size += len(chunk)
    tracker.add(size)
    return h.hexdigest(), size


def _hash_file(path: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    return digest.hexdigest(), os.path.getsize(path)


def _read_marker(dest: Path) -> str | None:
    try:
        return (dest / COMPLETE_MARKER).read_text().strip()
    except OSError:
        return None


_dest_locks: dict[str, threading.Lock] = {}
_dest_locks_guard = threading.Lock()


def _lock_for(dest: Path) -> threading.Lock:
    with _dest_locks_guard:
        return _dest_locks.setdefault(str(dest.resolve()), threading.Lock())


@dataclass
class _ReadAhead:
    read: dict[str, bytes | BaseException]  # key -> manifest bytes read ahead (or the error)
    asked: list[str] = field(default_factory=list)  # keys asked for in the block, in order


def _write_quietly(path: Path, data: bytes) -> None:
    """Write a local hint file atomically; a failure only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cannot write %s: %s", path, exc)


class _Window:
    """Reads at most `size` bytes of `reader` from where it stands: one file inside a pack."""

    def __init__(self, reader, size: int) -> None:
        self.reader, self.left = reader, size

    def read(self, limit: int) -> bytes:
        data = self.reader.read(min(limit, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data


class _NullWriter:
    """A file-like sink: `verify` hashes without keeping the bytes."""

    def write(self, data: bytes) -> int:
        return len(data)


class _Progress:
    """Thread-safe running total for the commit progress callback."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0
        self._lock = threading.Lock()

    def add(self, size: int) -> None:
        if self.callback is None:
            return
        with self._lock:
            self.done += size
            self.callback(self.done, self.total)
