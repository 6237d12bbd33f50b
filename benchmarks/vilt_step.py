"""ViLT pretraining step throughput: our stage path (ViltPretrainingModel + heads, Colossal-AI Booster from the
launch settings, booster.backward) against a plain PyTorch loop on the same transformers model, in one process.

    python benchmarks/vilt_step.py            # ViLT-B/32 (hidden 768, 12 layers, 384x384 images, 40 tokens)
    python benchmarks/vilt_step.py --small    # hidden 128, 2 layers, 64x64 images (quick, CPU)

Both paths run the same MLM + ITM step (two backbone passes, as ViLT) on the same fixed batch; rounds alternate
between the paths (and which goes first) so that machine noise hits both. Prints samples/s of each and the ratio
(goal >= 0.97).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import colossalai
import torch
from colossalai.accelerator import get_accelerator, set_accelerator
from vlflow.stages.vilt.model import ViltPretrainingModel, build_config
from vlflow.stages.vilt.spec import ViltPretrainParams
from vlflow.stages.vilt.train import decay_groups

from vlflow.launch.booster import make_booster
from vlflow.launch.command import free_port
from vlflow.stage import LaunchSpec


def make_batch(params, vocab_size: int, batch_size: int, device, generator) -> tuple[dict, dict]:
    size = params.image_size
    text_len = params.max_text_len
    input_ids = torch.randint(5, vocab_size, (batch_size, text_len), generator=generator)
    common = {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "pixel_mask": torch.ones(batch_size, size, size, dtype=torch.long),
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch_size, text_len, dtype=torch.long),
    }
    labels = torch.where(torch.rand(batch_size, text_len, generator=generator) < 0.15, input_ids, -100)
    itm_labels = (torch.arange(batch_size) % 2).long()
    mlm = {k: v.to(device) for k, v in {**common, "labels": labels}.items()}
    itm = {k: v.to(device) for k, v in {**common, "itm_labels": itm_labels}.items()}
    return mlm, itm


def timed_steps(step, steps: int, batch_size: int) -> float:
    """samples/s over `steps` calls of step()."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model and 64x64 images")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 2 on CPU, 32 on GPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per path (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plugin", default="torch_ddp")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    if not cuda:
        set_accelerator("cpu")
    colossalai.launch(rank=0, world_size=1, local_rank=0, host="127.0.0.1", port=free_port(),
                      backend="nccl" if cuda else "gloo", seed=0)
    device = get_accelerator().get_current_device()
    if args.small:
        params = ViltPretrainParams(hidden_size=128, num_layers=2, num_heads=4, patch_size=16, image_size=64,
                                    max_image_size=64, max_text_len=24, dropout=0.0)
    else:
        params = ViltPretrainParams()  # ViLT-B/32 defaults
    batch_size = args.batch or (32 if cuda else 2)
    vocab_size = 30522
    config = build_config(params, vocab_size, pad_token_id=0)
    mlm, itm = make_batch(params, vocab_size, batch_size, device, torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    plain_model = ViltPretrainingModel(config).to(device)
    stage_model = copy.deepcopy(plain_model)

    plain_optimizer = torch.optim.AdamW(decay_groups(plain_model, 0.01, 1e-4), lr=1e-4, betas=(0.9, 0.98))

    def plain_step():
        loss = plain_model(mlm_batch=mlm, itm_batch=itm)["loss"]
        loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad()

    booster, _ = make_booster(LaunchSpec(plugin=args.plugin, precision=args.precision))
    optimizer = torch.optim.AdamW(decay_groups(stage_model, 0.01, 1e-4), lr=1e-4, betas=(0.9, 0.98))
    boosted, optimizer, *_ = booster.boost(stage_model, optimizer)

    def stage_step():
        loss = boosted(mlm_batch=mlm, itm_batch=itm)["loss"]
        booster.backward(loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()

    plain_model.train()
    boosted.train()
    plain_step(), stage_step()  # warm-up (allocations, DDP buckets)
    plain, stage = [], []
    for round_index in range(args.rounds):
        # which path goes first alternates too, so that a machine warming up or slowing down favours neither
        order = [(plain, plain_step), (stage, stage_step)]
        for rates, step in order if round_index % 2 == 0 else order[::-1]:
            rates.append(timed_steps(step, args.steps, batch_size))
    plain_rate, stage_rate = statistics.median(plain), statistics.median(stage)
    size = "small" if args.small else "ViLT-B/32"
    print(f"{size}, batch {batch_size}, {device}, {args.plugin}/{args.precision}, {args.rounds}x{args.steps} steps")
    print(f"plain PyTorch loop : {plain_rate:8.2f} samples/s  (rounds {', '.join(f'{r:.2f}' for r in plain)})")
    print(f"vlflow stage path  : {stage_rate:8.2f} samples/s  (rounds {', '.join(f'{r:.2f}' for r in stage)})")
    print(f"ratio stage/plain  : {stage_rate / plain_rate:.3f}")


if __name__ == "__main__":
    main()
