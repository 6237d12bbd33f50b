"""Install proof: the pinned ML stack imports, and Colossal-AI trains, saves and loads in a 2-process CPU launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from vlflow.launch import free_port


def test_colossalai_booster_and_plugins_import():
    import colossalai
    from colossalai.booster import Booster
    from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    assert callable(colossalai.launch_from_torch)
    assert all(isinstance(cls, type) for cls in (Booster, GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin,
                                                  TorchDDPPlugin))


def test_transformers_vilt_and_roberta_build_and_run_offline():
    from transformers import RobertaConfig, RobertaModel, ViltConfig, ViltModel

    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    vilt = ViltModel(ViltConfig(**tiny, image_size=64, patch_size=32, max_image_length=-1)).eval()
    with torch.no_grad():
        out = vilt(input_ids=torch.tensor([[101, 2000, 102]]), pixel_values=torch.rand(1, 3, 64, 64))
    assert out.last_hidden_state.shape[-1] == 32
    roberta = RobertaModel(RobertaConfig(**tiny, vocab_size=100)).eval()
    with torch.no_grad():
        assert roberta(input_ids=torch.tensor([[0, 5, 2]])).last_hidden_state.shape == (1, 3, 32)


def test_timm_resnet_create_model_without_weights():
    import timm

    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        assert backbone(torch.rand(1, 3, 64, 64)).shape == (1, 512)


DDP_SCRIPT = textwrap.dedent('''
    import json, sys
    import colossalai, torch
    import torch.distributed as dist
    from colossalai.booster import Booster
    from colossalai.booster.plugin import TorchDDPPlugin

    out = sys.argv[1]
    colossalai.launch_from_torch(backend="gloo", seed=0)
    rank = dist.get_rank()
    booster = Booster(plugin=TorchDDPPlugin())
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer, *_ = booster.boost(model, optimizer)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))
    for _ in range(3):
        loss = (model(x) - 1).pow(2).mean()
        booster.backward(loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()
    booster.save_model(model, out + "/model.pt")
    booster.save_optimizer(optimizer, out + "/optimizer.pt")
    dist.barrier()
    fresh = Booster(plugin=TorchDDPPlugin())
    new_model = torch.nn.Linear(4, 1)
    reloaded, reloaded_optimizer, *_ = fresh.boost(new_model, torch.optim.SGD(new_model.parameters(), lr=0.1,
                                                                                momentum=0.9))
    fresh.load_model(reloaded, out + "/model.pt")
    fresh.load_optimizer(reloaded_optimizer, out + "/optimizer.pt")
    trained = model.unwrap().state_dict()
    same = all(torch.equal(trained[k], v) for k, v in reloaded.unwrap().state_dict().items())
    def momentum(opt, net):
        return [opt.unwrap().state[p]["momentum_buffer"] for p in net.unwrap().parameters()]
    same = same and all(torch.equal(a, b) for a, b in zip(momentum(optimizer, model),
                                                          momentum(reloaded_optimizer, reloaded)))
    gathered = [None, None]
    dist.all_gather_object(gathered, [p.tolist() for p in model.unwrap().parameters()])
    if rank == 0:
        json.dump({"world_size": dist.get_world_size(), "reloaded_equal": same,
                   "ranks_agree": gathered[0] == gathered[1]}, open(out + "/result.json", "w"))
    dist.destroy_process_group()
''')


def test_colossalai_ddp_two_process_train_save_load_on_cpu(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"world_size": 2, "reloaded_equal": True, "ranks_agree": True}
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "optimizer.pt").is_file()
