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


# ---------------------------------------------------------------------------------------------------------------
# Workflow files: includes confined to the workflow's tree, resource bombs, tags and characters YAML refuses

from vlflow.errors import WorkflowError  # noqa: E402
from vlflow.workflow import MAX_FILES_READ, MAX_INCLUDE_DEPTH, load_workflow  # noqa: E402

STAGES = "stages: {w: {uses: testing.write}}\n"


def _load_error(path: Path, **kwargs) -> WorkflowError:
    with pytest.raises(WorkflowError) as info:
        load_workflow(path, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def _wf(tmp_path: Path, text: str, name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("target", ["/etc/shadow", "/etc/passwd", "/dev/zero", "../outside.yaml"])
def test_includes_outside_the_workflow_tree_are_refused_unread(tmp_path, target):
    (tmp_path / "outside.yaml").write_text("secret_line: do-not-print\n")
    path = _wf(tmp_path / "project", f"include: [{target}]\n{STAGES}")
    error = _load_error(path)
    assert (error.file, error.line, error.field) == (str(path), 1, "include.0")
    assert error.message.startswith(f"included file {os.path.normpath(path.parent / target)} is outside the "
                                    f"workflow's directory tree (allowed: {path.parent}; add a directory to "
                                    "`[workflow] include_paths` in vlflow.toml")
    assert "root:" not in str(error) and "do-not-print" not in str(error)


def test_include_paths_allow_another_tree_and_symlinks_out_are_refused(tmp_path):
    shared = tmp_path / "shared"
    _wf(shared, "params: {a: 1}\n", "base.yaml")
    path = _wf(tmp_path / "project", f"include: [../shared/base.yaml]\n{STAGES}")
    assert load_workflow(path, include_paths=[shared]).params == {"a": 1}
    (tmp_path / "project" / "link.yaml").symlink_to(shared / "base.yaml")  # inside by name, outside in fact
    path.write_text(f"include: [link.yaml]\n{STAGES}")
    assert "is outside the workflow's directory tree" in _load_error(path).message


def test_fifo_and_directory_includes_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "dir.yaml").mkdir()
    path = _wf(tmp_path, f"include: [pipe.yaml]\n{STAGES}")
    assert _load_error(path).message == f"included file {tmp_path / 'pipe.yaml'} is a FIFO, not a regular file"
    path.write_text(f"extends: dir.yaml\n{STAGES}")
    assert _load_error(path).message == f"included file {tmp_path / 'dir.yaml'} is a directory, not a regular file"
    assert _load_error(tmp_path / "pipe.yaml").message == "the workflow file is a FIFO, not a regular file"


def test_oversized_and_non_utf8_files(tmp_path):
    big = _wf(tmp_path, STAGES + "#" * (1 << 20), "big.yaml")
    assert _load_error(big).message == "file larger than 1 MiB; workflow files are small"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"params:\n  name: caf\xe9\n" + STAGES.encode())
    error = _load_error(latin)
    assert (error.line, error.message) == (2, "not UTF-8 text (byte 0xe9)")


def _laughs(levels: int = 9) -> str:
    lines = ['  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "params:\n" + "\n".join(lines) + "\n" + STAGES


def test_resource_bombs_end_in_bounded_errors(tmp_path):
    import time

    started = time.monotonic()
    error = _load_error(_wf(tmp_path, _laughs(), "laughs.yaml"))
    assert error.message.startswith("the document expands to more than 100,000 values (YAML aliases")
    error = _load_error(_wf(tmp_path, "params:\n  x: " + "[" * 600 + "]" * 600 + "\n" + STAGES, "deep.yaml"))
    assert (error.line, error.message) == (2, "mappings and lists nest more than 64 levels deep")
    chain = "".join(f"  a{i}: ${{params.a{i + 1}}}\n" for i in range(200))
    error = _load_error(_wf(tmp_path, f"params:\n{chain}  a200: 1\n{STAGES}", "chain.yaml"))
    assert (error.line, error.field) == (2, "params.a0")
    assert error.message.startswith("reference chain longer than 32 (")
    for i in range(1200):  # extends chain e0 -> e1 -> ... -> e1199
        _wf(tmp_path / "ext", f"extends: e{i + 1}.yaml\n" if i < 1199 else STAGES, f"e{i}.yaml")
    error = _load_error(tmp_path / "ext" / "e0.yaml")
    assert error.message == f"include/extends nest more than {MAX_INCLUDE_DEPTH} files deep"
    for i in range(22):  # each file includes the next twice: 2^22 reads unbounded
        _wf(tmp_path / "fan", f"include: [f{i + 1}.yaml, f{i + 1}.yaml]\n" if i < 21 else STAGES, f"f{i}.yaml")
    error = _load_error(tmp_path / "fan" / "f0.yaml")
    assert error.message.startswith(f"include/extends read more than {MAX_FILES_READ} files in total")
    with pytest.raises(WorkflowError, match="nest more than 64 levels deep"):
        load_workflow(_wf(tmp_path, "params: {x: 1}\n" + STAGES, "ok.yaml"),
                      overrides=["params.x=" + "[" * 600 + "]" * 600])
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("text,line,field,message", [
    ("stages:\n  w: !!python/object:os.system {uses: testing.write}\n", 2, "stages.w",
     "YAML tag '!!python/object:os.system' is not allowed"),
    ("stages:\n  w: !custom {uses: testing.write}\n", 2, "stages.w", "YAML tag '!custom' is not allowed"),
    ("params: {s: !!set {a, b}}\n" + STAGES, 1, "params.s", "YAML tag '!!set' is not allowed"),
    ("params: {b: !!binary aGk=}\n" + STAGES, 1, "params.b", "YAML tag '!!binary' is not allowed"),
    ("params: {l: !!python/list [1]}\n" + STAGES, 1, "params.l", "YAML tag '!!python/list' is not allowed"),
    (STAGES + "params: {x: \"a\x00b\"}\n", 2, None, "invalid YAML: character U+0000 is not allowed"),
    (STAGES + "# \x07 bell\n", 2, None, "invalid YAML: character U+0007 is not allowed"),
])
def test_tags_and_forbidden_characters(tmp_path, text, line, field, message):
    error = _load_error(_wf(tmp_path, text))
    assert (error.line, error.field) == (line, field) and error.message.startswith(message)


def test_plain_tags_and_escaped_control_characters_still_load(tmp_path):
    workflow = load_workflow(_wf(tmp_path, 'params: {a: !!str 12, b: "tab\\there", c: =}\n' + STAGES))
    assert workflow.params == {"a": "12", "b": "tab\there", "c": "="}


def test_control_characters_in_set_values(tmp_path):
    error = _load_error(_wf(tmp_path, "params: {x: 1}\n" + STAGES), overrides=["params.x=a\x01b"])
    assert (error.file, error.field) == ("--set params.x=a\\x01b", "params.x")  # escaped: one line
    assert "character U+0001 is not allowed" in error.message


# ---------------------------------------------------------------------------------------------------------------
# Careless values: silently wrong before, an error naming the field now


@pytest.mark.parametrize("text,overrides,field,message", [
    ("params: {seed: 1}\n" + STAGES, ["params.sede=3"], "params.sede",
     "the workflow defines no params.sede (did you mean 'seed'?); --set only changes params the workflow defines"),
    ("params: {opts: {a: 1}}\n" + STAGES, ["params.opts.b=3"], "params.opts.b",
     "the workflow defines no params.opts.b"),
    (STAGES, ["params.x=1"], "params.x", "the workflow defines no params.x"),
])
def test_set_of_an_undefined_param_is_refused(tmp_path, text, overrides, field, message):
    error = _load_error(_wf(tmp_path, text), overrides=overrides)
    assert (error.file, error.field) == (f"--set {overrides[0]}", field) and error.message.startswith(message)


@pytest.mark.parametrize("text,line,field,message", [
    ("stages:\n  t:\n    uses: testing.train\n    launch: {nproc_per_node: true}\n", 4,
     "stages.t.launch.nproc_per_node", "expected an integer, got a boolean true"),
    ("stages:\n  w: {uses: testing.write, with: {files: false}}\n", 2, "stages.w.with.files",
     "expected an integer, got a boolean false"),
    ("stages:\n  t:\n    uses: testing.train\n    launch: {plugin: torch_ddp, tp_size: 2}\n", 4,
     "stages.t.launch.tp_size", "tp_size=2 needs plugin: hybrid_parallel (plugin torch_ddp has no"),
    ("defaults:\n  launch: {pp_size: 2}\nstages:\n  t: {uses: testing.train}\n", 2,
     "defaults.launch.pp_size", "pp_size=2 needs plugin: hybrid_parallel"),
    ("stages:\n  w: {uses: synthetic.coco, with: {seed: -1}}\n", 2, "stages.w.with.seed",
     "input should be greater than or equal to 0, got -1"),
    ("stages:\n  e: {uses: unitab.evaluate, inputs: {arrows: e, model: e}, with: {seed: 1180591620717411303424}}\n",
     2, "stages.e.with.seed", "input should be less than or equal to 4294967295"),
    ("stages:\n  w: {uses: testing.write, with: {files: .inf}}\n", 2, "stages.w.with.files",
     "input should be a finite number, got inf"),
    (f"stages:\n  {'s' * 300}: {{uses: testing.write}}\n", 2, f"stages.{'s' * 300}",
     "stage name longer than 100 characters"),
    (f"name: {'n' * 300}\n{STAGES}", 1, "name", "workflow name longer than 100 characters"),
])
def test_values_that_used_to_be_coerced_or_crash(tmp_path, text, line, field, message):
    error = _load_error(_wf(tmp_path, text))
    assert (error.line, error.field) == (line, field) and error.message.startswith(message)


def test_hybrid_parallel_without_tp_pp_is_accepted(tmp_path):
    """tp_size/pp_size > 1 need a stage whose model has a shardformer policy (test_plugins_export.py)."""
    path = _wf(tmp_path, "stages:\n  t:\n    uses: testing.train\n    launch: {plugin: hybrid_parallel, zero_stage: 2}"
                         "\n")
    assert load_workflow(path).stages["t"].launch.plugin == "hybrid_parallel"


# ---------------------------------------------------------------------------------------------------------------
# vlflow.toml: typed sections, errors against vlflow.toml and its line

from vlflow.config import load_config  # noqa: E402
from vlflow.errors import VlflowError  # noqa: E402


@pytest.mark.parametrize("toml,line,message", [
    ("[run]\njobs = true\n", 2, "jobs: input should be a valid integer, got True"),
    ("[run]\njobs = \"4\"\n", 2, "jobs: input should be a valid integer, got '4'"),
    ("[run]\njobs = 0\n", 2, "jobs: input should be greater than or equal to 1, got 0"),
    ("[cache]\nurl = 3\n", 2, "url: input should be a valid string, got 3"),
    ("[cache]\nurl = \"s3://AKIA:S3CRET@bucket/x\"\n", 2, "credentials in the cache URL (s3://***@...)"),
    ("[bogus]\nx = 1\n", 1, "unknown section [bogus] (known: cache, state, launch, executor, run, workflow)"),
    ("# top\n[cache]\nurll = \"x\"\n", 3, "unknown key 'urll' in [cache]"),
    ("[launch]\nnproc_per_node = true\n", 2, "nproc_per_node: expected an integer, got a boolean true"),
    ("[launch]\nplugin = \"deepspeed\"\n", 2, "plugin: input should be 'torch_ddp', 'low_level_zero', 'gemini' or"),
    ("[launch]\ntp_size = 4\n", 2, "tp_size: tp_size=4 needs plugin: hybrid_parallel"),
    ("[run]\njobs = \n", 2, "invalid TOML: Invalid value"),
    ("[workflow]\ninclude_paths = \"x\"\n", 2, "include_paths: input should be a valid list, got 'x'"),
    ("[state]\ndir = \"a\\u0000b\"\n", 2, "dir: NUL bytes and control characters are not allowed in paths and "
                                          "URLs, got 'a\\x00b'"),
])
def test_bad_project_config_is_reported_against_vlflow_toml(tmp_path, toml, line, message):
    (tmp_path / "vlflow.toml").write_text(toml)
    with pytest.raises(VlflowError) as info:
        load_config(tmp_path)
    assert (info.value.file, info.value.line) == (str(tmp_path / "vlflow.toml"), line)
    assert info.value.message.startswith(message), info.value.message
    assert "S3CRET" not in str(info.value)


def test_include_paths_and_empty_flags(tmp_path):
    (tmp_path / "vlflow.toml").write_text('[workflow]\ninclude_paths = ["../shared"]\n')
    assert load_config(tmp_path).include_paths == [(tmp_path.parent / "shared").resolve()]
    for flags, message in [({"cache": ""}, "--cache is empty"), ({"state_dir": " "}, "--state-dir is empty"),
                           ({"cache": "s3://K:S3CRET@b/x"}, "--cache: credentials in the cache URL")]:
        with pytest.raises(VlflowError, match=message) as info:
            load_config(tmp_path, **flags)
        assert "S3CRET" not in str(info.value)


def test_state_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    config = load_config(tmp_path, state_dir=str(tmp_path / "file"))
    with pytest.raises(VlflowError) as info:
        config.ensure_state_dir()
    assert str(info.value) == (f"state dir {tmp_path / 'file'} (from --state-dir) is not a directory; give a "
                               "directory with --state-dir")


# ---------------------------------------------------------------------------------------------------------------
# The command line: one `error:` line, exit code 2, no traceback, no secret

import subprocess  # noqa: E402
import sys  # noqa: E402

VLFLOW = [sys.executable, "-c", "import sys; from vlflow.cli import main; sys.exit(main())"]


def _vlflow(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*VLFLOW, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_cli_errors_are_one_masked_line_without_traceback(tmp_path):
    (tmp_path / "vlflow.toml").write_text('[cache]\nurl = "cache"\n')
    wf = _wf(tmp_path, "params: {seed: 1}\n" + STAGES)
    (tmp_path / "nul.yaml").write_bytes(b"stages: {}\n\x00\n")
    (tmp_path / "file").write_text("x")
    cases = [
        (["validate", "nul.yaml"], "error: nul.yaml:2: invalid YAML: character U+0000 is not allowed"),
        (["plan", wf, "--cache", ""], "error: --cache is empty"),
        (["run", wf, "--state-dir", "file"], f"error: state dir {tmp_path / 'file'} (from --state-dir) is not a dir"),
        (["plan", wf, "--cache", "s3://AKIAXX:hunter2hunter2@bucket/c"], "error: --cache: credentials in the cache"),
        (["validate", wf, "--set", "params.typo=3"], "error: --set params.typo=3: params.typo: the workflow defines"),
        (["run", wf, "-j", "0"], "vlflow run: error: argument -j/--jobs: expected a whole number from 1 to 1024"),
        (["run", wf, "--lock-timeout", "nan"], "vlflow run: error: argument --lock-timeout: expected a finite"),
        (["plan", wf, "--cache", "nosuchproto://x/y"], "error: cannot open the artifact store nosuchproto://x/y"),
    ]
    for args, start in cases:
        result = _vlflow(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(start), (args, result.stderr)
        assert "Traceback" not in result.stderr and "hunter2" not in result.stderr + result.stdout


def test_closed_stdout_ends_quietly(tmp_path):
    wf = _wf(tmp_path, "stages:\n  w: {uses: testing.write, with: {files: 4000, size: 16}}\n")
    assert _vlflow("run", wf, "--cache", tmp_path / "c", "--state-dir", tmp_path / "s", cwd=tmp_path).returncode == 0
    ls = subprocess.Popen([*VLFLOW, "ls", str(wf), "w", "--cache", str(tmp_path / "c"), "--state-dir",
                           str(tmp_path / "s")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    first = ls.stdout.readline()
    ls.stdout.close()  # like `| head -1`: the reader goes away after one line
    stderr = ls.stderr.read().decode()
    assert ls.wait(timeout=60) == 141 and first.decode().split() == ["16", "file_000.txt"]
    assert stderr == ""


# ---------------------------------------------------------------------------------------------------------------
# Secrets: one masker (vlflow.secrets) for errors, dumps, lock records and download messages

from vlflow.secrets import Masker  # noqa: E402


def test_masker_rules():
    env = {"DB_PASSWD": "pa55-w0rd-x", "KEYMAP": "us", "PWD": "/work/main", "MYSQL_PWD": "short", "HOME": "/root",
           "GITHUB_TOKEN": "ghp_abcdefgh1234", "SESSION_KEY": "not secret? yes: 8+ chars"}
    masker = Masker(env=env)
    assert masker.mask("status: us-east; cwd /work/main") == "status: us-east; cwd /work/main"
    assert masker.mask("login pa55-w0rd-x failed; token ghp_abcdefgh1234.") == "login *** failed; token ***."
    assert masker.mask("xpa55-w0rd-xy") == "xpa55-w0rd-xy"  # whole words only
    assert masker.mask("short") == "short"  # too short to be worth masking from the environment
    assert masker.mask("s3://AKIA:SECRET@bucket/x and https://u@h/p") == "s3://***@bucket/x and https://***@h/p"
    assert (masker.mask("https://h/f?X-Amz-Signature=abc&X-Amz-Credential=AK%2F1&n=2&access_token=t")
            == "https://h/f?X-Amz-Signature=***&X-Amz-Credential=***&n=2&access_token=***")
    assert (masker.mask("vlflow run wf.yaml --set params.password=hunter2", assignments=True)
            == "vlflow run wf.yaml --set params.password=***")
    assert Masker(["abc"]).mask("abc") == "abc" and Masker(["abc"], min_length=1).mask("x abc y") == "x *** y"


def test_interpolated_secrets_are_masked_and_short_innocent_values_are_not(tmp_path):
    path = _wf(tmp_path, "params:\n  db: \"postgres://app:${env.DB_PASSWD}@db/x\"\n  layout: ${env.KEYMAP}\n"
                         "stages:\n  w: {uses: testing.write, with: {text: status, files: '${env.DB_PASSWD}'}}\n")
    env = {"DB_PASSWD": "s3cret-passw0rd", "KEYMAP": "us"}
    error = _load_error(path, env=env)
    assert error.message == "input should be a valid integer, unable to parse string as an integer, got '***'"
    path.write_text(path.read_text().replace("files: '${env.DB_PASSWD}'", "files: 1"))
    document = load_workflow(path, env=env).to_dict()
    assert document["params"] == {"db": "postgres://***@db/x", "layout": "us"}  # KEYMAP: not a secret name
    assert document["stages"]["w"]["with"]["text"] == "status"  # ... but never inside other words


def test_lock_messages_and_records_never_carry_credentials(tmp_path):
    from vlflow.errors import LockError
    from vlflow.lock import CacheLock

    command = "vlflow run wf.yaml --cache s3://AKIAID:hunter2hunter2@bucket/c --set params.api_token=tok123456"
    holder = subprocess.Popen(  # another process holds the lock, as another `vlflow run` would
        [sys.executable, "-c", "import sys; from vlflow.lock import CacheLock; "
         "lock = CacheLock(sys.argv[1], name='c', command=sys.argv[2]); lock.acquire(); print('held', flush=True); "
         "sys.stdin.read()", str(tmp_path / "c.lock"), command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        record = (tmp_path / "c.lock").read_text()
        seen = []
        with pytest.raises(LockError) as info:
            with CacheLock(tmp_path / "c.lock", name="s3://bucket/c", on_wait=seen.append, timeout=0.2):
                pass
    finally:
        holder.communicate("", timeout=30)
    for text in (*seen, str(info.value), record):
        assert "hunter2" not in text and "tok123456" not in text and "AKIAID" not in text
    assert seen[0].startswith("waiting for vlflow run wf.yaml --cache s3://***@bucket/c --set params.api_token=*** "
                              f"(pid {holder.pid}, started ")


def test_store_url_and_download_errors_are_masked(tmp_path):
    from vlflow.stages.data.download import download_files
    from vlflow.stages.data.spec import DownloadParams

    from tests.conftest import free_port
    from vlflow.store import ArtifactStore

    assert repr(ArtifactStore("memory://me:pw-secret-1@/vlflow-hostile")) == "ArtifactStore('memory:///vlflow-hostile')"

    url = f"http://user:hunter2hunter2@127.0.0.1:{free_port()}/data/a.bin?token=tok123456"
    params = DownloadParams(files=[{"url": url}], retries=0, progress=False, timeout_s=5)
    assert params.files[0].target == "a.bin"
    with pytest.raises(DataError) as info:
        download_files(params, tmp_path / "out")
    message = str(info.value)
    assert message.startswith("http://***@127.0.0.1:") and "/data/a.bin?token=***: " in message
    assert "hunter2" not in message and "tok123456" not in message


@pytest.mark.parametrize("files,message", [
    ([{"url": "http://h/a/p.txt", "path": "./p.txt"}, {"url": "http://h/b/p.txt"}],
     "files[0] and files[1] both write 'p.txt'"),
    ([{"url": "http://h/a", "path": "d"}, {"url": "http://h/b", "path": "d/e"}],
     "files[0] writes 'd' and files[1] writes 'd/e': one would have to be both a file and a directory"),
    ([{"url": "http://h/a", "path": "."}], "'.' names the output dir itself; give a file name"),
    ([{"url": "http://h/a", "path": "./"}], "'./' names the output dir itself"),
    ([{"url": "http://h/a", "path": ".staging/x"}], "'.staging/x': .staging/ is reserved"),
    ([{"url": "http://h/a", "extract_to": "_vlflow"}],
     "'_vlflow': _vlflow/ is reserved (partial downloads, the runner"),
    ([{"url": "http://h/a", "md5": "abc"}], "md5 'abc' is not a 32-digit hex digest"),
    ([{"url": "http://h/a", "sha256": "ab" * 16}], "is not a 64-digit hex digest"),
    ([{"url": "gopher://h/a"}], "unknown URL protocol 'gopher'"),
    ([{"url": "s3://bucket"}], "files[0]: cannot derive a file name from url 's3://bucket'; set `path`"),
    ([{"url": "https://user:pw-secret-1@host/"}], "cannot derive a file name from url 'https://***@host/'"),
])
def test_download_params_refuse_ambiguous_targets_and_bad_checksums(files, message):
    from pydantic import ValidationError
    from vlflow.stages.data.spec import DownloadParams

    with pytest.raises(ValidationError) as info:
        DownloadParams(files=files)
    text = info.value.errors()[0]["msg"]  # what vlflow shows (pydantic's own str also dumps the input)
    assert message in text and "pw-secret" not in text


def test_plan_reasons_mask_urls_before_shortening():
    from vlflow.plan import _diff

    old = {"files": [{"url": "https://analyst:hunter2hunter2@example.com/datasets/coco/train2014.zip"}]}
    new = {"files": [{"url": "https://analyst:hunter2hunter2@example.com/datasets/coco/val2014.zip"}]}
    (reason,) = _diff(old, new, "with")
    assert reason.startswith('with.files: [{"url": "https://***@example.com/datasets/') and "hunter2" not in reason


def test_set_paths_and_text_that_used_to_raise(tmp_path):
    path = _wf(tmp_path, 'params: {greet: "h\\u00e9llo \\u2713"}\n' + STAGES)
    error = _load_error(path, overrides=["stages.w.with" + ".a" * 3000 + "=1"])
    assert error.message == "path nests more than 64 keys deep" and error.file.startswith("--set stages.w.with.a.a")
    assert load_workflow(path).params == {"greet": "h\u00e9llo \u2713"}
    result = _vlflow("validate", "caf\udcff.yaml", cwd=tmp_path)  # a non-UTF-8 byte in argv
    assert (result.returncode, result.stderr) == (2, "error: caf\\udcff.yaml: workflow file not found\n")
    result = _vlflow("validate", path, "--set", "params.greet=\udcff", cwd=tmp_path, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid YAML: character U+DCFF is not allowed" in result.stderr
    result = _vlflow("validate", path, cwd=tmp_path, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and 'greet: "h\\xE9llo \\u2713"' in result.stdout


def test_merge_key_bombs_and_alias_floods(tmp_path):
    chained = ['  a0: &a0 {k0: 1, k1: 1, k2: 1, k3: 1, k4: 1, k5: 1, k6: 1, k7: 1, k8: 1}']
    chained += [f"  a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 9)}]}}" for i in range(1, 9)]
    error = _load_error(_wf(tmp_path, "params:\n" + "\n".join(chained) + "\n" + STAGES, "merge.yaml"))
    assert error.message == "`<<` merges copy more than 100,000 keys (is this a merge bomb?)" and error.line == 7
    flood = "params:\n  a: &a {k: 1}\n  b: [" + ", ".join(["*a"] * 5000) + "]\n" + STAGES
    error = _load_error(_wf(tmp_path, flood, "flood.yaml"))
    assert (error.line, error.message) == (3, "more than 1,000 YAML aliases (*name) in one file")
    error = _load_error(_wf(tmp_path, "params:\n  a: &a\n    x: 1\n    b: {<<: *a}\n" + STAGES, "self.yaml"))
    assert error.message in ("recursive YAML alias", "recursive YAML merge (`<<`) of a mapping into itself")
    merged = load_workflow(_wf(tmp_path, "params:\n  base: &b {x: 1, y: 2}\n  c: {<<: *b, y: 3}\n" + STAGES,
                               "ok.yaml"))
    assert merged.params["c"] == {"x": 1, "y": 3}


def test_zip_bomb_that_cannot_fit_is_refused_before_writing(tmp_path):
    import shutil as _shutil

    free = _shutil.disk_usage(tmp_path).free
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("small.txt", "x")
        info = zipfile.ZipInfo("huge.bin")
        zf.writestr(info, b"")
    # declare (as a bomb does) more than the disk holds: patch the central directory's uncompressed size
    data = bytearray(archive.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (0xFFFFFFFF).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    if free > 0xFFFFFFFF:  # the disk holds 4 GiB: make the bomb many entries of 4 GiB each
        with zipfile.ZipFile(archive, "a") as zf:
            for i in range(free // 0xFFFFFFFF + 1):
                zf.writestr(f"more{i}.bin", b"")
        data = bytearray(archive.read_bytes())
        start = 0
        while (central := data.find(b"PK\x01\x02", start)) != -1:
            data[central + 24:central + 28] = (0xFFFFFFFF).to_bytes(4, "little")
            start = central + 4
        archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bomb.zip: extracting needs [\d,]+ bytes but only [\d,]+ are free in .*; "
                                        r"nothing was extracted$"):
        safe_extract(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_unsupported_zip_version_is_a_data_error(tmp_path):
    archive = tmp_path / "future.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", "x")
    data = bytearray(archive.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    data[central + 6:central + 8] = (115).to_bytes(2, "little")  # "version needed to extract": 11.5
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"future.zip: cannot read archive: zip file version 11.5"):
        safe_extract(archive, tmp_path / "dest")


def test_download_from_a_fifo_or_device_is_refused_without_reading(tmp_path):
    from vlflow.stages.data.download import download_files
    from vlflow.stages.data.spec import DownloadParams

    os.mkfifo(tmp_path / "pipe")
    for url in (str(tmp_path / "pipe"), "file:///dev/zero"):
        params = DownloadParams(files=[{"url": url, "path": "x.bin"}], retries=0, progress=False)
        with pytest.raises(DataError, match=r": not a regular file \(a FIFO, device or directory\)$"):
            download_files(params, tmp_path / "out")
        assert not (tmp_path / "out" / "x.bin").exists()


def test_stage_output_paths_are_validated_as_the_stage_will_get_them(tmp_path):
    path = _wf(tmp_path, "stages:\n  w: {uses: testing.write}\n  dl:\n    uses: download\n    with:\n      files:\n"
                         "        - {url: 'file:///etc/hostname', path: '${stages.w.output}/stolen.txt'}\n")
    error = _load_error(path)
    assert (error.line, error.field) == (7, "stages.dl.with.files.0.path")
    assert error.message.startswith("'/vlflow/artifacts/w/stolen.txt' must be a relative path inside the output dir")
    assert error.message.endswith("(${stages.NAME.output} is replaced by the artifact's absolute path when the stage "
                                  "runs)")


def test_credential_options_written_in_a_workflow_are_masked_in_its_dump(tmp_path):
    from vlflow.secrets import is_credential_key

    path = _wf(tmp_path, "stages:\n  dl:\n    uses: download\n    with:\n      files: [{url: 's3://b/x.bin'}]\n"
                         "      storage_options: {s3: {key: AKIAEXAMPLE, secret: wJalrEXAMPLE, anon: false}}\n")
    options = load_workflow(path).to_dict()["stages"]["dl"]["with"]["storage_options"]
    assert options == {"s3": {"key": "***", "secret": "***", "anon": False}}
    assert [n for n in ("api_key", "aws_secret_access_key", "hf_token", "password", "client_secret", "tokenizer",
                        "keep_archive", "pad_token", "sort_key", "monkey") if is_credential_key(n)] == \
        ["api_key", "aws_secret_access_key", "hf_token", "password", "client_secret"]


def test_unwritable_state_dir(tmp_path, monkeypatch):
    import vlflow.config

    config = load_config(tmp_path, state_dir=str(tmp_path / "state"))
    monkeypatch.setattr(vlflow.config.os, "access", lambda path, mode: False)  # as a non-root user sees a 0o555 dir
    with pytest.raises(VlflowError) as info:
        config.ensure_state_dir()
    assert str(info.value) == (f"cannot use state dir {tmp_path / 'state'} (from --state-dir): Permission denied; "
                               "give a writable directory with --state-dir")
