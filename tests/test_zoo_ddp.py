"""DistributedDataParallel through torchrun: two CPU processes (gloo) train the zoo DiT on shards
of the same global batch; their weights stay identical and match one process on that batch."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from genfast.zoo import flow_job, train

CFG = {**flow_job.DEFAULTS, "train_steps": 4, "batch": 8, "dit": dict(hidden_size=32, depth=1, num_heads=2, patch_size=4)}

SCRIPT = textwrap.dedent(f"""
    import os, sys, torch
    from genfast.zoo import flow_job, train
    cfg = {CFG!r}
    model, hist, _ = flow_job.train_model(cfg, progress=False)
    rank = train.distributed()[0]
    torch.save({{"state": model.state_dict(), "loss": hist["loss"]}}, os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
""")


def test_two_cpu_ranks_match_one_process(tmp_path, monkeypatch):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    # CPU ranks also where a GPU is visible (the GPUs hidden), compared with one process on the CPU
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    monkeypatch.setattr(train, "distributed", lambda: (0, 1, torch.device("cpu")))
    single, hist, _ = flow_job.train_model(CFG, progress=False)
    for k, v in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k  # the ranks agree exactly
        torch.testing.assert_close(ranks[0]["state"][k], v, atol=1e-5, rtol=1e-4)  # and with one process
    assert ranks[0]["loss"] == ranks[1]["loss"]
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(hist["loss"]), atol=1e-5, rtol=1e-5)


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="local rank 1 but this machine shows 1 GPU"):
        train.distributed()
