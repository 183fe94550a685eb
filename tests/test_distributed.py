"""torchrun helpers, and the trainer under 2 CPU processes (gloo): DDP and FSDP2 give the
same per-step losses as one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefcli import distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from train_script import run  # noqa: E402

SCRIPT = Path(__file__).parent / "train_script.py"


def torchrun(run_dir, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", SCRIPT, run_dir, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, step):
    return load_file(Path(run_dir) / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


# ---- single-process behaviour of the helpers ------------------------------------------------


def test_helpers_in_a_single_process():
    assert not dist.init_distributed()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.all_reduce_mean(2.5) == 2.5
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce_mean(t), t)
    assert dist.all_gather_bytes(b"abc") == [b"abc"]
    dist.barrier()


def test_batch_indices_shard_by_rank_like_more_accumulation(monkeypatch):
    one = {(s, m): dist.batch_indices(s, m, 3, 4, 10, seed=1) for s in range(4) for m in range(4)}
    monkeypatch.setenv("WORLD_SIZE", "2")
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        for s in range(4):
            for m in range(2):
                # rank r's micro-batch m is the single process's micro-batch 2m + r
                assert dist.batch_indices(s, m, 3, 2, 10, seed=1) == one[(s, 2 * m + r)]
    # Each epoch of 10 examples is a permutation: positions 0..9, 10..19 cover everything once.
    stream = [i for s in range(4) for m in range(4) for i in one[(s, m)]]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new order each epoch
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert dist.batch_indices(1, 0, 4, 1, 6, shuffle=False) == [4, 5, 0, 1]


# ---- two processes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, grad_accum 4 x batch 4: the reference for 2 ranks x grad_accum 2 x batch 4."""
    run_dir = tmp_path_factory.mktemp("single")
    run(run_dir, steps=8, batch_size=4, grad_accum=4, save_every=4)
    return run_dir


def test_ddp_two_ranks_match_one_process(single, tmp_path):
    torchrun(tmp_path, "--steps", "8", "--grad-accum", "2", "--save-every", "4")
    assert len(losses(tmp_path)) == 8
    assert losses(tmp_path) == pytest.approx(losses(single), abs=1e-5, rel=0)
    a, b = weights(single, 8), weights(tmp_path, 8)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    rng = load_file(tmp_path / "checkpoints" / "step-000008" / "rng.safetensors")
    assert set(rng) == {"cpu.rank0", "cpu.rank1"} and not torch.equal(rng["cpu.rank0"], rng["cpu.rank1"])


def test_ddp_resume_is_exact_with_per_rank_rng(tmp_path):
    # Dropout draws from each rank's own RNG; resuming restores each rank's state.
    args = ["--steps", "8", "--grad-accum", "2", "--save-every", "4", "--dropout", "0.2"]
    torchrun(tmp_path, *args)
    final = weights(tmp_path, 8)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000008")
    torchrun(tmp_path, *args, "--resume")
    again = weights(tmp_path, 8)
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_fsdp_two_ranks_match_one_process_and_resume(single, tmp_path):
    torchrun(tmp_path, "--steps", "8", "--grad-accum", "2", "--save-every", "4", "--fsdp")
    assert losses(tmp_path) == pytest.approx(losses(single), abs=1e-5, rel=0)
    # Checkpoints gather full tensors: the same files, names and shapes as a single process.
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(single / "checkpoints" / "step-000008" / name)
        b = load_file(tmp_path / "checkpoints" / "step-000008" / name)
        assert a.keys() == b.keys()
        assert all(a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    # Resume from step 4 under FSDP and land on the same step-8 weights.
    final = weights(tmp_path, 8)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000008")
    torchrun(tmp_path, "--steps", "8", "--grad-accum", "2", "--save-every", "4", "--fsdp", "--resume")
    again = weights(tmp_path, 8)
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert losses(tmp_path) == pytest.approx(losses(single), abs=1e-5, rel=0)
