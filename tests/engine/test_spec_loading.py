"""A stage process imports the one spec module its stage type needs (not every package's, nor the entry-point scan)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from vlflow.stage import get_spec, spec_source


def test_spec_source_names_the_module_defining_each_built_in_type():
    assert spec_source("testing.write") == "vlflow.stages.testing.spec:STAGES"
    assert spec_source("synthetic.coco") == "vlflow.stages.data.spec:STAGES"
    assert spec_source("no.such.type") is None


def test_built_in_stage_packages_register_through_the_entry_point_group_third_parties_use():
    """The engine lists no stage package: vlflow's own register in pyproject's "vlflow.stages" entry points."""
    from importlib.metadata import entry_points

    import vlflow.stage

    ours = {ep.name: ep.value for ep in entry_points(group="vlflow.stages") if ep.dist.name == "vlflow"}
    assert ours == {name: f"vlflow.stages.{name}.spec:STAGES" for name in ("data", "text", "vilt", "unitab", "testing")}
    assert not hasattr(vlflow.stage, "BUILTIN_SPEC_MODULES")
    assert {get_spec(t).name for t in ("download", "tokenizer.train", "vilt.pretrain", "unitab.pretrain")}


def test_stage_process_imports_only_its_spec_module_and_falls_back_to_the_registry(tmp_path):
    payload = {"stage": "w", "uses": "testing.write", "params": {"files": 2, "size": 4}, "inputs": {},
               "output_dir": str(tmp_path / "out"), "work_dir": None, "launch": None, "log_level": "INFO",
               "spec_source": spec_source("testing.write")}
    (tmp_path / "payload.json").write_text(json.dumps(payload))
    script = textwrap.dedent("""
        import json, sys
        from vlflow.execute import main
        from vlflow import stage
        rc = main([sys.argv[1]])
        specs = sorted(m for m in sys.modules if m.startswith("vlflow.stages.") and m.endswith(".spec"))
        fallback = stage.load_spec("testing.concat", "vlflow.stages.no_such_package.spec")  # a stale source
        print(json.dumps({"rc": rc, "specs": specs, "registry_loaded_after": stage._registry is not None,
                          "fallback": fallback.name}))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "payload.json")], capture_output=True,
                          text=True, timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, done.stdout + done.stderr
    assert report["specs"] == ["vlflow.stages.testing.spec"]
    assert report["fallback"] == "testing.concat" and report["registry_loaded_after"]
    result = json.loads((tmp_path / "payload.json.result.json").read_text())
    assert result == {"files": 2, "bytes": 8}
    assert get_spec("testing.write").name == "testing.write"
