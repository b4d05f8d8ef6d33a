"""Ulysses sequence parallelism: the 2-D process layout (world = data-parallel x sequence-parallel) and the
differentiable collectives that split a token sequence over a group of ranks. Nothing here knows a model;
docs/sequence-parallel.md says how the Wan DiT uses it and what a trainer must do.

Usage:
    layout = parallel_layout(sp_size=2)           # every rank, in the same order (it creates process groups)
    model.set_sequence_parallel(layout.sp)        # None when sp_size == 1: the plain path
    samples = all_samples[layout.dp_rank::layout.dp_size]   # a group's ranks share samples and noise
    loss = loss * layout.loss_scale               # then FSDP's mean over the world is the mean over dp groups

Conventions of `SequenceParallel` (one group of `size` ranks; this rank is `rank` in it):
- `shard` pads a sequence with zeros to a multiple of `size` and keeps this rank's contiguous chunk;
- `sequence_to_heads` / `heads_to_sequence` are the all-to-alls around attention: (B, L/size, H, D) on every
  rank <-> (B, L, H/size, D); each one's backward is the other;
- `gather` is the all-gather back to the full sequence. Its backward keeps only this rank's chunk of the
  incoming gradient: right when every rank of the group computes the same loss from the same full output,
  which then counts once, not `size` times. Every gradient a rank computes (weights and inputs alike) is then
  its chunk's contribution, and the sum over the group is the gradient of the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from idgrpo.engine.dist import _all_gather_single, collective_timeout_s


@dataclass(frozen=True)
class SequenceParallel:
    """A sequence-parallel group: its process group, this rank's place in it and its global ranks."""

    group: dist.ProcessGroup
    rank: int
    """This process's index in the group (which chunk of the sequence it holds)."""
    size: int
    """Ranks in the group."""
    ranks: tuple[int, ...]
    """Global ranks of the group, in group order."""

    def __deepcopy__(self, memo):
        # A process group is a shared handle, not state: a copied model (a frozen reference policy) shares it.
        return self

    def padded_length(self, length: int) -> int:
        """`length` rounded up to a multiple of the group size."""
        return math.ceil(length / self.size) * self.size

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous chunk of `t` along `dim`, after zero-padding `dim` to `padded_length`.
        Differentiable: the gradient outside the chunk is zero."""
        length = t.shape[dim]
        padded = self.padded_length(length)
        if padded != length:
            pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, padded - length]
            t = torch.nn.functional.pad(t, pad)
        chunk = padded // self.size
        return t.narrow(dim, self.rank * chunk, chunk)

    def gather(self, t: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        """The full sequence from every rank's chunk `t` (all-gather along `dim`), cut to `length` (padding
        dropped). Backward: this rank's chunk of the gradient only (module docstring)."""
        return _GatherSequence.apply(t, self, dim).narrow(dim, 0, length)

    def sequence_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L/size, H, D) sequence chunk -> (B, L, H/size, D) all tokens of this rank's heads."""
        return _AllToAll.apply(t, self, 2, 1)

    def heads_to_sequence(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, H/size, D) -> (B, L/size, H, D): the inverse of `sequence_to_heads`."""
        return _AllToAll.apply(t, self, 1, 2)

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Overwrite `t` in place with the group's first rank's value (for inputs that must agree)."""
        if self.size > 1:
            dist.broadcast(t, src=self.ranks[0], group=self.group)
        return t


def _all_to_all(t: torch.Tensor, sp: SequenceParallel, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `t` along `scatter_dim` into `sp.size` chunks, send chunk i to rank i, and concatenate what
    arrives along `gather_dim` in rank order."""
    if t.shape[scatter_dim] % sp.size:
        raise ValueError(f"all-to-all: dimension {scatter_dim} of a {tuple(t.shape)} tensor does not split "
                         f"over the {sp.size} ranks of the sequence-parallel group")
    send = t.unflatten(scatter_dim, (sp.size, -1)).movedim(scatter_dim, 0).contiguous()  # (size, *chunk)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=sp.group)
    return received.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, sp, scatter_dim, gather_dim):
        ctx.sp, ctx.dims = sp, (scatter_dim, gather_dim)
        return _all_to_all(t, sp, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.sp, gather_dim, scatter_dim), None, None, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, sp, dim):
        ctx.sp, ctx.dim, ctx.chunk = sp, dim, t.shape[dim]
        send = t.movedim(dim, 0).contiguous()  # chunks must be contiguous along the gathered dim
        received = send.new_empty((sp.size * send.shape[0], *send.shape[1:]))
        _all_gather_single(received, send, group=sp.group)
        return received.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.sp.rank * ctx.chunk, ctx.chunk), None, None


@dataclass(frozen=True)
class ParallelLayout:
    """world = dp_size x sp_size. Ranks [d * sp_size, (d + 1) * sp_size) form data-parallel group d's
    sequence-parallel group: they process the same samples with the same noise; samples are split over
    the dp groups; FSDP shards over the whole world as before."""

    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    sp: SequenceParallel | None
    """This rank's sequence-parallel group; None when sp_size == 1 (models take their plain path)."""

    @property
    def loss_scale(self) -> int:
        """Factor on the loss before backward: a rank's gradients are its chunk's share of its group's
        gradient, and FSDP averages over all dp_size x sp_size ranks, so scaling by sp_size makes the
        result the mean over the dp groups of their full gradients (docs/sequence-parallel.md)."""
        return self.sp_size


def parallel_layout(sp_size: int = 1, timeout_s: float | None = None) -> ParallelLayout:
    """Split the default process group into dp groups of `sp_size` consecutive ranks (consecutive, so a group
    stays on one node when sp_size divides the GPUs per node). Every rank must call this, in the same order
    relative to other group creations. `timeout_s` bounds the groups' collectives (`collective_timeout_s`)."""
    if not dist.is_initialized():
        raise RuntimeError("parallel_layout needs an initialised process group (idgrpo.engine.init_distributed)")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if sp_size < 1 or world_size % sp_size:
        raise ValueError(f"sp_size={sp_size} must be a positive divisor of the world size {world_size}")
    dp_rank, sp_rank = divmod(rank, sp_size)
    sp = None
    if sp_size > 1:
        timeout = timedelta(seconds=collective_timeout_s(timeout_s))
        for d in range(world_size // sp_size):
            ranks = tuple(range(d * sp_size, (d + 1) * sp_size))
            group = dist.new_group(list(ranks), timeout=timeout)  # collective: every rank creates every group
            if d == dp_rank:
                sp = SequenceParallel(group=group, rank=sp_rank, size=sp_size, ranks=ranks)
    return ParallelLayout(dp_rank=dp_rank, dp_size=world_size // sp_size, sp_rank=sp_rank, sp_size=sp_size, sp=sp)


__all__ = ["ParallelLayout", "SequenceParallel", "parallel_layout"]
