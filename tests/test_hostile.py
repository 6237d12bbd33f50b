"""Hostile and careless input: each case pins the exact behaviour (a clear error naming the place, or a safe result).

Kinds: archive escape, includes that reach outside the workflow tree, resource bombs, secrets in messages, inputs
that used to raise tracebacks, and inputs that used to be accepted silently wrong. Unit-level where possible; the
`vlflow` subprocess only where the exit code / no-traceback contract itself is the point.
"""
from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from vlflow.stages.data.archive import safe_extract
from vlflow.stages.data.errors import DataError

# ---------------------------------------------------------------------------------------------------------------
# Archive escape


def _tar(path: Path, build) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return path


def _add(tar, name, *, content: bytes | None = b"x", kind=tarfile.REGTYPE, link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    if kind == tarfile.REGTYPE:
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    else:
        tar.addfile(info)


def _realpath_limit_attack(tar, dest: Path) -> None:
    """CPython's test_realpath_limit_attack (CVE-2025-4517): symlink chains with long names that make
    os.path.realpath stop expanding, then a hard link and a file written through them, four levels up."""
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf(dest.parent, "PC_PATH_MAX") - len(str(dest)) - 1) // (len(steps) + 1))
    path = ""
    for step in steps:
        _add(tar, os.path.join(path, component), kind=tarfile.DIRTYPE, mode=0o777)
        _add(tar, os.path.join(path, step), kind=tarfile.SYMTYPE, link=component)
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    _add(tar, linkpath, kind=tarfile.SYMTYPE, link=os.path.join(*[".."] * len(steps)))
    _add(tar, "escape", kind=tarfile.SYMTYPE, link=os.path.join(linkpath, ".."))
    _add(tar, "flaglink", kind=tarfile.LNKTYPE, link=os.path.join("escape", "flag"))
    _add(tar, "flaglink", content=b"overwrite")
    _add(tar, "escape/newfile", content=b"new")


def test_cve_2025_4517_symlink_chain_is_refused_and_writes_nothing(tmp_path):
    outer = tmp_path / "outer"
    dest = outer / "dest"
    outer.mkdir()
    (outer / "flag").write_text("original")
    archive = _tar(tmp_path / "evil.tar", lambda tar: _realpath_limit_attack(tar, dest))
    with pytest.raises(DataError) as info:
        safe_extract(archive, dest)
    message = str(info.value)
    assert message.startswith(f"{archive}: refusing to extract entry 'a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/lll")
    assert message.endswith("it lies below 'a', a link of this archive (nothing is extracted through links); "
                            "nothing was extracted")
    assert (outer / "flag").read_text() == "original"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dest", "evil.tar", "flag", "outer"]


@pytest.mark.parametrize("build,reason", [
    (lambda t: _add(t, "/etc/evil"), "'/etc/evil': absolute path"),
    (lambda t: _add(t, "a/../../evil"), "'a/../../evil': path contains '..'"),
    (lambda t: _add(t, "C:\\evil"), "'C:\\\\evil': absolute path"),
    (lambda t: _add(t, "x/" + "n" * 256), "a path component is longer than 255 bytes"),
    (lambda t: _add(t, "link", kind=tarfile.SYMTYPE, link="/etc/passwd"), "symlink to '/etc/passwd' points outside"),
    (lambda t: _add(t, "sub/link", kind=tarfile.SYMTYPE, link="../../x"), "symlink to '../../x' points outside"),
    (lambda t: _add(t, "hard", kind=tarfile.LNKTYPE, link="../x"), "hard link to '../x' points outside"),
    (lambda t: (_add(t, "d", kind=tarfile.DIRTYPE), _add(t, "l", kind=tarfile.SYMTYPE, link="d")),
     "'l': symlink to 'd' names a directory"),
    (lambda t: (_add(t, "f"), _add(t, "l1", kind=tarfile.SYMTYPE, link="f"),
                _add(t, "l2", kind=tarfile.SYMTYPE, link="l1")), "'l2': symlink to 'l1' names a symlink"),
    (lambda t: _add(t, "l", kind=tarfile.SYMTYPE, link="missing"), "symlink to 'missing' names no entry"),
    (lambda t: (_add(t, "a"), _add(t, "a/b")), "'a/b': 'a' is both a file and a directory"),
    (lambda t: (_add(t, "a", kind=tarfile.DIRTYPE), _add(t, "a")), "the path 'a' appears both as a file and as a"),
    (lambda t: (_add(t, "a"), _add(t, "./a", content=b"y")), "'./a': the path 'a' appears twice"),
    (lambda t: _add(t, "dev", kind=tarfile.CHRTYPE), "'dev': device or fifo entry"),
    (lambda t: _add(t, "fifo", kind=tarfile.FIFOTYPE), "'fifo': device or fifo entry"),
])
def test_tar_entries_are_checked_before_anything_is_written(tmp_path, build, reason):
    archive = _tar(tmp_path / "bad.tar", lambda tar: (_add(tar, "good.txt"), build(tar)))
    with pytest.raises(DataError) as info:
        safe_extract(archive, tmp_path / "dest")
    assert str(info.value).startswith(f"{archive}: refusing to extract entry ")
    assert reason in str(info.value) and str(info.value).endswith("; nothing was extracted")
    assert list((tmp_path / "dest").iterdir()) == []


def test_links_inside_the_archive_become_copies_never_links(tmp_path):
    def build(tar):
        _add(tar, ".", kind=tarfile.DIRTYPE)
        _add(tar, "./d/f.txt", content=b"data", mode=0o4755)  # setuid is dropped, the executable bit kept
        _add(tar, "d/sym", kind=tarfile.SYMTYPE, link="f.txt")
        _add(tar, "hard", kind=tarfile.LNKTYPE, link="d/f.txt")

    safe_extract(_tar(tmp_path / "ok.tar", build), tmp_path / "t")
    for path in (tmp_path / "t/d/f.txt", tmp_path / "t/d/sym", tmp_path / "t/hard"):
        assert path.read_bytes() == b"data" and not path.is_symlink() and path.stat().st_nlink == 1
        assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_extraction_never_overwrites(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("mine")
    archive = _tar(tmp_path / "x.tar", lambda tar: _add(tar, "a.txt", content=b"theirs"))
    with pytest.raises(DataError, match=r"refusing to extract entry 'a.txt': .*a.txt already exists \(extraction "
                                        r"never overwrites\)$"):
        safe_extract(archive, tmp_path / "t")
    assert (tmp_path / "t" / "a.txt").read_text() == "mine"


def test_zip_links_and_names(tmp_path):
    def zip_with(name, *entries):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zf:
            for entry_name, content, mode in entries:
                info = zipfile.ZipInfo(entry_name)
                info.external_attr = mode << 16
                zf.writestr(info, content)
        return path

    ok = zip_with("ok.zip", ("z/a.txt", "zip", 0o100644), ("z/l", "a.txt", stat.S_IFLNK | 0o777))
    safe_extract(ok, tmp_path / "ok")
    assert (tmp_path / "ok/z/l").read_text() == "zip" and not (tmp_path / "ok/z/l").is_symlink()
    for name, entry, reason in [
        ("out.zip", ("l", "../../etc/passwd", stat.S_IFLNK | 0o777), "'l': symlink to '../../etc/passwd' points "
                                                                     "outside"),
        ("dots.zip", ("../evil.txt", "x", 0o100644), "'../evil.txt': path contains '..'"),
        ("abs.zip", ("/abs.txt", "x", 0o100644), "'/abs.txt': absolute path"),
        ("dev.zip", ("dev", "", stat.S_IFCHR | 0o644), "'dev': device, fifo or socket entry"),
    ]:
        with pytest.raises(DataError) as info:
            safe_extract(zip_with(name, ("fine.txt", "x", 0o100644), entry), tmp_path / name.replace(".", "_"))
        assert reason in str(info.value)
        assert not (tmp_path / name.replace(".", "_") / "fine.txt").exists()


def test_truncated_and_non_archives_are_data_errors(tmp_path):
    archive = _tar(tmp_path / "full.tar", lambda tar: _add(tar, "big.bin", content=os.urandom(100_000)))
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(archive.read_bytes()[:50_000])
    with pytest.raises(DataError, match=r"cut.tar: cannot (read archive|extract entry 'big.bin')"):
        safe_extract(truncated, tmp_path / "t1")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk.zip: cannot read archive: File is not a zip file"):
        safe_extract(junk, tmp_path / "t2")
