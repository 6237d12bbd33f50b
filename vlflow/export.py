"""Getting a committed artifact out of the cache: `vlflow export` (copy or link it anywhere) and `vlflow path`
(its local directory, for scripts).

Both act on the artifact the workflow *currently* names for a stage (the same key `vlflow plan` computes), never on
an older run: a stage that is not committed for the current workflow, or whose files are damaged, is an error.
Exported bytes are hashed on the way and compared with the manifest, so a copy is the committed data or nothing.
The runner's bookkeeping (`_vlflow/`: log, metrics) stays behind unless `--path` names it.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from vlflow.errors import VlflowError
from vlflow.store import META_DIR, ArtifactStore, FileEntry, Manifest

CHUNK = 4 * 1024 * 1024


@dataclass
class Exported:
    files: int
    bytes: int
    destination: str


def find_stage(workflow, stage: str) -> str:
    """`stage` if the workflow has it; a clear error otherwise (a swept stage's name lists its entries)."""
    if stage in workflow.stages:
        return stage
    entries = [name for name in workflow.stages if name.startswith(stage + "@")]
    if entries:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise VlflowError(f"stage {stage!r} is a sweep of {len(entries)} entries; name one: {shown}")
    raise VlflowError(f"no stage named {stage!r} in {workflow.path} (stages: {', '.join(workflow.stages)})")


def current_manifest(runner, stage: str) -> Manifest:
    """The committed, undamaged artifact of `stage` for the workflow as it is now."""
    stage = find_stage(runner.workflow, stage)
    plans = {plan.name: plan for plan in runner.plan(until=[stage])}
    plan = plans[stage]
    if plan.manifest is None:
        raise VlflowError(f"stage {stage} has no committed artifact for the current workflow "
                          f"({'; '.join(plan.reasons) or 'not run'}); run it first: vlflow run {runner.workflow.path} "
                          f"--until {stage}")
    if plan.damaged:
        raise VlflowError(f"the artifact of stage {stage} is damaged ({plan.damaged[0]}); vlflow run rebuilds it")
    return plan.manifest


def select_files(manifest: Manifest, subpath: str) -> tuple[list[FileEntry], str]:
    """The files under `subpath` ('' = the whole artifact but `_vlflow/`) and the prefix to strip from their paths.
    A subpath naming one file gives that file and its parent as the prefix."""
    sub = subpath.strip().strip("/")
    parts = sub.split("/") if sub else []
    if any(part in ("", ".", "..") for part in parts) or "\0" in sub:
        raise VlflowError(f"--path {subpath!r}: expected a plain relative path inside the artifact (no '..', '//')")
    if not sub:
        files = [e for e in manifest.files if not e.path.startswith(META_DIR + "/")]
        return files, ""
    exact = [e for e in manifest.files if e.path == sub]
    if exact:
        return exact, posixpath.dirname(sub)
    files = [e for e in manifest.files if e.path.startswith(sub + "/")]
    if not files:
        tops = sorted({e.path.split("/")[0] for e in manifest.files})
        raise VlflowError(f"--path {subpath!r}: no such file or directory in the artifact (top level: "
                          f"{', '.join(tops[:20])})")
    return files, sub


def local_path(store: ArtifactStore, manifest: Manifest, subpath: str = "") -> Path:
    """The local path of a committed artifact (or of a file/dir inside it); a remote cache has none."""
    if not store.is_local:
        raise VlflowError(f"the cache {store.url} is not a local directory, so the artifact has no local path; "
                          "copy it out with: vlflow export WORKFLOW STAGE DEST")
    root = store.materialize(manifest.key)  # the committed attempt dir itself on a local cache
    if not subpath.strip("/"):
        return root
    files, prefix = select_files(manifest, subpath)
    return root / (files[0].path if len(files) == 1 and files[0].path == subpath.strip().strip("/") else prefix)


def export_artifact(store: ArtifactStore, manifest: Manifest, dest: str, subpath: str = "", *, link: bool = False,
                    force: bool = False, storage_options: dict | None = None) -> Exported:
    """Copy (or, `link`, symlink) the artifact's files under `subpath` to `dest`, a local path or any fsspec URL."""
    import fsspec

    files, prefix = select_files(manifest, subpath)
    single_file = bool(subpath.strip("/")) and len(files) == 1 and files[0].path == subpath.strip().strip("/")
    protocol = fsspec.core.split_protocol(dest)[0] or "file"
    options = dict(storage_options or {}) if protocol == (fsspec.core.split_protocol(store.url)[0] or "file") else {}
    endpoint = os.environ.get("VLFLOW_S3_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint and "endpoint_url" not in options.get("client_kwargs", {}):
        options["client_kwargs"] = {**options.get("client_kwargs", {}), "endpoint_url": endpoint}  # as the cache
    try:
        fs, root = fsspec.core.url_to_fs(dest, **options)
    except Exception as exc:  # unknown protocol, missing backend
        raise VlflowError(f"cannot open the destination {dest}: {exc}") from None
    from fsspec.implementations.local import LocalFileSystem

    dest_is_local = isinstance(fs, LocalFileSystem)
    if link and not (store.is_local and dest_is_local):
        raise VlflowError("--link needs a local cache and a local destination (a link points at the cache's files); "
                          "drop --link to copy")
    dest_is_dir = fs.isdir(root)
    if single_file and (dest_is_dir or dest.endswith("/")):
        root = posixpath.join(root.rstrip("/"), posixpath.basename(files[0].path))
        dest_is_dir = False
    if single_file:
        targets = [(files[0], root)]
    else:
        targets = [(entry, posixpath.join(root.rstrip("/") or "/", entry.path[len(prefix) + 1:] if prefix else
                                          entry.path)) for entry in files]
    existing = [target for _, target in targets if fs.exists(target)]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise VlflowError(f"{existing[0]} already exists{more}; add --force to overwrite")
    if not single_file and not dest_is_dir and fs.exists(root):
        raise VlflowError(f"{root} exists and is not a directory")
    source_root = store.materialize(manifest.key) if store.is_local else None
    total = 0
    for entry, target in targets:
        parent = posixpath.dirname(target)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        if link:
            if os.path.lexists(target):
                os.unlink(target)
            os.symlink(source_root / entry.path, target)
        else:
            total += _copy_checked(store, manifest, entry, fs, target, dest_is_local)
    shown = dest if not single_file else targets[0][1] if dest_is_local else fs.unstrip_protocol(targets[0][1])
    return Exported(files=len(targets), bytes=total if not link else sum(e.size for e, _ in targets),
                    destination=shown)


def _copy_checked(store: ArtifactStore, manifest: Manifest, entry: FileEntry, fs, target: str, local: bool) -> int:
    """Copy one file, hashing on the way; a mismatch with the manifest removes the copy and fails."""
    digest = hashlib.sha256()
    size = 0
    # a local destination is written beside and renamed, so no reader sees a half file; object stores PUT once
    partial = f"{target}.vlflow-partial" if local else target
    try:
        with store.open(manifest.key, entry.path) as source, fs.open(partial, "wb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        if size != entry.size or digest.hexdigest() != entry.sha256:
            raise VlflowError(f"{entry.path} in the cache does not match its manifest ({size} bytes, sha256 "
                              f"{digest.hexdigest()[:12]}…; committed {entry.size} bytes, {entry.sha256[:12]}…); "
                              "vlflow verify --drop removes the damaged artifact")
        if local:
            os.replace(partial, target)
    except BaseException:
        if fs.exists(partial):
            fs.rm(partial)
        raise
    return size


# ---- commands (called from vlflow.cli) ---------------------------------------------------------------------------

def cmd_path(args) -> int:
    from vlflow.cli import _runner

    runner, _ = _runner(args)
    manifest = current_manifest(runner, args.stage)
    print(local_path(runner.store, manifest, args.path or ""))
    return 0


def cmd_export(args) -> int:
    from vlflow.cli import _runner, _size

    runner, config = _runner(args)
    manifest = current_manifest(runner, args.stage)
    done = export_artifact(runner.store, manifest, str(args.dest), args.path or "", link=args.link,
                           force=args.overwrite, storage_options=config.storage_options or None)
    verb = "linked" if args.link else "copied"
    print(f"{verb} {done.files} file(s), {_size(done.bytes)} of {args.stage} (key {manifest.key[:12]}) to "
          f"{done.destination}")
    return 0

