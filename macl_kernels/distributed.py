"""``gather_distributed=True``: the loss over the global batch on ``torch.distributed``.

The semantics of ``docs/math.md#distributed``. Each rank holds ``n`` local rows per view (the same ``n`` on every rank). The
anchors are the local rows; the candidates are every rank's rows, all-gathered by
:class:`GatherWithGrad`, whose backward all-reduces (sums) the candidates' gradients and keeps
the local slice. Positives and the self mask are offset by ``rank * n``; MACL's alignment ``A`` is
the global mean (one all-reduce of a scalar); DCLW's weights are the softmax over the global batch.

Then the mean of the per-rank losses equals the single-process loss on the concatenated batch,
and each rank's gradient on its rows is ``world_size`` times the matching rows of the
single-process gradient, so DDP's gradient averaging gives exactly the single-process step.

Communication per step (p = bytes per element of the compute dtype, float32 for half inputs;
W ranks, n rows per rank and view, D columns): forward all-gathers the two views,
``2 * W * n * D * p`` bytes received per rank, plus two 8-byte scalar all-reduces (MACL's ``A``)
or a ``W * n * p`` all-gather (DCLW weights); backward all-reduces the gradient of each gathered
view, ``2 * W * n * D * p`` bytes per rank (ring all-reduce moves about twice that on the wire).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist


class DistContext(NamedTuple):
    rank: int
    world_size: int
    group: Optional[object] = None


def context(gather_distributed: bool, group=None) -> Optional[DistContext]:
    """The process group to gather over, or ``None`` for the local loss (not initialised, or one
    rank: then ``gather_distributed=True`` is exactly the local loss)."""
    if not gather_distributed or not dist.is_available() or not dist.is_initialized():
        return None
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return None
    return DistContext(dist.get_rank(group), world_size, group)


class GatherWithGrad(torch.autograd.Function):
    """``cat(all_gather(x))``; backward: all-reduce the gradient, keep the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int, group):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x, group=group)
        ctx.rank, ctx.rows, ctx.group = rank, x.shape[0], group
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None, None


def gather_with_grad(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    return GatherWithGrad.apply(x, ctx.rank, ctx.world_size, ctx.group)


def gather_local_grad(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All-gather whose gradient reaches only the local slice (OpenCLIP's
    ``gather_with_grad=False``): the other ranks' rows are constants here."""
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.detach().contiguous(), group=ctx.group)
    parts[ctx.rank] = x
    return torch.cat(parts)


def gather_no_grad(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.detach().contiguous(), group=ctx.group)
    return torch.cat(parts)


def global_mean(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of ``x`` over every rank's entries (no gradient; equal sizes on every rank)."""
    total = x.detach().sum().reshape(1).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
    return total[0] / (x.numel() * ctx.world_size)


def check_equal_rows(n: int, device: torch.device, ctx: DistContext, what: str = "batch") -> None:
    """All-gather needs the same number of rows on every rank: say so instead of hanging.

    The check runs on the device: one all-reduce of ``[n, -n]`` (MAX) and an asynchronous
    assertion on its result, with no host synchronisation (on a GPU a mismatch surfaces at a
    later kernel launch as a device-side assertion, which ends the process; on CPU it raises
    here, a ``RuntimeError`` naming the mismatch). Per call this costs one 16-byte all-reduce."""
    sizes = torch.tensor([n, -n], dtype=torch.int64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=ctx.group)
    equal = (sizes[0] == n) & (sizes[1] == -n)
    torch._assert_async(
        equal, f"gather_distributed=True needs the same {what} size on every rank; rank "
        f"{ctx.rank} has {n} rows and another rank has a different number")


def shutdown(*ddp_models) -> None:
    """Destroy the default process group without racing gloo's worker threads.

    With torch 2.13 a collective launched during ``backward()`` (DDP's all-reduces, this
    module's gradient all-reduce) captures a Python object in its thread-local state, so the
    thread that drops the work's last reference needs the GIL. If a gloo worker drops it while
    the main thread, holding the GIL, destroys the group (and joins that worker), both wait
    forever: ``destroy_process_group()`` at the end of a DDP script hung about one run in two on
    the 2-core CI machine. Here the main thread waits on a barrier whose work object it keeps
    (that work holds every earlier collective), destroys the group, drops the reducers of
    ``ddp_models`` (they own the group too), and only then releases the barrier.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    barrier = dist.barrier(async_op=True)
    barrier.wait()
    dist.destroy_process_group()
    for model in ddp_models:
        if hasattr(model, "reducer"):
            model.reducer = None
    del barrier
