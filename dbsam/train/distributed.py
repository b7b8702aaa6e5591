"""torchrun / DDP support: process group from the environment, rank-0 helpers, synchronised BN.

`dbsam train` runs unchanged under `torchrun --nproc_per_node N`: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK (and the rendezvous), and `init` picks NCCL on GPUs and gloo on CPUs.

BatchNorm (in the conv branch) normalises with the statistics of the batch it sees, so N ranks of
b samples would not train like one process with N*b. We synchronise the statistics: on GPUs with
torch's SyncBatchNorm, on CPUs (which SyncBatchNorm refuses) with `GlobalBatchNorm2d`, which
all-reduces the per-channel sums with the differentiable all_reduce so both the forward and the
gradient are those of the global batch.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (nothing to do for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def close(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values, info: Dist):
    """Average a list of floats over ranks (the global-batch value of per-rank means)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def any_rank(flag: bool, info: Dist) -> bool:
    """True on every rank when any rank says so (to stop all ranks at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj, info: Dist):
    """A list of every rank's `obj` (plain data), on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with the statistics of the global batch across ranks, on any device.

    Same parameters and buffers as BatchNorm2d (checkpoints are interchangeable). In eval mode, or
    outside a process group, it is exactly BatchNorm2d.
    """

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable

        n_local = x.numel() // x.shape[1]
        xf = x.float()
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                           torch.tensor([float(n_local)], device=x.device)])
        stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d by its synchronised version (call before wrapping in DDP)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            for p_new, p_old in zip(new.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)  # frozen stays frozen (medsam)
            new.train(child.training)
            setattr(model, name, new)
        else:
            synchronise_batchnorm(child, device)
    return model
