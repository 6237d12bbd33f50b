"""benchmarks/gpu_check.sh --cpu-dry-run: the GPU check's code paths at toy size on the CPU, through the shell entry
point; the report has every part, and its figures are measured numbers (not placeholders)."""
from __future__ import annotations

import json
import math
import os
import subprocess

from tests.conftest import REPO_ROOT

ROOT = REPO_ROOT


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_gpu_check_dry_run_reports_every_part_with_measured_figures(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--cpu-dry-run"],
                            capture_output=True, text=True, timeout=480, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cpu_dry_run"] is True and set(report["parts"]) == {"e2e", "vilt_step", "unitab_step", "eval",
                                                                       "loader"}
    parts = report["parts"]
    assert "skipped" in parts["e2e"]  # the e2e tests run the workflows on CPU; the dry run says so
    vilt = parts["vilt_step"]
    assert "error" not in vilt and _number(vilt["flops_per_sample"]) and vilt["batch"] >= 2
    assert set(vilt["paths"]) == {"plain", "torch_ddp"}
    for entry in vilt["paths"].values():
        assert "error" not in entry, entry
        assert _number(entry["samples_per_s"]) and _number(entry["achieved_tflops"])
    assert _number(vilt["paths"]["torch_ddp"]["speedup_vs_plain"])
    unitab = parts["unitab_step"]["paths"]
    assert all(_number(unitab[name]["samples_per_s"]) for name in ("plain", "fused")), unitab
    evaluation = parts["eval"]
    assert _number(evaluation["batched_pairs_per_s"]) and _number(evaluation["per_image_baseline_pairs_per_s"])
    loader = parts["loader"]
    assert "error" not in loader, loader
    assert all(_number(loader[name]) for name in ("real_loader_samples_per_s", "in_memory_batch_samples_per_s",
                                                   "loader_alone_samples_per_s", "real_vs_in_memory"))
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## Goals" in markdown and "retrieval pairs/s" in markdown and "CPU dry run" in markdown
    assert (tmp_path / "gpu_check.log").is_file()


def test_e2e_thresholds_are_the_e2e_tests_thresholds():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import e2e_thresholds

    retrieval = {"all": {"ir_r1": 0.2, "tr_r1": 0.09, "chance_r1": 0.02}, "head": "rank"}
    vqa = {"vqa_score": 0.4, "best_constant_score": 0.124}
    result = e2e_thresholds("tiny_vilt", [retrieval, vqa, {"unrelated": 1}])
    assert result["passed"] is False and result["checks"] == {
        "ir_r1 >= 5x chance": True, "tr_r1 >= 5x chance": False, "vqa >= 2.5x best constant": True}
    grounding = {"anybox_oracle_recall@1": 0.31, "random_box_recall@1": 0.1}
    assert e2e_thresholds("tiny_unitab", [grounding])["passed"] is True
    assert e2e_thresholds("tiny_unitab", [{**grounding, "random_box_recall@1": 0.11}])["passed"] is False


def test_e2e_runs_each_training_stage_at_its_whole_batch_and_reads_its_figures(tmp_path):
    """On one GPU the e2e part sets per_device_batch_size to the stage's batch_size (no accumulation, same maths):
    the table must follow the workflows. Stage seconds and samples/s are read back from real run output."""
    import sys

    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import ONE_DEVICE_BATCHES, e2e_command, stage_seconds, training_rates

    for workflow, batches in ONE_DEVICE_BATCHES.items():
        stages = yaml.safe_load((ROOT / "workflows" / f"{workflow}.yaml").read_text())["stages"]
        training = {name for name, stage in stages.items() if "per_device_batch_size" in (stage.get("with") or {})}
        assert set(batches) == training, workflow
        for name, batch in batches.items():
            assert stages[name]["with"]["batch_size"] == batch, (workflow, name)
        command = e2e_command(workflow, tmp_path)
        assert command[1:4] == ["-m", "vlflow", "run"] and "defaults.launch.plugin=low_level_zero" in command

    assert stage_seconds("✓ done   data  0.9s\n         images=600\n✓ done   pretrain  53.7s\n") == {
        "data": 0.9, "pretrain": 53.7}
    attempt = tmp_path / "cache" / "artifacts" / "ab12" / "att1"
    (attempt / "_vlflow").mkdir(parents=True)
    (attempt.parent / "manifest.json").write_text(json.dumps({"meta": {"stage": "finetune"}}))
    (attempt / "_vlflow" / "metrics.jsonl").write_text(
        json.dumps({"step": 50, "samples_per_s": 90.0}) + "\n" + json.dumps({"step": 100, "samples_per_s": 99.5}))
    assert training_rates(tmp_path / "cache") == {"finetune": 99.5}
