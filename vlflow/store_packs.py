"""Small files of an artifact stored in a few pack objects (object stores only).

An object store answers each request in milliseconds, so an artifact of 20k small files stored one object per file
costs 20k PUTs to commit and 20k GETs to download, minutes where a local copy takes seconds. On object stores the
store therefore concatenates the files smaller than `file_limit` into pack objects of about `pack_bytes` each,
`<attempt>/<pack dir>/<n>`, uploaded concurrently; larger files stay one object each. The attempt's file list
(`<attempt>.files.json`, written before the manifest) keeps every file's path, size and sha256 as before, plus where
each packed file lies (`packs`: pack path, pack size, [file index, offset] per member), so keys, digests and
`vlflow verify` are the same whatever the layout, and readers fetch whole packs (materialise) or byte ranges
(`open`). The pack dir is a name no top-level entry of the artifact uses, recorded in the list.
A local cache never packs: its files are used in place.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_DIR = ".vlflow-packs"
PACK_FILE_LIMIT = 1 << 20  # files smaller than this are packed
PACK_BYTES = 16 << 20  # a pack is closed once it holds this many bytes (kept in memory while it is built)

Source = tuple[Path, str, int]  # (local path, posix path inside the artifact, size when listed)


@dataclass
class PackPlan:
    """One pack to build: its path inside the attempt dir and the local files that go into it, in order."""

    path: str
    sources: list[Source] = field(default_factory=list)


def pack_dir_name(relpaths: list[str]) -> str:
    """A directory name for the packs that no top-level entry of the artifact uses."""
    taken = {rel.split("/", 1)[0] for rel in relpaths}
    name = PACK_DIR
    while name in taken:
        name = f"{PACK_DIR}-{uuid.uuid4().hex[:8]}"
    return name


def plan_packs(sources: list[Source], file_limit: int, pack_bytes: int) -> tuple[list[PackPlan], list[Source]]:
    """Split the files to commit into packs (files under `file_limit` bytes, about `pack_bytes` per pack) and the
    files uploaded one object each."""
    if file_limit <= 0:
        return [], list(sources)
    small = [source for source in sources if source[2] < file_limit]
    direct = [source for source in sources if source[2] >= file_limit]
    if not small:
        return [], direct
    directory = pack_dir_name([rel for _, rel, _ in sources])
    packs: list[PackPlan] = []
    filled = 0
    for source in small:
        if not packs or (packs[-1].sources and filled + source[2] > pack_bytes):
            packs.append(PackPlan(f"{directory}/{len(packs):05d}"))
            filled = 0
        packs[-1].sources.append(source)
        filled += source[2]
    return packs, direct


@dataclass
class BuiltPack:
    data: bytes
    members: list[tuple[str, int, str, int]]  # (path inside the artifact, size, sha256, offset in the pack)


def build_pack(plan: PackPlan) -> BuiltPack:
    """Read and hash the pack's files once, concatenated in order."""
    buffer = bytearray()
    members = []
    for local, rel, _ in plan.sources:
        data = Path(local).read_bytes()
        members.append((rel, len(data), hashlib.sha256(data).hexdigest(), len(buffer)))
        buffer += data
    return BuiltPack(bytes(buffer), members)


def unpack(pack_file: Path, members: list[tuple[str, int, int]], target: Path) -> None:
    """Write each (path, size, offset) member of a downloaded pack to `target/path`."""
    with open(pack_file, "rb") as pack:
        for rel, size, offset in sorted(members, key=lambda member: member[2]):
            pack.seek(offset)
            data = pack.read(size)
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
