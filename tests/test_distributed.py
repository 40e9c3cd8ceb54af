"""Training on torch.distributed (gloo, 2 CPU processes): DDP and FSDP2 give the loss curve of
one process with the same global batch; `train` runs under torchrun."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from truthgpt_kernels.config import TransformerConfig
from truthgpt_kernels.train import train

STEPS, BATCH = 6, 8


def _config():
    return TransformerConfig.load(preset="tiny", env=False)


def _worker(rank, world, init, parallel, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        _, result = train(_config(), steps=STEPS, batch_size=BATCH, progress=False, evaluate=False,
                          parallel=parallel)
        if rank == 0:
            torch.save(result.losses, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_training_matches_one(parallel, tmp_path):
    torch.set_num_threads(1)
    _, single = train(_config(), steps=STEPS, batch_size=BATCH, progress=False, evaluate=False)
    out = tmp_path / "losses.pt"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, parallel, str(out)), nprocs=2, join=True)
    losses = torch.load(out)
    assert len(losses) == STEPS
    # same global batch, gradients averaged over ranks: the same curve up to summation order
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single.losses), rtol=2e-4, atol=2e-4)
    assert losses[-1] < losses[0]


def test_train_command_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "truthgpt_kernels", "train", "--steps", "3", "--batch-size", "4", "--no-progress",
           "--out", str(tmp_path / "ckpt")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "loss" in proc.stdout and (tmp_path / "ckpt").exists()
