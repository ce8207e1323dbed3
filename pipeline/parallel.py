"""torch.distributed glue: one process per GPU (or per CPU worker with gloo), started by ``torchrun``.

skd runs unchanged without torchrun (a world of one, no process group). Under ``torchrun`` the
training and caching commands call :func:`init` once: NCCL on CUDA, gloo on the CPU. Rank 0 alone
writes logs, checkpoints and the store's finalisation; every rank reads its own samples.

Neutral ground: the cache writer, the holistic term and the trainer all import it, and it imports
nothing of theirs.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import SkdError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init(device_type: str) -> World:
    """Join the process group torchrun set up (a no-op world of one without torchrun).

    ``device_type``: "cuda" (NCCL; each process takes the GPU of its LOCAL_RANK) or "cpu" (gloo).
    """
    if not launched_by_torchrun():
        return World()
    if dist.is_initialized():
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SkdError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                           "start torchrun with --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(local_rank)
    # A long timeout: rank 0 may spend minutes writing a checkpoint or finalising a store while the
    # others wait at a barrier.
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return current()


def current() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def broadcast_object(value, src: int = 0):
    """``value`` of rank ``src`` on every rank (plain Python values between ranks; never to disk)."""
    if not current().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over ranks (the tensor itself in a world of one)."""
    world = current()
    if world.size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world.size


def all_max(value: float, device: torch.device) -> float:
    if current().size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average gradients over ranks in one all-reduce (what DDP does, without its hooks).

    For the discriminator: its step runs two forwards (real/fake, then the gradient penalty's
    interpolates) before one backward through a double backward, which DDP's reducer does not support.
    """
    world = current()
    if world.size == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (replicas must start identical)."""
    if current().size == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d in ``module`` (subclasses too: the PSP heads' BatchNorm + activation) made to
    normalise with the statistics of the global batch, in place; parameters, buffers and state_dict
    keys stay the same.

    (torch's ``SyncBatchNorm.convert_sync_batchnorm`` would replace a BatchNorm subclass by a plain
    SyncBatchNorm, dropping what the subclass adds, and SyncBatchNorm does not run on the CPU.)
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, AllReduceBatchNorm2d):
            setattr(module, name, AllReduceBatchNorm2d.like(child))
        else:
            sync_batchnorm(child)
    return module


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum of every rank's gradient (each rank's loss depends on it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Through apply, not in place: differentiable again, for the gradient penalty's double
        # backward through the discriminator's BatchNorm.
        return _AllReduceSum.apply(grad)


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's: per-channel sums and squared
    sums are all-reduced (with their gradient), so forward and backward match one process holding
    the whole batch. Outside training, or in a world of one, it is BatchNorm2d. Counts, sums and
    the normalisation run in float32 whatever the input's dtype (a bfloat16 count of 5400 pixels
    would be 5408), and the output comes back in the input's dtype.

    :meth:`like` gives a copy of any BatchNorm2d (subclass included) with this behaviour mixed in
    below the subclass's own forward (which calls ``super().forward``)."""

    @classmethod
    def like(cls, bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
        kind = type(bn)
        synced = cls if kind is nn.BatchNorm2d else type(f"AllReduce{kind.__name__}", (kind, cls), {})
        new = synced(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        return new.to(bn.running_mean.device if bn.track_running_stats else bn.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and current().size > 1):
            return super().forward(x)
        c, xf = x.shape[1], x.float()
        count = torch.full((1,), float(x.numel() // c), device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count]))
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var.detach() * n / (n - 1).clamp(min=1)).to(self.running_var.dtype), momentum)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None].float() + self.bias[None, :, None, None].float()
        return y.to(x.dtype)
