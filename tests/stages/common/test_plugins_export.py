"""Plugins and the trained model (stages/common/export.py, fit.make_adamw, hybrid_parallel validation): what runs on
CPU. The final export under 2 torch_ddp gloo ranks is exactly the unwrapped fp32 weights on rank 0 (ZeRO's master
gather and Gemini's chunk gather need CUDA: LowLevelZeroOptimizer asserts its parameters are on a device; see
docs/ARCHITECTURE.md, "The training loop"); Gemini gets Colossal-AI's HybridAdam in AdamW mode with the stage's
parameter groups; tp_size/pp_size > 1 is refused at validation for stage types without a shardformer policy."""
from __future__ import annotations

import json
import logging
import textwrap

import pytest
import torch
from vlflow.stages.common.fit import adamw_choice, make_adamw

from tests.conftest import run_on_two_ranks
from vlflow.errors import StageError, WorkflowError
from vlflow.stage import LaunchSpec, StageContext
from vlflow.workflow import load_workflow


def context(plugin: str, tmp_path) -> StageContext:
    return StageContext(stage="t", params=None, inputs={}, output_dir=tmp_path, work_dir=tmp_path,
                        launch=LaunchSpec(plugin=plugin, precision="bf16"), log=logging.getLogger("t"))


def groups() -> list[dict]:
    model = torch.nn.Linear(3, 2)
    return [{"params": [model.weight], "weight_decay": 0.05},
            {"params": [model.bias], "weight_decay": 0.0, "lr": 2e-3}]


def test_gemini_gets_hybrid_adam_in_adamw_mode_and_other_plugins_torch_adamw():
    from colossalai.nn.optimizer import HybridAdam
    from colossalai.zero.gemini.gemini_optimizer import _AVAIL_OPTIM_LIST

    optimizer_class, extra = adamw_choice("gemini")
    assert optimizer_class is HybridAdam and optimizer_class in _AVAIL_OPTIM_LIST and extra == {"adamw_mode": True}
    for plugin in ("torch_ddp", "low_level_zero", "hybrid_parallel", None):
        assert adamw_choice(plugin) == (torch.optim.AdamW, {})


@pytest.mark.parametrize("plugin", ["torch_ddp", "low_level_zero"])
def test_make_adamw_keeps_the_stage_parameter_groups(plugin, tmp_path):
    optimizer = make_adamw(context(plugin, tmp_path), groups(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    assert type(optimizer) is torch.optim.AdamW
    assert [(g["lr"], g["weight_decay"], g["betas"]) for g in optimizer.param_groups] == [
        (1e-3, 0.05, (0.9, 0.98)), (2e-3, 0.0, (0.9, 0.98))]


def test_make_adamw_under_gemini_is_hybrid_adam_or_one_clear_error(tmp_path):
    """HybridAdam loads a CPU or CUDA Adam kernel when built; where neither loads (this CPU machine without a
    compiler toolchain for it) the stage fails with one error naming launch.plugin, not colossalai's assertion."""
    from colossalai.nn.optimizer import HybridAdam

    try:
        optimizer = make_adamw(context("gemini", tmp_path), groups(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    except StageError as exc:
        assert exc.field == "launch.plugin" and "HybridAdam" in str(exc) and "\n" not in str(exc)
    else:
        assert type(optimizer) is HybridAdam and optimizer.adamw_mode
        assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-3, 0.05), (2e-3, 0.0)]


EXPORT_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    import colossalai, torch
    import torch.distributed as dist
    from vlflow.launch.booster import make_booster
    from vlflow.stage import LaunchSpec, StageContext
    from vlflow.stages.common.export import trained_module
    from vlflow.stages.common.fit import FitSettings, TrainTask, fit

    colossalai.launch_from_torch(backend="gloo", seed=0)
    out, rank = Path(sys.argv[1]), dist.get_rank()
    launch = LaunchSpec(backend="gloo")
    booster, plugin = make_booster(launch)
    ctx = StageContext(stage="t", params=None, inputs={}, output_dir=out / "out", work_dir=out / "work",
                       launch=launch, rank=rank, world_size=2, booster=booster, plugin=plugin,
                       log=logging.getLogger("t"))

    class TiedModel(torch.nn.Module):  # a tied weight (as ViLT's MLM decoder) and running statistics (buffers)

        def __init__(self):
            super().__init__()
            self.embed, self.norm = torch.nn.Embedding(6, 4), torch.nn.BatchNorm1d(4)
            self.decoder = torch.nn.Linear(4, 6)
            self.decoder.weight = self.embed.weight

        def forward(self, ids):
            return self.decoder(self.norm(self.embed(ids)))

    torch.manual_seed(0)
    model = TiedModel()
    initial = model.embed.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]][rank])
    task = TrainTask(losses=lambda m, b: {"loss": torch.nn.functional.cross_entropy(m(b), b)})
    result = fit(ctx, model, optimizer, scheduler, task, lambda start: iter([ids] * 8),
                 FitSettings(max_steps=3, checkpoint_every=100))
    expected = {k: v.detach().clone() for k, v in result.unwrapped().state_dict().items()}
    trained = trained_module(result.model, result.optimizer, ctx.is_main)
    if rank == 0:
        state = trained.state_dict()
        report = {"keys_equal": sorted(state) == sorted(expected),
                  "equal": all(torch.equal(state[k], expected[k]) for k in expected),
                  "dtypes": sorted({str(v.dtype) for v in state.values()}),
                  "devices": sorted({v.device.type for v in state.values()}),
                  "trained": not torch.equal(state["embed.weight"], initial),
                  "tied": trained.decoder.weight.data_ptr() == trained.embed.weight.data_ptr(),
                  "running_mean_moved": bool(state["norm.running_mean"].abs().sum() > 0)}
        (out / "export.json").write_text(json.dumps(report))
    else:
        (out / "rank1.json").write_text(json.dumps({"none": trained is None}))

    # hybrid_parallel (tp = pp = 1, zero_stage 0) in bf16 runs on gloo: the module holds bf16 working weights, the
    # optimizer fp32 masters; the export must be the masters
    from colossalai.booster import Booster
    from vlflow.launch.booster import make_plugin
    launch = LaunchSpec(backend="gloo", plugin="hybrid_parallel", precision="bf16", zero_stage=0)
    plugin = make_plugin(launch)
    ctx = StageContext(stage="t", params=None, inputs={}, output_dir=out / "out_hp", work_dir=out / "work_hp",
                       launch=launch, rank=rank, world_size=2, booster=Booster(plugin=plugin), plugin=plugin,
                       log=logging.getLogger("t"))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    features = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    task = TrainTask(losses=lambda m, b: {"loss": m(b).float().pow(2).mean()})
    result = fit(ctx, model, optimizer, scheduler, task, lambda start: iter([features] * 8),
                 FitSettings(max_steps=3, checkpoint_every=100))
    working = result.unwrapped().weight.detach().clone()
    masters = {id(p): m for p, m in result.optimizer.working_to_master_map.items()}
    master = masters[id(result.unwrapped().weight)].detach().clone()
    trained = trained_module(result.model, result.optimizer, ctx.is_main)
    if rank == 0:
        exported = trained.weight.detach()
        (out / "hybrid.json").write_text(json.dumps({
            "working_dtype": str(working.dtype), "dtype": str(exported.dtype),
            "equals_master": torch.equal(exported, master), "master_differs_from_working": not torch.equal(
                master, working.float())}))
    # a frozen layer and a constant buffer have no master: the bf16 cast rounds them, the export gives back their
    # fp32 originals (training left them unchanged); a buffer training changes keeps its trained value
    class PartlyFrozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            self.frozen.requires_grad_(False)
            self.register_buffer("scale", torch.full((8,), 1.0 + 2 ** -12))  # not a bf16 value
            self.register_buffer("steps", torch.zeros(8))

        def forward(self, x):
            self.steps += 1.0
            return self.head(self.frozen(x) * self.scale)

    ctx.work_dir, ctx.output_dir = out / "work_frozen", out / "out_frozen"
    torch.manual_seed(0)
    model = PartlyFrozen()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    result = fit(ctx, model, optimizer, scheduler, task, lambda start: iter([features] * 8),
                 FitSettings(max_steps=3, checkpoint_every=100))
    working_frozen = result.unwrapped().frozen.weight.detach().clone()
    trained = trained_module(result.model, result.optimizer, ctx.is_main)
    if rank == 0:
        state = trained.state_dict()
        (out / "frozen.json").write_text(json.dumps({
            "working_dtype": str(working_frozen.dtype),
            "rounded_in_training": not torch.equal(working_frozen.float(), original["frozen.weight"]),
            "frozen_exact": all(torch.equal(state[k], original[k]) for k in ("frozen.weight", "frozen.bias")),
            "constant_buffer_exact": torch.equal(state["scale"], original["scale"]),
            "changed_buffer": state["steps"].tolist()[0], "head_trained": not torch.equal(
                state["head.weight"], original["head.weight"])}))
    # tear gloo down before exit: a rank that exits with its gloo threads alive can abort ("terminate called ...")
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.dist
def test_export_is_the_fp32_weights_under_torch_ddp_and_the_masters_under_hybrid_parallel_bf16(tmp_path):
    run_on_two_ranks(EXPORT_SCRIPT, tmp_path)
    report = json.loads((tmp_path / "export.json").read_text())
    assert report == {"keys_equal": True, "equal": True, "dtypes": ["torch.float32", "torch.int64"],
                      "devices": ["cpu"], "trained": True, "tied": True, "running_mean_moved": True}
    assert json.loads((tmp_path / "rank1.json").read_text()) == {"none": True}
    assert json.loads((tmp_path / "hybrid.json").read_text()) == {
        "working_dtype": "torch.bfloat16", "dtype": "torch.float32", "equals_master": True,
        "master_differs_from_working": True}
    assert json.loads((tmp_path / "frozen.json").read_text()) == {
        "working_dtype": "torch.bfloat16", "rounded_in_training": True, "frozen_exact": True,
        "constant_buffer_exact": True, "changed_buffer": 3.0, "head_trained": True}


@pytest.mark.parametrize("launch,field", [
    ("{plugin: hybrid_parallel, tp_size: 2}", "tp_size"),
    ("{plugin: hybrid_parallel, pp_size: 2, precision: bf16}", "pp_size"),
])
def test_tensor_or_pipeline_parallel_is_refused_for_stages_without_a_shard_policy(tmp_path, launch, field):
    """ViLT, UniTAB and testing.train models have no shardformer policy in colossalai 0.5.0 (auto_policy.py lists
    none of them): refused when the workflow is loaded, before anything is launched."""
    path = tmp_path / "wf.yaml"
    path.write_text(f"stages:\n  a: {{uses: synthetic.coco}}\n  t:\n    uses: vilt.pretrain\n"
                    f"    inputs: {{arrows: a}}\n    launch: {launch}\n")
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    error = info.value
    assert (error.field, error.line) == (f"stages.t.launch.{field}", 6)
    assert error.message.startswith(f"{field}=2: stage type vilt.pretrain cannot split its model by tensor/pipeline "
                                    f"parallelism (it has no Colossal-AI shardformer policy)")


def test_vilt_and_unitab_models_have_no_shardformer_policy():
    """The fact the validation above rests on: a custom policy is needed for tp/pp, and colossalai has none."""
    from colossalai.shardformer.policies.auto_policy import _POLICY_LIST

    assert not [name for name in _POLICY_LIST if "vilt" in name.lower() or "unitab" in name.lower()]


def test_hybrid_parallel_without_tp_pp_builds_a_replicating_policy():
    """tp_size = pp_size = 1: the plugin gets a policy that replaces no layer (the auto policy would raise
    NotImplementedError for any model colossalai does not list)."""
    from vlflow.launch.booster import ReplicatedPolicy

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    policy = ReplicatedPolicy()
    policy.set_model(model)
    assert policy.module_policy() == {} and policy.preprocess() is model and policy.postprocess() is model


RESUME_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    import colossalai, torch
    import torch.distributed as dist
    from colossalai.booster import Booster
    from vlflow.launch.booster import make_plugin
    from vlflow.stage import LaunchSpec, StageContext
    from vlflow.stages.common.export import gathered_state_dict
    from vlflow.stages.common.fit import FitSettings, TrainTask, fit

    colossalai.launch_from_torch(backend="gloo", seed=0)
    out, rank = Path(sys.argv[1]), dist.get_rank()
    launch = LaunchSpec(backend="gloo", plugin="hybrid_parallel", precision="bf16", zero_stage=0)

    def run(work, max_steps, checkpoint_every):
        plugin = make_plugin(launch)
        ctx = StageContext(stage="t", params=None, inputs={}, output_dir=out / work / "out", work_dir=out / work,
                           launch=launch, rank=rank, world_size=2, booster=Booster(plugin=plugin), plugin=plugin,
                           log=logging.getLogger("t"))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        features = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
        task = TrainTask(losses=lambda m, b: {"loss": m(b).float().pow(2).mean()})
        result = fit(ctx, model, optimizer, scheduler, task, lambda start: iter([features] * 16),
                     FitSettings(max_steps=max_steps, checkpoint_every=checkpoint_every))
        return result, gathered_state_dict(result.model, result.optimizer, rank == 0)

    _, uninterrupted = run("full", 6, 100)
    run("resumed", 4, 3)  # a checkpoint at step 3; steps 4.. are lost, as in a kill
    result, resumed = run("resumed", 6, 100)
    if rank == 0:
        (out / "resume.json").write_text(json.dumps({
            "resumed_from": result.resumed_from_step,
            "masters_saved": (out / "resumed" / "checkpoints" / "step_3" / "master_weights.pt").is_file(),
            "equal": sorted(resumed) == sorted(uninterrupted) and all(
                torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)}))
    # tear gloo down before exit: a rank that exits with its gloo threads alive can abort ("terminate called ...")
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.dist
def test_resume_under_bf16_masters_is_exact(tmp_path):
    """hybrid_parallel bf16 (gloo): the Booster saves the bf16 working weights and its load sets the fp32 masters to
    them; the checkpoint's master_weights.pt restores the masters, so a resumed run ends bit-identical to an
    uninterrupted one (the same code path restores ZeRO's master shards on GPUs)."""
    run_on_two_ranks(RESUME_SCRIPT, tmp_path)
    assert json.loads((tmp_path / "resume.json").read_text()) == {"resumed_from": 3, "masters_saved": True,
                                                                  "equal": True}
