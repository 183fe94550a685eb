"""torchrun helpers: join the process group, ask who we are, average across ranks,
and pick each rank's share of a batch.

Every function works in a plain single process too (rank 0 of 1), so callers never
branch on "am I distributed?".

    torchrun --nproc_per_node 2 -m prefcli pretrain ...
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.distributed as dist


def init_distributed(device: torch.device | str | None = None) -> bool:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK).

    A no-op in a single process, or when already joined. `device` is where training
    runs: CUDA gets NCCL for GPU tensors plus gloo for small CPU ones, and this rank's
    GPU (LOCAL_RANK) becomes the current device; CPU gets gloo alone. None means CUDA
    when every local rank has a GPU of its own. Returns True when running distributed.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        use_cuda = torch.cuda.is_available() and local_ranks <= torch.cuda.device_count()
    else:
        use_cuda = torch.device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank())
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return True


def destroy_distributed() -> None:
    """Leave the process group (call once, at the very end of a torchrun program)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: 0 in a single process; torchrun's RANK before init."""
    return dist.get_rank() if _active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if _active() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """Rank within this machine: which GPU this process drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the one process that writes files and prints progress."""
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def _comm_device(t: torch.Tensor | None = None) -> torch.device:
    # NCCL alone cannot move CPU tensors; everything else (gloo, mixed) can.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device if t is not None else torch.device("cpu")


def all_reduce_mean(value):
    """Mean of `value` over all ranks: a float gives a float, a tensor a new tensor."""
    if not _active() or world_size() == 1:
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach().to(_comm_device(value), copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / world_size()).to(value.device)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / world_size()


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's `data`, in rank order (lengths may differ). No pickle involved."""
    if not _active() or world_size() == 1:
        return [data]
    dev = _comm_device()
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = max(int(s) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=dev)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if data else 0
    bufs = [torch.empty_like(buf) for _ in range(world_size())]
    dist.all_gather(bufs, buf)
    return [bytes(b[: int(s)].cpu().tolist()) for b, s in zip(bufs, sizes)]


# ---- data sharding -------------------------------------------------------------------


@lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


def batch_indices(
    step: int,
    micro: int,
    batch_size: int,
    grad_accum: int,
    num_examples: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
) -> list[int]:
    """Indices of the examples this rank uses for micro-batch `micro` of optimizer step `step`.

    The data is an endless stream of positions: epoch e is a permutation of range(n)
    (fixed by `seed` and e; identity when shuffle=False). Step s takes the next
    G = batch_size * grad_accum * world_size positions. Inside a step, the micro-batch
    slots are ordered (micro, rank): slot = micro * world_size + rank. So N ranks with
    grad_accum A see exactly the micro-batches that one process with grad_accum N*A
    sees, and the result depends only on (step, micro, rank): exact resume for free.
    """
    ws, r = world_size(), rank()
    start = (step * grad_accum * ws + micro * ws + r) * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, num_examples)
        out.append(_epoch_order(num_examples, seed, epoch)[i] if shuffle else i)
    return out
