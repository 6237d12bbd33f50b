"""The toy stage types the engine tests run: testing.write and testing.concat."""
import pytest

from vlflow.errors import StageError
from vlflow.stage import StageContext, get_spec


def context(tmp_path, uses, name, inputs=None, **params):
    output = tmp_path / name
    output.mkdir()
    return StageContext(stage=name, params=get_spec(uses).params(**params), inputs=inputs or {}, output_dir=output)


def test_write_creates_files_of_the_requested_size(tmp_path):
    ctx = context(tmp_path, "testing.write", "w", files=3, size=12, text="ab")
    metrics = get_spec("testing.write").load()(ctx)
    files = sorted(ctx.output_dir.iterdir())
    assert [f.name for f in files] == ["file_000.txt", "file_001.txt", "file_002.txt"]
    assert [f.read_text() for f in files] == ["ab 0\nab 0\nab", "ab 1\nab 1\nab", "ab 2\nab 2\nab"]
    assert metrics == {"files": 3, "bytes": 36}


def test_write_fails_on_request(tmp_path):
    with pytest.raises(StageError, match="failing on purpose"):
        get_spec("testing.write").load()(context(tmp_path, "testing.write", "w", fail=True))


def test_concat_joins_inputs_and_ignores_runner_metadata(tmp_path):
    upstream = tmp_path / "up"
    (upstream / "_vlflow").mkdir(parents=True)
    (upstream / "_vlflow" / "stage.log").write_text("log line\n")
    (upstream / "b.txt").write_text("B")
    (upstream / "a.txt").write_text("A")
    other = tmp_path / "other.txt"
    other.write_text("C")
    ctx = context(tmp_path, "testing.concat", "c", inputs={"a": upstream, "b": other}, suffix="!")
    metrics = get_spec("testing.concat").load()(ctx)
    assert (ctx.output_dir / "out.txt").read_text() == "ABC!"
    assert metrics == {"chars": 4}


def test_train_spec_is_distributed_and_resumable():
    spec = get_spec("testing.train")
    assert spec.distributed and spec.resumable and spec.optional_inputs == ("data",)
    assert spec.params().model_dump() == {"steps": 20, "lr": 0.1, "checkpoint_every": 5, "sleep": 0.0,
                                            "text": ""}
