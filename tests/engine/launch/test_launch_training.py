"""Shared training helpers (stages/common/training.py) in one process: accumulation, data order, metrics,
checkpoint commit/prune/recovery, and the launch checks of vlflow.launch.booster."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from vlflow.stages.common.training import (
    MetricsLogger,
    ResumableSampler,
    accumulation_steps,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)

from vlflow.errors import LaunchError, StageError
from vlflow.stage import LaunchSpec, StageContext


def test_accumulation_steps():
    assert accumulation_steps(4096, 32, 8) == 16
    assert accumulation_steps(64, 32, 2) == 1
    with pytest.raises(StageError, match="global_batch 100 must be a positive multiple of .* = 64"):
        accumulation_steps(100, 32, 2)
    with pytest.raises(StageError, match="global_batch 32 must be"):
        accumulation_steps(32, 32, 2)  # smaller than one step of all ranks
    with pytest.raises(StageError, match="positive"):
        accumulation_steps(64, 0, 2)


def test_sampler_resumed_order_equals_uninterrupted_and_ranks_split_each_global_batch():
    def take(sampler, count):
        iterator = iter(sampler)
        return [next(iterator) for _ in range(count)]

    dataset_size, batch, world = 32, 3, 2  # 5 global batches of 6 per epoch, 2 samples dropped
    ranks = [ResumableSampler(dataset_size, batch, rank, world, seed=7) for rank in range(world)]
    assert ranks[0].batches_per_epoch == 5
    runs = [take(sampler, 12) for sampler in ranks]  # crosses two epoch boundaries
    for step in range(12):
        global_batch = runs[0][step] + runs[1][step]
        assert len(set(global_batch)) == batch * world  # the ranks never share a sample within a step
    first_epoch = sorted(i for step in range(5) for rank in range(world) for i in runs[rank][step])
    assert len(set(first_epoch)) == 30 and set(first_epoch) <= set(range(32))  # each sample at most once
    assert runs[0][:5] != runs[0][5:10]  # a new permutation each epoch

    resumed = ResumableSampler(dataset_size, batch, rank=1, world_size=world, seed=7, start_batch=7)
    assert take(resumed, 5) == runs[1][7:12]
    assert ResumableSampler(dataset_size, batch, 0, world, seed=8).batch(0) != runs[0][0]


def test_sampler_rejects_a_dataset_smaller_than_a_global_batch():
    with pytest.raises(StageError, match="smaller than one global batch"):
        ResumableSampler(5, 4, rank=0, world_size=2)


def test_seed_everything_depends_on_seed_and_rank():
    seed_everything(3, rank=0)
    a = torch.rand(3)
    seed_everything(3, rank=0)
    assert torch.equal(a, torch.rand(3))
    seed_everything(3, rank=1)
    assert not torch.equal(a, torch.rand(3))


def make_ctx(tmp_path: Path, rank: int = 0, booster=None) -> StageContext:
    return StageContext(stage="train", params=None, inputs={}, output_dir=tmp_path / "out",
                        work_dir=tmp_path / "work", rank=rank, booster=booster, log=logging.getLogger("test"))


def test_metrics_logger_writes_jsonl_and_tensorboard_on_rank0_only(tmp_path):
    with MetricsLogger(make_ctx(tmp_path)) as metrics:
        metrics.log(1, loss=torch.tensor(0.5), lr=0.1)
        metrics.log(2, loss=0.25, note="text is kept")
    lines = [json.loads(line) for line in (tmp_path / "out" / "_vlflow" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "lr": 0.1}, {"step": 2, "loss": 0.25, "note": "text is kept"}]
    assert list((tmp_path / "out" / "_vlflow" / "tensorboard").glob("events.*"))

    other = tmp_path / "rank1"
    with MetricsLogger(make_ctx(other, rank=1)) as metrics:
        metrics.log(1, loss=1.0)
    assert not (other / "out").exists()


@pytest.fixture
def boosted(tmp_path):
    """A single-process Booster (no plugin, CPU) with a model, SGD+momentum and a scheduler."""
    from colossalai.booster import Booster

    booster = Booster(device="cpu")
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    return make_ctx(tmp_path, booster=booster), model, optimizer, scheduler


def train_one_step(model, optimizer, scheduler):
    model(torch.ones(2, 3)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_checkpoint_round_trip_restores_model_optimizer_scheduler(boosted):
    ctx, model, optimizer, scheduler = boosted
    assert load_checkpoint(ctx, model, optimizer, scheduler) is None  # nothing saved yet
    train_one_step(model, optimizer, scheduler)
    save_checkpoint(ctx, model, optimizer, scheduler, step=1, extra={"epoch": 0})
    saved_weight = model.weight.detach().clone()
    saved_momentum = optimizer.state[model.weight]["momentum_buffer"].clone()
    train_one_step(model, optimizer, scheduler)
    assert not torch.equal(model.weight, saved_weight)

    assert load_checkpoint(ctx, model, optimizer, scheduler) == (1, {"epoch": 0})
    assert torch.equal(model.weight, saved_weight)
    assert torch.equal(optimizer.state[model.weight]["momentum_buffer"], saved_momentum)
    assert scheduler.get_last_lr() == [0.05]


def test_checkpoints_keep_last_two_and_an_interrupted_save_leaves_the_previous_one(boosted):
    ctx, model, optimizer, scheduler = boosted
    for step in (1, 2, 3):
        train_one_step(model, optimizer, scheduler)
        save_checkpoint(ctx, model, optimizer, scheduler, step=step)
    root = ctx.work_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2", "step_3"]

    # A save killed before its rename: a partial temporary directory, `latest` still on step 3.
    (root / ".tmp_step_4").mkdir()
    (root / ".tmp_step_4" / "model.pt").write_bytes(b"truncated")
    assert latest_checkpoint(ctx) == root / "step_3"
    assert load_checkpoint(ctx, model, optimizer, scheduler)[0] == 3
    # The next successful save clears the leftover.
    save_checkpoint(ctx, model, optimizer, scheduler, step=4)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_3", "step_4"]


def test_a_pointer_to_a_missing_checkpoint_is_a_clear_error(boosted):
    ctx, model, optimizer, scheduler = boosted
    root = ctx.work_dir / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text("step_9")
    with pytest.raises(StageError, match="names step_9, which is missing or incomplete"):
        load_checkpoint(ctx, model, optimizer, scheduler)


@pytest.mark.parametrize("launch, device, world_size, message", [
    (LaunchSpec(plugin="low_level_zero"), "cpu", 2, "plugin low_level_zero needs CUDA GPUs"),
    (LaunchSpec(plugin="gemini", precision="fp16"), "cpu", 2, "plugin gemini needs CUDA GPUs"),
    (LaunchSpec(plugin="hybrid_parallel", precision="bf16"), "cpu", 2, "runs as plain data parallel only"),
    (LaunchSpec(plugin="hybrid_parallel", precision="fp16", zero_stage=0), "cpu", 2, "needs CUDA GPUs"),
    (LaunchSpec(precision="fp16"), "cpu", 2, "fp16 with torch_ddp uses CUDA"),
    (LaunchSpec(precision="bf16"), "cuda", 2, "bf16 is not available with plugin torch_ddp"),
    (LaunchSpec(plugin="gemini"), "cuda", 2, "gemini trains in fp16 or bf16 only"),
    (LaunchSpec(plugin="low_level_zero", zero_stage=0), "cuda", 2, "zero_stage 1 or 2"),
    (LaunchSpec(plugin="hybrid_parallel", tp_size=2, pp_size=2), "cuda", 6, "not divisible by tp_size 2 x pp_size 2"),
])
def test_unsupported_launch_combinations_are_named(launch, device, world_size, message):
    from vlflow.launch.booster import check_launch

    with pytest.raises(LaunchError, match=message):
        check_launch(launch, device, world_size)


def test_supported_launch_combinations_pass_the_check():
    from vlflow.launch.booster import check_launch

    check_launch(LaunchSpec(), "cpu", 2)
    check_launch(LaunchSpec(precision="fp16"), "cuda", 8)
    check_launch(LaunchSpec(plugin="hybrid_parallel", tp_size=2, pp_size=2, precision="bf16"), "cuda", 8)
    check_launch(LaunchSpec(plugin="hybrid_parallel", zero_stage=0, precision="bf16"), "cpu", 2)


def test_torch_ddp_on_cpu_trains_a_model_with_batchnorm(tmp_path):
    """Colossal-AI's TorchDDPPlugin turns BatchNorm into SyncBatchNorm, which has no CPU kernel; on CPU the engine's
    plugin keeps plain BatchNorm, so a from-scratch CNN trains under the launcher."""
    from vlflow.launch.command import free_port

    code = textwrap.dedent("""
        import colossalai, torch
        from vlflow.launch.booster import make_booster
        from vlflow.stage import LaunchSpec
        colossalai.launch_from_torch(backend="gloo", seed=0)
        booster, plugin = make_booster(LaunchSpec())
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                    torch.nn.LazyLinear(1))
        model(torch.zeros(2, 3, 8, 8))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer, *_ = booster.boost(model, optimizer)
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        before = model.unwrap()[1].running_mean.clone()
        loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean()
        booster.backward(loss, optimizer)
        optimizer.step()
        assert not torch.equal(before, model.unwrap()[1].running_mean)
        print("trained")
    """)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-3000:]


def test_configure_determinism_sets_threads_per_rank_and_deterministic_kernels(monkeypatch):
    from vlflow.stages.common.training import configure_determinism

    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert configure_determinism(world_size=2) == 3 == torch.get_num_threads()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        cores = len(os.sched_getaffinity(0))
        assert configure_determinism(world_size=8) == max(1, cores // 2)  # ranks on this node, not in the job
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
