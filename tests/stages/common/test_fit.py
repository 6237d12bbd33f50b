"""The shared training loop (stages/common/fit.py): gradient clipping that takes effect under torch_ddp (2 gloo ranks),
`max_norm` carried into the plugins that clip inside their optimizer step (ZeRO, Gemini, hybrid parallel), and the
helpers the loop is built from."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from vlflow.stages.common.fit import first_dim, to_device, warmup_steps

from tests.conftest import run_on_two_ranks
from vlflow.launch.command import free_port

LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

CLIP_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    import colossalai, torch
    import torch.distributed as dist
    from vlflow.launch.booster import make_booster
    from vlflow.stage import LaunchSpec, StageContext
    from vlflow.stages.common.fit import FitSettings, TrainTask, fit

    colossalai.launch_from_torch(backend="gloo", seed=0)
    out = Path(sys.argv[1])
    rank = dist.get_rank()
    results = {}
    for grad_clip in (0.0, 0.01):
        launch = LaunchSpec(backend="gloo")
        booster, plugin = make_booster(launch)
        ctx = StageContext(stage="t", params=None, inputs={}, output_dir=out / f"out{grad_clip}",
                           work_dir=out / f"work{grad_clip}", launch=launch, rank=rank,
                           world_size=dist.get_world_size(), booster=booster, plugin=plugin,
                           log=logging.getLogger("t"))
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        # each rank its own data: the clip must act on the all-reduced gradient
        features = torch.full((2, 4), 3.0 + rank)
        batches = lambda start_batch: iter([[features, torch.zeros(2, 1)]] * 4)
        task = TrainTask(losses=lambda m, b: {"loss": (m(b[0]) - b[1]).pow(2).mean()})
        result = fit(ctx, model, optimizer, scheduler, task, batches,
                     FitSettings(max_steps=1, accumulation=2, grad_clip=grad_clip, checkpoint_every=100))
        end = torch.cat([p.detach().flatten() for p in result.unwrapped().parameters()])
        results[str(grad_clip)] = (end - start).norm().item()

    # a plugin that clips inside step() (hybrid_parallel runs on gloo), from the worker's booster_factory: the stage
    # builds it once, with its grad_clip (a spy on the real constructor counts the builds)
    from colossalai.booster.plugin import HybridParallelPlugin
    from vlflow.launch.booster import booster_factory
    built, real_init = [], HybridParallelPlugin.__init__

    def counting_init(self, *args, **kwargs):
        built.append(kwargs.get("max_norm"))
        real_init(self, *args, **kwargs)

    HybridParallelPlugin.__init__ = counting_init
    launch = LaunchSpec(backend="gloo", plugin="hybrid_parallel", precision="fp32", zero_stage=0)
    ctx = StageContext(stage="t", params=None, inputs={}, output_dir=out / "out_hp", work_dir=out / "work_hp",
                       launch=launch, rank=rank, world_size=dist.get_world_size(),
                       booster_factory=booster_factory(launch), log=logging.getLogger("t"))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    result = fit(ctx, model, optimizer, scheduler, task, batches,
                 FitSettings(max_steps=1, accumulation=2, grad_clip=0.01, checkpoint_every=100))
    end = torch.cat([p.detach().flatten() for p in result.unwrapped().parameters()])
    results["hybrid_parallel_0.01"] = (end - start).norm().item()
    results["hybrid_parallel_builds"] = built
    if rank == 0:
        (out / "result.json").write_text(json.dumps(results))
    # tear gloo down before exit: a rank that exits with its gloo threads alive can abort ("terminate called ...")
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.dist
def test_grad_clip_bounds_the_update_under_torch_ddp(tmp_path):
    """SGD with lr 1: the update is the (all-reduced, accumulated) gradient; clipped, its norm is grad_clip. Under a
    plugin that clips in its step, the plugin is built once, with grad_clip as max_norm."""
    run_on_two_ranks(CLIP_SCRIPT, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["0.0"] > 1.0  # unclipped: a large gradient
    assert result["0.01"] == pytest.approx(0.01, rel=1e-3)
    assert result["hybrid_parallel_builds"] == [0.01]  # built once, with the stage's grad_clip
    assert result["hybrid_parallel_0.01"] == pytest.approx(0.01, rel=1e-3)  # and it clips


PLUGIN_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from vlflow.launch.booster import make_plugin
    from vlflow.stage import LaunchSpec

    dist.init_process_group("gloo")
    zero1 = make_plugin(LaunchSpec(plugin="low_level_zero", zero_stage=1, precision="bf16"), max_norm=0.1)
    zero2 = make_plugin(LaunchSpec(plugin="low_level_zero", zero_stage=2, precision="bf16"), max_norm=0.2)
    gemini = make_plugin(LaunchSpec(plugin="gemini", precision="bf16"), max_norm=0.3)
    unclipped = make_plugin(LaunchSpec(plugin="low_level_zero", precision="bf16"))
    # an EMA under gemini is refused before training: its module parameters are sharded chunk views between steps
    import logging, torch
    from pathlib import Path
    from vlflow.errors import StageError
    from vlflow.stage import StageContext
    from vlflow.stages.common.fit import Ema
    ctx = StageContext(stage="t", params=None, inputs={}, output_dir=Path("."), work_dir=Path("."),
                       launch=LaunchSpec(plugin="gemini", precision="bf16"), plugin=gemini, log=logging.getLogger("t"))
    model = torch.nn.Linear(2, 2)
    try:
        Ema(model, 0.99).start(model, torch.device("cpu"), None, ctx)
        ema_gemini = "accepted"
    except StageError as exc:
        ema_gemini = exc.field
    print(json.dumps({"zero1": zero1.zero_optim_kwargs["clip_grad_norm"], "ema_gemini": ema_gemini,
                      "zero2": zero2.zero_optim_kwargs["clip_grad_norm"],
                      "zero2_no_sync": zero2.support_no_sync(),
                      "gemini": gemini.optim_kwargs["max_norm"],
                      "unclipped": unclipped.zero_optim_kwargs["clip_grad_norm"]}))
    # tear gloo down before exit: a rank that exits with its gloo threads alive can abort ("terminate called ...")
    dist.barrier()
    dist.destroy_process_group()
""")


def test_plugins_that_clip_in_their_step_are_built_with_max_norm(tmp_path):
    """ZeRO and Gemini clip sharded fp32 master gradients inside step(); clip_grad_by_norm before step() would see
    no gradients there. The settings the engine builds carry max_norm (built without a GPU, not launched)."""
    script = tmp_path / "plugins.py"
    script.write_text(PLUGIN_SCRIPT)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", **LAUNCH_ENV)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    settings = json.loads(proc.stdout.strip().splitlines()[-1])
    assert settings == {"zero1": 0.1, "zero2": 0.2, "zero2_no_sync": False, "gemini": 0.3, "unclipped": 0.0,
                        "ema_gemini": "launch.plugin"}


def test_to_device_moves_every_tensor_of_nested_batches():
    batch = {"a": torch.ones(2), "b": [torch.zeros(3), ("text", torch.ones(1))], "c": "kept", "d": None}
    moved = to_device(batch, torch.device("meta"))
    assert moved["a"].device.type == "meta" and moved["b"][0].device.type == "meta"
    assert moved["b"][1][0] == "text" and moved["b"][1][1].device.type == "meta"
    assert moved["c"] == "kept" and moved["d"] is None
    assert first_dim(batch) == 2 and first_dim([torch.zeros(5, 2)]) == 5


def test_warmup_is_a_fraction_below_one_else_steps():
    assert warmup_steps(0.1, 200) == 20
    assert warmup_steps(30, 200) == 30
    assert warmup_steps(1.0, 200) == 1


DIFFERENT_INIT_SCRIPT = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    import colossalai, torch
    import torch.distributed as dist
    from vlflow.errors import StageError
    from vlflow.launch.booster import make_booster
    from vlflow.stage import LaunchSpec, StageContext
    from vlflow.stages.common.fit import FitSettings, TrainTask, fit

    colossalai.launch_from_torch(backend="gloo", seed=0)
    out, rank = Path(sys.argv[1]), dist.get_rank()
    booster, plugin = make_booster(LaunchSpec(backend="gloo"))
    ctx = StageContext(stage="t", params=None, inputs={}, output_dir=out / "out", work_dir=out / "work", rank=rank,
                       world_size=2, booster=booster, plugin=plugin, log=logging.getLogger("t"))
    torch.manual_seed(rank)  # the defect: initialisation seeded per rank
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    try:
        fit(ctx, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            TrainTask(losses=lambda m, b: {"loss": m(b).sum()}), lambda start: iter([torch.ones(1, 4)] * 2),
            FitSettings(max_steps=1))
    except StageError as exc:
        print(f"rank {rank}: {exc}")
    # tear gloo down before exit: a rank that exits with its gloo threads alive can abort ("terminate called ...")
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.dist
def test_ranks_with_different_initial_weights_are_refused(tmp_path):
    """ZeRO and Gemini never broadcast rank 0's weights: the loop checks every rank starts from the same ones."""
    proc = run_on_two_ranks(DIFFERENT_INIT_SCRIPT, tmp_path)
    for rank in (0, 1):
        assert f"rank {rank}: ranks start from different initial weights (2 tensors differ, e.g. weight)" in proc.stdout
