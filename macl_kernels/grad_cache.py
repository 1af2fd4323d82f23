"""Gradient caching: the gradient of one big contrastive batch with the encoder's memory of a chunk.

GradCache (L. Gao, Y. Zhang, J. Han, J. Callan, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup", RepL4NLP 2021, arXiv:2101.06983); sentence-transformers'
``CachedMultipleNegativesRankingLoss`` does the same for text. The math, what is replayed and what
BatchNorm breaks: docs/math.md#gradient-caching.

    cache = GradCache(mk.MACLLoss(), encoder, chunk_size=512)        # SimCLR: one shared encoder
    loss = cache.step(view1, view2)       # .grad on every parameter, as one big-batch step
    optimizer.step(); optimizer.zero_grad()

One :meth:`GradCache.step` runs three phases:

1. **cached forward**: the encoder(s) embed the batch chunk by chunk under ``torch.no_grad()``
   (no activation is kept); the random state (CPU and CUDA generators, plus any ``generators``)
   is recorded before each chunk;
2. **loss**: the loss of the whole batch on the cached embeddings, which are leaves that require
   grad; its backward leaves ``dL/de`` for every embedding row (and the gradient of anything else
   the loss uses, e.g. CLIP's ``logit_scale``);
3. **re-forward**: each chunk again, with its recorded random state restored, this time building
   the graph, and ``backward(dL/de_chunk)``; the graph of a chunk is freed before the next one.

Peak memory is the encoder's activations of one chunk plus ``O(N D)`` for the embeddings and their
gradients, plus the loss (``O((M + K) D)`` with the fused backends), instead of the activations
of the whole batch. The price is one extra forward of the encoder per step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["GradCache", "batch_statistics_modules"]

# Relative tolerance of ``check_replay`` per embedding dtype (docs/math.md#tolerances): a
# re-forward must reproduce the cached embedding to the rounding of its dtype.
_REPLAY_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2,
                torch.float16: 2e-2}


def batch_statistics_modules(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The submodules of ``module`` whose output for one sample depends on the other samples of
    the forward call, as ``(path, module)``: every BatchNorm (``_BatchNorm``: ``BatchNorm1d/2d/3d``,
    their lazy versions, ``SyncBatchNorm``) that normalises with the batch's statistics, i.e. in
    training mode, or in eval mode without running statistics (``track_running_stats=False``).

    InstanceNorm, GroupNorm and LayerNorm normalise each sample by its own statistics and are not
    listed. Batch dependence inside arbitrary code (a custom layer that mixes samples) cannot be
    seen from the module tree."""
    found = []
    for path, sub in module.named_modules():
        if isinstance(sub, _BatchNorm):
            uses_batch_stats = sub.training or (sub.running_mean is None and sub.running_var is None)
            if uses_batch_stats:
                found.append((path or "<root>", sub))
    return found


def _running_stat_buffers(modules: Sequence[nn.Module]) -> List[Tensor]:
    """Buffers that a forward in training mode updates (running mean/var, batch counters of
    BatchNorm and InstanceNorm with ``track_running_stats=True``)."""
    seen, out = set(), []
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, (_BatchNorm, _InstanceNorm)) and sub.training and sub.track_running_stats:
                for buf in (sub.running_mean, sub.running_var, sub.num_batches_tracked):
                    if buf is not None and id(buf) not in seen:
                        seen.add(id(buf))
                        out.append(buf)
    return out


# --- inputs -------------------------------------------------------------------------------------

class _Chunk:
    """One chunk of an encoder's input and how to call the encoder with it."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs

    def call(self, encoder: Callable) -> Any:
        return encoder(*self.args, **self.kwargs)


def _split(inputs: Any, chunk_size: int, name: str) -> Tuple[int, List[_Chunk]]:
    """Split ``inputs`` along dimension 0: a tensor (``encoder(chunk)``), a mapping
    (``encoder(**chunk)``, e.g. a tokenizer's output) or a tuple/list (``encoder(*chunk)``). In a
    mapping or sequence every tensor whose first dimension is the batch is split; other values
    are passed unchanged to every chunk."""
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")
        n = inputs.shape[0]
        parts = [_Chunk((c,), {}) for c in inputs.split(chunk_size)]
    elif isinstance(inputs, Mapping) or isinstance(inputs, (tuple, list)):
        items = list(inputs.items()) if isinstance(inputs, Mapping) else list(enumerate(inputs))
        sizes = {v.shape[0] for _, v in items if isinstance(v, Tensor) and v.dim() > 0}
        if not sizes:
            raise TypeError(f"{name} contains no tensor with a batch dimension to split")
        if len(sizes) > 1:
            raise ValueError(f"the tensors of {name} disagree on the batch size (dimension 0): "
                             f"{sorted(sizes)}")
        n = sizes.pop()
        split = {k: (v.split(chunk_size) if isinstance(v, Tensor) and v.dim() > 0 else None)
                 for k, v in items}
        parts = []
        for i in range((n + chunk_size - 1) // chunk_size):
            values = {k: (split[k][i] if split[k] is not None else v) for k, v in items}
            if isinstance(inputs, Mapping):
                parts.append(_Chunk((), values))
            else:
                parts.append(_Chunk(tuple(values[k] for k, _ in items), {}))
    else:
        raise TypeError(f"{name} must be a tensor, a mapping or a tuple/list of tensors, "
                        f"got {type(inputs).__name__}")
    if n == 0:
        raise ValueError(f"{name} has an empty batch")
    return n, parts


def _tensors(obj: Any) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


# --- random state ---------------------------------------------------------------------------------

class _RandomState:
    """The state of torch's CPU generator, of the CUDA generators of ``cuda_devices`` and of the
    extra ``generators``, recorded before a chunk's first forward and restored for its
    re-forward (GradCache's ``RandContext``). The replay runs forked: afterwards every generator
    is back where the cached forward left it, so the step consumes the random stream exactly
    once, like a step that keeps the graph."""

    def __init__(self, cuda_devices: Sequence[int], generators: Sequence[torch.Generator]):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in cuda_devices]
        self.extra = [(g, g.get_state()) for g in generators]

    @contextlib.contextmanager
    def replay(self):
        saved_cpu = torch.get_rng_state()
        saved_cuda = [(d, torch.cuda.get_rng_state(d)) for d, _ in self.cuda]
        saved_extra = [(g, g.get_state()) for g, _ in self.extra]
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)
        for g, state in self.extra:
            g.set_state(state)
        try:
            yield
        finally:
            torch.set_rng_state(saved_cpu)
            for d, state in saved_cuda:
                torch.cuda.set_rng_state(state, d)
            for g, state in saved_extra:
                g.set_state(state)


def _cuda_devices(encoders: Sequence[nn.Module], inputs: Sequence[Any]) -> List[int]:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    devices = set()
    for encoder in encoders:
        if isinstance(encoder, nn.Module):
            for p in encoder.parameters():
                if p.device.type == "cuda":
                    devices.add(p.device.index if p.device.index is not None
                                else torch.cuda.current_device())
    for obj in inputs:
        for t in _tensors(obj):
            if t.device.type == "cuda":
                devices.add(t.device.index if t.device.index is not None
                            else torch.cuda.current_device())
    return sorted(devices)


_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla")


def _autocast_off() -> contextlib.ExitStack:
    """Leave the caller's autocast for the backward passes, as PyTorch recommends (the plain
    step ``with autocast: loss = ...`` followed by ``loss.backward()`` outside it)."""
    stack = contextlib.ExitStack()
    for device_type in _AUTOCAST_DEVICE_TYPES:
        try:
            enabled = torch.is_autocast_enabled(device_type)
        except (RuntimeError, TypeError, ValueError):
            continue
        if enabled:
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _is_ddp(encoder: Any) -> bool:
    return isinstance(encoder, nn.parallel.DistributedDataParallel)


# --- the helper -----------------------------------------------------------------------------------

class GradCache:
    """One contrastive training step of a batch larger than the encoder's memory allows.

    Args:
        loss_fn: any callable ``loss_fn(e1, e2, **loss_kwargs) -> scalar tensor``: the package's
            functions (``functools.partial(mk.infonce_loss, temperature=0.2)``) and modules
            (``mk.MACLLoss()``, ``mk.ClipLoss()``, ...) or your own. It sees the whole batch's
            embeddings at once, so batch-level quantities (MACL's alignment, DCLW's weights,
            ``gather_distributed=True``) are those of the big batch. Anything else it uses that
            requires grad (a learnable ``logit_scale``, passed in ``loss_kwargs`` or closed over)
            receives its gradient from the loss's backward.
        encoder: the module that embeds ``inputs1`` (and ``inputs2`` when there is no
            ``encoder2``: SimCLR's shared encoder). May be wrapped in ``DistributedDataParallel``.
        encoder2: the second tower (CLIP: the text encoder), or ``None``.
        chunk_size: rows per forward (keyword-only). Peak activation memory is that of
            ``chunk_size`` rows; the result does not depend on it (up to float rounding), as long
            as no module uses batch statistics.
        get_rep: maps an encoder's output to the ``[rows, D]`` embedding tensor (e.g.
            ``lambda out: out.pooler_output``); default: the output itself, which must be a tensor.
        allow_batch_statistics: BatchNorm in training mode (or without running statistics)
            normalises with the statistics of its forward call, i.e. of a chunk here, not of the
            batch: the gradient would then belong to a different model. By default such a module
            raises a ``ValueError`` that names it; ``True`` accepts per-chunk statistics (the
            gradient is then exactly that of the model whose BatchNorm sees chunks of
            ``chunk_size``), and the running statistics are updated once per chunk.
        loss_parameters: parameters that only the loss uses (CLIP's ``logit_scale`` kept outside
            the DDP-wrapped towers). Under ``torch.distributed`` with more than one rank their new
            gradient is averaged over ``process_group``, as DDP does for the encoders'
            parameters; otherwise nothing is done to them.
        generators: extra ``torch.Generator`` objects the model draws from (besides torch's
            default CPU and CUDA generators, which are always replayed); replayed per chunk too.
        check_replay: re-forwarded embeddings are compared with the cached ones (relative error
            within the dtype's tolerance, docs/math.md#tolerances), and a ``RuntimeError`` says
            which chunk differs: randomness that is not replayed (Python's ``random``, NumPy, a
            generator not listed) makes the gradient wrong. Costs a host synchronisation per chunk.
        process_group: the group for ``loss_parameters`` (default: the default group).

    Random state: torch's CPU generator, the CUDA generators of the devices of the encoders'
    parameters and the inputs, and ``generators`` are recorded before each chunk's first forward
    and restored for its re-forward, so dropout and random augmentation inside the model draw
    the same numbers twice. Buffers updated by the forward (running statistics) are restored
    after the re-forwards, so each chunk updates them once.

    Mixed precision: call :meth:`step` inside ``torch.autocast(...)``; both forwards and the loss
    run under it. ``GradScaler``: pass ``scaler=``; the loss's backward then starts from
    ``scaler.scale(loss)``, so every parameter gradient (encoders and loss parameters) is scaled
    exactly as ``scaler.scale(loss).backward()`` would scale it; call ``scaler.step(optimizer)``
    and ``scaler.update()`` afterwards as usual.

    DDP: wrap each encoder in ``DistributedDataParallel`` and use the loss with
    ``gather_distributed=True``; every rank must have the same batch and chunk sizes. All
    re-forwards but the last of each DDP module run under ``no_sync()``, so parameter gradients
    are accumulated locally and all-reduced once per step. (Keep parameters that only the loss
    uses outside the DDP module and pass them as ``loss_parameters``: DDP expects every one of
    its parameters to take part in its forward.)
    """

    def __init__(self, loss_fn: Callable[..., Tensor], encoder: Callable, encoder2: Optional[Callable] = None,
                 *, chunk_size: int, get_rep: Optional[Callable[[Any], Tensor]] = None,
                 allow_batch_statistics: bool = False,
                 loss_parameters: Iterable[Tensor] = (),
                 generators: Iterable[torch.Generator] = (),
                 check_replay: bool = False,
                 process_group: Optional[Any] = None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not callable(encoder):
            raise TypeError(f"encoder must be a module or callable, got {type(encoder).__name__}")
        if encoder2 is not None and not callable(encoder2):
            raise TypeError(f"encoder2 must be a module, a callable or None, got "
                            f"{type(encoder2).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if get_rep is not None and not callable(get_rep):
            raise TypeError(f"get_rep must be callable or None, got {type(get_rep).__name__}")
        if not isinstance(allow_batch_statistics, bool):
            raise TypeError("allow_batch_statistics must be a bool")
        if not isinstance(check_replay, bool):
            raise TypeError("check_replay must be a bool")
        loss_parameters = list(loss_parameters)
        for i, p in enumerate(loss_parameters):
            if not isinstance(p, Tensor) or not p.is_leaf or not p.requires_grad:
                raise TypeError(f"loss_parameters[{i}] must be a leaf tensor that requires grad "
                                "(an nn.Parameter)")
        generators = list(generators)
        for i, g in enumerate(generators):
            if not isinstance(g, torch.Generator):
                raise TypeError(f"generators[{i}] must be a torch.Generator, got {type(g).__name__}")
        self.loss_fn = loss_fn
        self.encoder = encoder
        self.encoder2 = encoder2
        self.chunk_size = chunk_size
        self.get_rep = get_rep
        self.allow_batch_statistics = allow_batch_statistics
        self.loss_parameters = loss_parameters
        self.generators = generators
        self.check_replay = check_replay
        self.process_group = process_group

    def __repr__(self) -> str:
        two = "" if self.encoder2 is None else ", encoder2=..."
        return (f"GradCache(loss_fn={self.loss_fn!r}{two}, chunk_size={self.chunk_size}, "
                f"allow_batch_statistics={self.allow_batch_statistics})")

    # -- helpers --

    def _encoders(self) -> List[Callable]:
        if self.encoder2 is None or self.encoder2 is self.encoder:
            return [self.encoder]
        return [self.encoder, self.encoder2]

    def _check_batch_statistics(self) -> None:
        if self.allow_batch_statistics:
            return
        for name, encoder in zip(("encoder", "encoder2"), self._encoders()):
            if not isinstance(encoder, nn.Module):
                continue
            found = batch_statistics_modules(encoder)
            if found:
                path, module = found[0]
                more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
                raise ValueError(
                    f"GradCache: {name} module '{path}' ({type(module).__name__}){more} "
                    "normalises with the statistics of its forward call (BatchNorm in training "
                    "mode, or without running statistics). With gradient caching that call sees "
                    f"a chunk of {self.chunk_size} rows, not the batch, so the gradient would not "
                    "be the big batch's. Use a per-sample normalisation instead (torch.nn.GroupNorm "
                    "or LayerNorm), put the module in eval mode (frozen running statistics), or "
                    "pass allow_batch_statistics=True to accept per-chunk statistics."
                )

    def _rep(self, output: Any, rows: int, what: str) -> Tensor:
        rep = self.get_rep(output) if self.get_rep is not None else output
        if not isinstance(rep, Tensor):
            raise TypeError(f"{what} returned {type(rep).__name__}, not a tensor; pass get_rep= to "
                            "extract the embedding from the encoder's output")
        if rep.dim() < 1 or rep.shape[0] != rows:
            raise ValueError(f"{what} returned shape {tuple(rep.shape)}; the embedding's first "
                             f"dimension must be the chunk's {rows} rows")
        if not rep.is_floating_point():
            raise TypeError(f"{what} returned a {rep.dtype} tensor; embeddings must be floating point")
        return rep

    @staticmethod
    def _rows(chunk: _Chunk) -> int:
        for t in list(chunk.args) + list(chunk.kwargs.values()):
            if isinstance(t, Tensor) and t.dim() > 0:
                return t.shape[0]
        raise AssertionError("unreachable: _split checked for a batch tensor")

    def _average_loss_parameter_grads(self, before: List[Optional[Tensor]]) -> None:
        if not self.loss_parameters or not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return
        for p, old in zip(self.loss_parameters, before):
            new = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            if old is not None:
                new -= old
            dist.all_reduce(new, op=dist.ReduceOp.SUM, group=self.process_group)
            new /= world
            p.grad = new if old is None else old + new

    # -- the step --

    def step(self, inputs1: Any, inputs2: Any, *, scaler: Optional[Any] = None,
             **loss_kwargs: Any) -> Tensor:
        """Cached forward, loss, chunked re-forward and backward: afterwards ``.grad`` of every
        parameter of the encoder(s) (and of whatever else the loss used) holds what
        ``loss_fn(encoder(inputs1), encoder2(inputs2), **loss_kwargs).backward()`` would have
        accumulated (exactly, with replayed random state). Returns the loss, detached (unscaled).

        ``inputs1``/``inputs2``: a tensor (``encoder(chunk)``), a mapping (``encoder(**chunk)``)
        or a tuple/list (``encoder(*chunk)``); tensors are chunked along dimension 0.
        ``scaler``: a ``torch.amp.GradScaler``; the backward then starts from ``scaler.scale(loss)``.
        """
        enc1 = self.encoder
        enc2 = self.encoder if self.encoder2 is None else self.encoder2
        _, chunks1 = _split(inputs1, self.chunk_size, "inputs1")
        _, chunks2 = _split(inputs2, self.chunk_size, "inputs2")
        self._check_batch_statistics()
        cuda_devices = _cuda_devices(self._encoders(), (inputs1, inputs2))

        # 1. cached forward: no graph, random state recorded per chunk
        jobs: List[Tuple[Callable, _Chunk, _RandomState, int, int, int]] = []
        reps: List[List[Tensor]] = [[], []]
        with torch.no_grad():
            for side, (enc, chunks) in enumerate(((enc1, chunks1), (enc2, chunks2))):
                start = 0
                for chunk in chunks:
                    state = _RandomState(cuda_devices, self.generators)
                    rows = self._rows(chunk)
                    what = f"the encoder of inputs{side + 1} on rows {start}..{start + rows - 1}"
                    reps[side].append(self._rep(chunk.call(enc), rows, what).detach())
                    jobs.append((enc, chunk, state, side, start, rows))
                    start += rows
        modules = [e for e in self._encoders() if isinstance(e, nn.Module)]
        after_forward = [(buf, buf.detach().clone()) for buf in _running_stat_buffers(modules)]

        # 2. the loss of the whole batch on the cached embeddings
        e1 = torch.cat(reps[0]).requires_grad_()
        e2 = torch.cat(reps[1]).requires_grad_()
        del reps
        cached = (e1.detach(), e2.detach()) if self.check_replay else None
        before = [None if p.grad is None else p.grad.detach().clone() for p in self.loss_parameters]
        loss = self.loss_fn(e1, e2, **loss_kwargs)
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn returned {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar (reduction='mean' or 'sum'), got shape "
                             f"{tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("loss_fn returned a loss that does not depend on the embeddings "
                             "(it does not require grad)")
        with _autocast_off():
            (scaler.scale(loss) if scaler is not None else loss).backward()
        self._average_loss_parameter_grads(before)
        grads = (e1.grad, e2.grad)
        del e1, e2

        # 3. re-forward chunk by chunk with the replayed random state, backward the cached grads
        work = [job for job in jobs if grads[job[3]] is not None]
        last_of = {id(job[0]): k for k, job in enumerate(work)}
        for k, (enc, chunk, state, side, start, rows) in enumerate(work):
            sync = enc.no_sync() if _is_ddp(enc) and last_of[id(enc)] != k else contextlib.nullcontext()
            with sync, state.replay():
                what = f"the re-forward of inputs{side + 1} rows {start}..{start + rows - 1}"
                rep = self._rep(chunk.call(enc), rows, what)
                g = grads[side][start:start + rows]
                if rep.shape != g.shape:
                    raise RuntimeError(f"{what} returned shape {tuple(rep.shape)}, the cached "
                                       f"forward {tuple(g.shape)}")
                if cached is not None:
                    self._compare(rep, cached[side][start:start + rows], side, start)
                with _autocast_off():
                    rep.backward(g.to(rep.dtype))
                del rep
        for buf, value in after_forward:
            buf.copy_(value)
        return loss.detach()

    def _compare(self, rep: Tensor, want: Tensor, side: int, start: int) -> None:
        rtol = _REPLAY_RTOL.get(rep.dtype, 1e-5)
        got = rep.detach().double()
        want = want.double()
        err = (got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float64).tiny)
        if not bool(err <= rtol):
            raise RuntimeError(
                f"GradCache(check_replay=True): the re-forward of inputs{side + 1} rows {start}.."
                f"{start + rep.shape[0] - 1} differs from the cached forward (relative error "
                f"{float(err):.3g} > {rtol:g}): the model draws randomness that is not replayed "
                "(Python's random, NumPy, a torch.Generator not passed as generators=) or depends "
                "on state that changed between the two passes; the gradient would be wrong.")
