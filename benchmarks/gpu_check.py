"""One prepared check for a lent GPU (issue 11): writes gpu_check.md + gpu_check.json to --out.

    python benchmarks/gpu_check.py --out DIR                 # on the GPU machine (bash benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --out DIR --cpu-dry-run   # the same code paths at toy size on the CPU (~1-2 min)
    python benchmarks/gpu_check.py --out DIR --parts eval    # one part alone (e2e, vilt_step, unitab_step, eval)
    python benchmarks/gpu_check.py --out DIR --parts eval --cpu-dry-run --eval-rounds 5   # retrieval pairs/s on CPU

Parts, each guarded (a failure is reported and the rest still runs) and skipped when the time budget is spent:
  e2e          tiny_vilt.yaml and tiny_unitab.yaml end to end, 1 process, bf16, low_level_zero, their learning
               thresholds (those of tests/e2e/test_vilt_e2e.py and tests/e2e/test_unitab_e2e.py)
  vilt_step    ViLT-B/32 MLM+ITM train step at 384x384: a plain PyTorch bf16-autocast loop vs the stage path
               (Booster) under torch_ddp (fp16: its Booster has no bf16), low_level_zero and gemini (bf16), at the
               largest batch the plain loop fits; samples/s, peak memory, MFU
  unitab_step  UniTAB train step: plain fp32 loop vs bf16 autocast + torch's fused AdamW (SDPA attention is what
               nn.Transformer already uses; Colossal-AI's FusedAdam/HybridAdam need kernels compiled, so not used)
  eval         retrieval scoring pairs/s in bf16 (vilt.evaluate_retrieval's batched path) vs the old per-image path
  loader       ViLT-B/32 step samples/s fed by the real input pipeline (8 workers, 1,000 512-px JPEGs) vs one
               in-memory batch: whether the loader keeps the GPU fed

FLOPs per sample are counted by torch.utils.flop_counter.FlopCounterMode over one forward + backward of the step
(matrix multiplies, convolutions, attention; element-wise ops not counted). MFU = samples/s x FLOPs per sample / peak
(H200 bf16 dense: 989 TFLOPS).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

H200_BF16_PEAK_FLOPS = 989e12
GOALS = {"stage_speedup": 1.3, "stage_memory_ratio": 0.65, "mfu": 0.45, "eval_pairs_per_s": 2000.0,
         "loader_vs_in_memory": 0.95}
PARTS = ("e2e", "vilt_step", "unitab_step", "eval", "loader")
BENCHMARK_RESERVE_S = 200.0  # of the budget, kept for the benchmark parts when the e2e part runs first


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def rate(step, steps: int, samples_per_step: int) -> float:
    """samples/s over `steps` calls of step() after one warm-up call."""
    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * samples_per_step / (time.perf_counter() - start)


def flops_per_sample(step, batch_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / batch_size


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------------------------
# a. the tiny workflows end to end

# One GPU runs each training stage's whole batch at once (the CPU workflows split it over 2 ranks and micro-batches);
# with no accumulation the tiny stages make half the (launch-bound) kernel calls, and the maths is the same.
ONE_DEVICE_BATCHES = {
    "tiny_vilt": {"pretrain": 32, "finetune": 16, "finetune_vqa": 32},
    "tiny_unitab": {"pretrain": 16},
}


def e2e_command(workflow: str, project: Path) -> list[str]:
    launch = ["--set", "defaults.launch.nproc_per_node=1", "--set", "defaults.launch.plugin=low_level_zero",
              "--set", "defaults.launch.precision=bf16", "--set", "defaults.launch.backend=nccl"]
    for stage, batch in ONE_DEVICE_BATCHES[workflow].items():
        launch += ["--set", f"stages.{stage}.with.per_device_batch_size={batch}"]
    return [sys.executable, "-m", "vlflow", "run", str(ROOT / "workflows" / f"{workflow}.yaml"),
            "--cache", str(project / "cache"), "--state-dir", str(project / "state"), *launch]


def stage_seconds(output: str) -> dict[str, float]:
    """`✓ done   STAGE  12.3s` lines of `vlflow run`'s output."""
    import re

    return {m.group(1): float(m.group(2)) for m in re.finditer(r"done\s+(\S+)\s+([0-9.]+)s", output)}


def training_rates(cache: Path) -> dict[str, float]:
    """The last samples/s each training stage logged (its `_vlflow/metrics.jsonl`), by stage name (the manifest's)."""
    rates = {}
    for log in cache.rglob("_vlflow/metrics.jsonl"):
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [row for row in rows if "samples_per_s" in row]
        manifest = next(log.parents[2].glob("manifest*.json"), None) if len(log.parents) > 2 else None
        try:
            stage = json.loads(manifest.read_text())["meta"]["stage"] if manifest else log.parents[1].name
        except (ValueError, KeyError, TypeError):
            stage = log.parents[1].name
        if rows:
            rates[stage] = rows[-1]["samples_per_s"]
    return rates


def part_e2e(args) -> dict:
    """Both tiny workflows at once (separate caches, one GPU): their stages are launch-bound on a GPU, so they
    overlap."""
    if args.cpu_dry_run:
        return {"skipped": "CPU dry run: the suite's tests/e2e/test_vilt_e2e.py and tests/e2e/test_unitab_e2e.py run "
                           "these workflows on CPU (2 gloo ranks, fp32)"}
    workflows = [w for w in ("tiny_vilt", "tiny_unitab") if w in args.e2e_workflows]
    # the benchmarks after this part keep BENCHMARK_RESERVE_S of the budget
    e2e_deadline = args.deadline - (BENCHMARK_RESERVE_S if len(args.part_list) > 1 else 0)
    out: dict = {"launch": "1 process, low_level_zero, bf16, nccl; whole batch per step (no accumulation)"}
    with tempfile.TemporaryDirectory(prefix="gpu_check_e2e_") as tmp:
        running = {}
        for workflow in workflows:
            project = Path(tmp) / workflow
            project.mkdir()
            log = open(project / "output.log", "w+")
            running[workflow] = (subprocess.Popen(e2e_command(workflow, project), cwd=ROOT, stdout=log,
                                                  stderr=subprocess.STDOUT, text=True,
                                                  env={**os.environ, "PYTHONSAFEPATH": "1"}),  # installed vlflow
                                 log, project, time.perf_counter())
        for workflow, (process, log, project, started) in running.items():
            try:
                process.wait(timeout=max(1.0, e2e_deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.seek(0)
            output = log.read()
            log.close()
            entry = {"seconds": round(time.perf_counter() - started, 1), "returncode": process.returncode,
                     "stage_seconds": stage_seconds(output), "train_samples_per_s": training_rates(project / "cache")}
            if process.returncode != 0:
                entry["error"] = ("timed out (time budget)" if process.returncode < 0 else "failed")
                entry["output"] = output[-3000:]
            else:
                entry.update(e2e_thresholds(workflow, collect_metrics(project / "cache")))
            out[workflow] = entry
    return out


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def collect_metrics(cache: Path) -> list[dict]:
    """Every stage's own metrics.json in the cache (as the e2e tests read them)."""
    return [json.loads(p.read_text()) for p in cache.rglob("metrics.json") if p.parent.name != "_vlflow"]


def e2e_thresholds(workflow: str, metrics: list[dict]) -> dict:
    """The learning thresholds of the e2e tests, checked on the GPU run's metrics."""
    if workflow == "tiny_vilt":
        retrieval = next(m["all"] for m in metrics if isinstance(m.get("all"), dict) and "chance_r1" in m["all"])
        vqa = next(m for m in metrics if "vqa_score" in m)
        checks = {"ir_r1 >= 5x chance": retrieval["ir_r1"] >= 5 * retrieval["chance_r1"],
                  "tr_r1 >= 5x chance": retrieval["tr_r1"] >= 5 * retrieval["chance_r1"],
                  "vqa >= 2.5x best constant": vqa["vqa_score"] >= 2.5 * vqa["best_constant_score"]}
        figures = {"ir_r1": retrieval["ir_r1"], "tr_r1": retrieval["tr_r1"], "vqa_score": vqa["vqa_score"]}
    else:
        grounding = next(m for m in metrics if "anybox_oracle_recall@1" in m)
        checks = {"recall@1 >= 0.3": grounding["anybox_oracle_recall@1"] >= 0.3,
                  "recall@1 >= 3x random box":
                      grounding["anybox_oracle_recall@1"] >= 3 * grounding["random_box_recall@1"]}
        figures = {"anybox_oracle_recall@1": grounding["anybox_oracle_recall@1"]}
    return {"figures": figures, "checks": checks, "passed": all(checks.values())}


# ---------------------------------------------------------------------------------------------------------------
# b. ViLT-B/32 train step: plain loop vs the stage path under each plugin

def vilt_setup(args):
    from vlflow.stages.vilt.model import ViltPretrainingModel, build_config
    from vlflow.stages.vilt.spec import ViltPretrainParams

    if args.cpu_dry_run:
        params = ViltPretrainParams(hidden_size=64, num_layers=2, num_heads=4, patch_size=16, image_size=64,
                                    max_image_size=64, max_text_len=16, dropout=0.0)
        vocab = 1000
    else:
        params = ViltPretrainParams(dropout=0.0)  # ViLT-B/32 at 384x384, 40 tokens
        vocab = 30522
    torch.manual_seed(0)
    return params, vocab, ViltPretrainingModel(build_config(params, vocab, pad_token_id=0))


def vilt_step_fn(model, optimizer, batches, precision: str, booster=None):
    """One MLM+ITM train step: plain (autocast to `precision`, loss.backward) or through `booster`."""
    from vlflow.stages.common.device import autocast

    mlm, itm = batches
    device = mlm["input_ids"].device

    def step():
        if booster is None:
            with autocast(precision, device):
                loss = model(mlm_batch=mlm, itm_batch=itm)["loss"]
            loss.backward()
        else:
            loss = model(mlm_batch=mlm, itm_batch=itm)["loss"]
            booster.backward(loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()

    return step


def largest_batch(args, params, vocab, template, device, precision) -> int:
    """The largest per-device batch (from a short list, largest first) at which the plain loop runs one step."""
    import vilt_step as bench
    from vlflow.stages.vilt.train import decay_groups

    candidates = [4] if args.cpu_dry_run else [512, 384, 256, 192, 128, 96, 64, 32, 16]
    for batch in candidates:
        model = copy.deepcopy(template).to(device)
        optimizer = torch.optim.AdamW(decay_groups(model, 0.01, 1e-4), lr=1e-4)
        try:
            batches = bench.make_batch(params, vocab, batch, device, torch.Generator().manual_seed(0))
            vilt_step_fn(model, optimizer, batches, precision)()
            sync()
            fits = True
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            fits = False
        del model, optimizer
        reset_memory()
        if fits:
            return batch
    raise RuntimeError(f"the plain loop fits none of the batch sizes {candidates}")


def part_vilt_step(args) -> dict:
    import vilt_step as bench
    from vlflow.stages.common.device import stage_device
    from vlflow.stages.common.fit import adamw_choice
    from vlflow.stages.vilt.train import decay_groups

    from vlflow.launch.booster import make_booster
    from vlflow.stage import LaunchSpec

    device = stage_device()
    params, vocab, template = vilt_setup(args)
    plain_precision = "fp32" if args.cpu_dry_run else "bf16"
    batch = largest_batch(args, params, vocab, template, device, plain_precision)
    batches = bench.make_batch(params, vocab, batch, device, torch.Generator().manual_seed(0))
    steps = 2 if args.cpu_dry_run else 5
    out: dict = {"model": "toy ViLT (hidden 64, 2 layers, 64x64)" if args.cpu_dry_run
                 else "ViLT-B/32, 384x384, 40 tokens", "batch": batch, "paths": {}}

    # FLOPs of one step (the same model and batch for every path)
    model = copy.deepcopy(template).to(device)
    optimizer = torch.optim.AdamW(decay_groups(model, 0.01, 1e-4), lr=1e-4)
    out["flops_per_sample"] = flops_per_sample(vilt_step_fn(model, optimizer, batches, plain_precision), batch)
    out["flops_counted_by"] = ("torch.utils.flop_counter.FlopCounterMode over one forward + backward of the MLM+ITM "
                               "step (two backbone passes): matmuls, convolutions, attention; element-wise ops and "
                               "the optimizer not counted")
    del model, optimizer
    reset_memory()

    paths = [("plain", None, plain_precision)]
    if args.cpu_dry_run:
        paths.append(("torch_ddp", "torch_ddp", "fp32"))
        out["note"] = "CPU: only torch_ddp fp32 (low_level_zero and gemini need CUDA); no peak memory or MFU on CPU"
    else:
        paths += [("torch_ddp", "torch_ddp", "fp16"), ("low_level_zero", "low_level_zero", "bf16"),
                  ("gemini", "gemini", "bf16")]
        out["note"] = ("torch_ddp at fp16 (Colossal-AI 0.5.0's Booster has no bf16 for torch_ddp); each path gets "
                       "the AdamW the training stages give its plugin: torch.optim.AdamW, HybridAdam under gemini "
                       "(Colossal-AI builds its kernels on first use: that time is in the gemini part's seconds)")
    for name, plugin, precision in paths:
        if time.time() > args.deadline:
            out["paths"][name] = {"skipped": "time budget spent"}
            continue
        entry: dict = {"plugin": plugin or "none (plain PyTorch)", "precision": precision, "batch": batch}
        model = optimizer = booster = None
        try:
            reset_memory()
            model = copy.deepcopy(template).to(device)
            optimizer_class, extra = adamw_choice(plugin)  # as the training stages choose it (make_adamw)
            optimizer = optimizer_class(decay_groups(model, 0.01, 1e-4), lr=1e-4, **extra)
            entry["optimizer"] = optimizer_class.__name__
            if plugin is not None:
                booster, _ = make_booster(LaunchSpec(plugin=plugin, precision=precision))
                model, optimizer, *_ = booster.boost(model, optimizer)
            model.train()
            path_batches, samples_per_s = batches, None
            while samples_per_s is None:  # a path that does not fit the plain loop's batch runs at half of it
                try:
                    step = vilt_step_fn(model, optimizer, path_batches, precision, booster)
                    samples_per_s = rate(step, steps, entry["batch"])
                except RuntimeError as exc:
                    if not is_oom(exc) or entry["batch"] <= 2:
                        raise
                    entry["oom_at"] = entry.get("oom_at", []) + [entry["batch"]]
                    entry["batch"] //= 2
                    optimizer.zero_grad()
                    reset_memory()
                    path_batches = bench.make_batch(params, vocab, entry["batch"], device,
                                                    torch.Generator().manual_seed(0))
            entry["samples_per_s"] = samples_per_s
            entry["peak_memory_bytes"] = peak_memory()
            if device.type == "cuda":
                entry["mfu"] = samples_per_s * out["flops_per_sample"] / H200_BF16_PEAK_FLOPS
            else:
                entry["achieved_tflops"] = samples_per_s * out["flops_per_sample"] / 1e12
        except Exception as exc:  # reported, the other paths still run
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            entry["traceback"] = traceback.format_exc()[-3000:]
        finally:
            model = optimizer = booster = None
            reset_memory()
        out["paths"][name] = entry
    plain = out["paths"].get("plain", {})
    for name, entry in out["paths"].items():
        if name != "plain" and "samples_per_s" in entry and "samples_per_s" in plain \
                and entry["batch"] == plain["batch"]:  # compared at equal batch only
            entry["speedup_vs_plain"] = entry["samples_per_s"] / plain["samples_per_s"]
            if entry.get("peak_memory_bytes") and plain.get("peak_memory_bytes"):
                entry["memory_vs_plain"] = entry["peak_memory_bytes"] / plain["peak_memory_bytes"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# c. UniTAB step: plain fp32 vs bf16 autocast + fused AdamW

def part_unitab_step(args) -> dict:
    from vlflow.stages.common.device import autocast, stage_device
    from vlflow.stages.unitab.model import UniTAB, UniTABConfig, sequence_loss

    device = stage_device()
    if args.cpu_dry_run:
        config = UniTABConfig(text_vocab=500, backbone="resnet10t", d_model=32, enc_layers=1, dec_layers=1, nheads=2,
                              dim_feedforward=64, num_queries=20, max_decoding_step=40,
                              text_encoder_config=dict(vocab_size=500, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64,
                                                       max_position_embeddings=64))
        batch, image, text_len, seq_len, steps = 2, 64, 12, 24, 2
    else:  # UniTAB's Flickr30k model: ResNet-101 + RoBERTa-base sized encoder (random init: no hub here)
        config = UniTABConfig(text_vocab=50265, backbone="resnet101",
                              text_encoder_config=dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                                                       num_attention_heads=12, intermediate_size=3072,
                                                       max_position_embeddings=514, pad_token_id=1))
        batch, image, text_len, seq_len, steps = 16, 512, 32, 96, 5
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(batch, 3, image, image, generator=generator),
              torch.zeros(batch, image, image, dtype=torch.bool),
              torch.randint(3, config.text_vocab, (batch, text_len), generator=generator),
              torch.ones(batch, text_len, dtype=torch.long),
              torch.randint(3, config.layout.size, (batch, seq_len), generator=generator))
    images, image_mask, text_ids, text_mask, tokens = (t.to(device) for t in inputs)
    torch.manual_seed(0)
    template = UniTAB(config)
    out: dict = {"batch": batch, "paths": {},
                 "fused": "bf16 autocast + torch.optim.AdamW(fused=True) (CUDA) ; attention: nn.Transformer's SDPA "
                          "(already the default); Colossal-AI FusedAdam/HybridAdam need compiled kernels: not used"}
    variants = [("plain", "fp32", False), ("fused", "fp32" if args.cpu_dry_run else "bf16", device.type == "cuda")]
    for name, precision, fused in variants:
        if time.time() > args.deadline:
            out["paths"][name] = {"skipped": "time budget spent"}
            continue
        entry: dict = {"precision": precision, "fused_adamw": fused}
        try:
            reset_memory()
            model = copy.deepcopy(template).to(device).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                          **({"fused": True} if fused else {}))

            def step():
                with autocast(precision, device):
                    logits = model(images, image_mask, text_ids, text_mask, tokens[:, :-1])
                    loss = sequence_loss(logits.float(), tokens[:, 1:])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                optimizer.step()
                optimizer.zero_grad()

            entry["samples_per_s"] = rate(step, steps, batch)
            entry["peak_memory_bytes"] = peak_memory()
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            entry["traceback"] = traceback.format_exc()[-3000:]
        finally:
            model = optimizer = None
            reset_memory()
        out["paths"][name] = entry
    plain, fused = out["paths"].get("plain", {}), out["paths"].get("fused", {})
    if "samples_per_s" in plain and "samples_per_s" in fused:
        fused["speedup_vs_plain"] = fused["samples_per_s"] / plain["samples_per_s"]
        if plain.get("peak_memory_bytes") and fused.get("peak_memory_bytes"):
            fused["memory_vs_plain"] = fused["peak_memory_bytes"] / plain["peak_memory_bytes"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# d. retrieval evaluation throughput

@torch.no_grad()
def per_image_scores(vilt, score_head, images, texts: dict, text_batch_size: int, device, precision) -> torch.Tensor:
    """The old path (before the batched one): one image per forward against a text batch, transformers'
    visual_embed; kept here as the baseline."""
    from vlflow.stages.common.device import autocast
    from vlflow.stages.vilt.model import embed_images, encode

    num_texts = len(texts["input_ids"])
    scores = torch.empty(num_texts, len(images))
    for i, image in enumerate(images):
        pixel_values = image[None].to(device)
        pixel_mask = torch.ones(1, *pixel_values.shape[-2:], dtype=torch.long, device=device)
        with autocast(precision, device):
            image_embeds, image_mask = embed_images(vilt, pixel_values, pixel_mask, -1)
            for start in range(0, num_texts, text_batch_size):
                ids = texts["input_ids"][start:start + text_batch_size].to(device)
                mask = texts["attention_mask"][start:start + text_batch_size].to(device)
                n = len(ids)
                enc = encode(vilt, ids, mask, image_embeds.expand(n, -1, -1), image_mask.expand(n, -1))
                scores[start:start + n, i] = score_head(enc.pooled).float().cpu()
    return scores


def part_eval(args) -> dict:
    from vlflow.stages.common.device import stage_device
    from vlflow.stages.vilt.evaluate import image_batches, score_all_pairs, text_batches

    device = stage_device()
    params, vocab, model = vilt_setup(args)
    model = model.eval().to(device)
    precision = "fp32" if device.type == "cpu" else "bf16"
    if args.cpu_dry_run:
        num_images, num_texts, image_batch, text_batch = 8, 64, 4, 32
    else:
        num_images, num_texts, image_batch, text_batch = 32, 1024, 8, 256
    generator = torch.Generator().manual_seed(0)
    size = params.image_size
    images = [torch.randn(3, size, size, generator=generator) for _ in range(num_images)]
    texts = {"input_ids": torch.randint(5, vocab, (num_texts, params.max_text_len), generator=generator),
             "attention_mask": torch.ones(num_texts, params.max_text_len, dtype=torch.long)}
    head = lambda pooled: model.itm_score(pooled)[:, 1]  # noqa: E731
    out: dict = {"images": num_images, "texts": num_texts, "precision": precision,
                 "image_batch_size": image_batch, "text_batch_size": text_batch}

    def batched():
        batches = image_batches(lambda i: images[i], list(range(num_images)), image_batch, params.patch_size)
        return score_all_pairs(model.vilt, head, batches, text_batches(texts, text_batch, device), num_images,
                               device, precision)

    def per_image():
        return per_image_scores(model.vilt, head, images, texts, text_batch, device, precision)

    pairs = num_images * num_texts
    rounds: dict[str, list[float]] = {"batched": [], "per_image_baseline": []}
    paths = [("batched", batched), ("per_image_baseline", per_image)]
    for round_index in range(args.eval_rounds):  # alternating (and which goes first), median: machine noise hits both
        for name, run in paths if round_index % 2 == 0 else paths[::-1]:
            if f"{name}_error" in out:
                continue
            try:
                if round_index == 0:
                    run()  # warm-up
                sync()
                started = time.perf_counter()
                run()
                sync()
                rounds[name].append(pairs / (time.perf_counter() - started))
            except Exception as exc:
                out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    for name, rates in rounds.items():
        if rates:
            out[f"{name}_pairs_per_s"] = statistics.median(rates)
            out[f"{name}_rounds"] = rates
    if "batched_pairs_per_s" in out and "per_image_baseline_pairs_per_s" in out:
        out["speedup_vs_per_image"] = out["batched_pairs_per_s"] / out["per_image_baseline_pairs_per_s"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# e. the input pipeline: does the real loader keep the ViLT-B/32 step fed?

def part_loader(args) -> dict:
    """The ViLT-B/32 MLM+ITM step (plain loop, bf16 autocast) fed by the real input pipeline (arrows of 512-px JPEGs,
    CaptionPairs + PairCollator with uint8 pixels, DataLoader workers, pinned memory, the task's host-side prepare,
    one move to the device, normalisation there) vs the same step on one prepared batch already on the device.
    A ratio near 1 means the loader is not the bottleneck with that many workers."""
    import dataloader as loader_bench  # benchmarks/dataloader.py (arrows as its benchmark makes them)
    from torch.utils.data import DataLoader
    from vlflow.stages.common.device import autocast, stage_device
    from vlflow.stages.common.fit import to_device
    from vlflow.stages.common.training import ResumableSampler
    from vlflow.stages.data.reader import CaptionArrowDataset
    from vlflow.stages.text.tokenizer import train_wordpiece
    from vlflow.stages.vilt.data import CaptionPairs, PairCollator, image_dataset
    from vlflow.stages.vilt.model import ViltPretrainingModel, build_config
    from vlflow.stages.vilt.spec import ViltPretrainParams
    from vlflow.stages.vilt.train import decay_groups, pretrain_task

    device = stage_device()
    if args.cpu_dry_run:
        params = ViltPretrainParams(hidden_size=64, num_layers=2, num_heads=4, patch_size=16, image_size=64,
                                    max_image_size=96, max_text_len=16, dropout=0.0)
        images, image_px, batch, workers, steps, precision = 24, 96, 4, 2, 2, "fp32"
    else:
        params = ViltPretrainParams(dropout=0.0)  # ViLT-B/32: 384 px (longer <= 639), 40 tokens, 200 patches
        images, image_px, batch, workers, steps, precision = 1000, 512, 64, min(8, os.cpu_count() or 1), 20, "bf16"
    out: dict = {"batch": batch, "workers": workers, "precision": precision, "timed_steps": steps,
                 "images": f"{images} synthetic COCO-layout JPEGs, longer side {image_px} px"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-loader-") as tmp:
        started = time.perf_counter()
        arrows = loader_bench.make_arrows(Path(tmp), images, image_px)
        captions = CaptionArrowDataset([arrows / f"coco_caption_karpathy_{s}.arrow" for s in ("train", "restval")])
        tokenizer = train_wordpiece((c for i in range(len(captions)) for c in captions.captions(i)),
                                    vocab_size=400, lowercase=True, min_frequency=1)
        out["arrows_seconds"] = time.perf_counter() - started
        pairs = CaptionPairs(image_dataset(arrows, "train", params.image_size, params.max_image_size))
        vocab = len(tokenizer) if args.cpu_dry_run else max(len(tokenizer), 30522)  # ViLT's MLM head size on GPU
        torch.manual_seed(0)
        model = ViltPretrainingModel(build_config(params, vocab, tokenizer.pad_token_id)).to(device).train()
        optimizer = torch.optim.AdamW(decay_groups(model, 0.01, 1e-4), lr=1e-4)
        task = pretrain_task(tokenizer, ["mlm", "itm"], 0.15, True, 0.0)

        def step(device_batch) -> None:
            with autocast(precision, device):
                loss = task.losses(model, device_batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        loader = DataLoader(pairs, batch_sampler=ResumableSampler(len(pairs), batch, seed=0),
                            collate_fn=PairCollator(tokenizer, params.max_text_len, normalize=False),
                            num_workers=workers, pin_memory=device.type == "cuda")
        batches = iter(loader)

        def next_device_batch(index: int):
            prepared = task.prepare(next(batches), torch.Generator().manual_seed(index))
            return to_device(prepared, device)

        fixed = next_device_batch(0)
        step(next_device_batch(1))  # warm-up: workers started, kernels chosen
        sync()
        started = time.perf_counter()
        for index in range(steps):
            step(next_device_batch(index + 2))
        sync()
        out["real_loader_samples_per_s"] = steps * batch / (time.perf_counter() - started)
        step(fixed)
        sync()
        started = time.perf_counter()
        for _ in range(steps):
            step(fixed)
        sync()
        out["in_memory_batch_samples_per_s"] = steps * batch / (time.perf_counter() - started)
        started = time.perf_counter()
        for index in range(steps):  # the loader alone (+ prepare + copy to the device): its ceiling
            next_device_batch(index + 100)
        sync()
        out["loader_alone_samples_per_s"] = steps * batch / (time.perf_counter() - started)
        batches = loader = None  # stop the workers before the next part
    out["real_vs_in_memory"] = out["real_loader_samples_per_s"] / out["in_memory_batch_samples_per_s"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# report

def goal_line(label: str, value, goal: float, higher: bool = True) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return f"| {label} | n/a | {'>=' if higher else '<='} {goal} | - |"
    met = value >= goal if higher else value <= goal
    return f"| {label} | {value:.3f} | {'>=' if higher else '<='} {goal} | {'met' if met else 'NOT met'} |"


def markdown(report: dict) -> str:
    lines = [f"# gpu_check ({'CPU dry run' if report['cpu_dry_run'] else report['device']})", "",
             f"{report['date']} · commit {report['commit']} · {report['device']} · torch {report['torch']} · "
             f"{report['seconds']:.0f} s", ""]
    parts = report["parts"]
    lines += ["## Goals", "", "| figure | measured | goal | |", "| --- | --- | --- | --- |"]
    vilt = parts.get("vilt_step", {})
    for name, entry in (vilt.get("paths") or {}).items():
        if name == "plain":
            continue
        lines.append(goal_line(f"ViLT {name} samples/s vs plain", entry.get("speedup_vs_plain"),
                               GOALS["stage_speedup"]))
        lines.append(goal_line(f"ViLT {name} peak memory vs plain", entry.get("memory_vs_plain"),
                               GOALS["stage_memory_ratio"], higher=False))
        lines.append(goal_line(f"ViLT {name} MFU", entry.get("mfu"), GOALS["mfu"]))
    lines.append(goal_line("retrieval pairs/s", parts.get("eval", {}).get("batched_pairs_per_s"),
                           GOALS["eval_pairs_per_s"]))
    lines.append(goal_line("ViLT step fed by the real loader vs an in-memory batch",
                           parts.get("loader", {}).get("real_vs_in_memory"), GOALS["loader_vs_in_memory"]))
    for name, part in parts.items():
        lines += ["", f"## {name}", "", "```json", json.dumps(part, indent=1, default=str)[:6000], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="report directory ($OUT)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on the CPU, the same code paths")
    parser.add_argument("--budget-s", type=float, default=450.0, help="total time budget; later parts are skipped")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--eval-rounds", type=int, default=3, help="alternating timed rounds of each scoring path")
    parser.add_argument("--e2e-workflows", default="tiny_vilt,tiny_unitab", help="the e2e part's workflows")
    args = parser.parse_args(argv)
    parts = args.part_list = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    started = time.time()
    args.deadline = started + args.budget_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu-dry-run", file=sys.stderr)
        return 2
    if args.cpu_dry_run:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    import colossalai
    from colossalai.accelerator import set_accelerator

    from vlflow.launch.command import free_port

    if args.cpu_dry_run:
        set_accelerator("cpu")
    colossalai.launch(rank=0, world_size=1, local_rank=0, host="127.0.0.1", port=free_port(),
                      backend="gloo" if args.cpu_dry_run else "nccl", seed=0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    report = {"cpu_dry_run": args.cpu_dry_run, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime()),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
              "torch": torch.__version__, "goals": GOALS, "parts": {}}
    functions = {"e2e": part_e2e, "vilt_step": part_vilt_step, "unitab_step": part_unitab_step, "eval": part_eval,
                 "loader": part_loader}
    for name in parts:
        part_started = time.time()
        if part_started > args.deadline:
            report["parts"][name] = {"skipped": "time budget spent"}
            continue
        try:
            report["parts"][name] = functions[name](args)
        except Exception as exc:  # one part failing does not stop the others
            report["parts"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                     "traceback": traceback.format_exc()[-3000:]}
        report["parts"][name]["seconds"] = round(time.time() - part_started, 1)
        print(f"gpu_check: {name} done in {report['parts'][name]['seconds']} s", flush=True)
        reset_memory()
    report["seconds"] = time.time() - started
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
