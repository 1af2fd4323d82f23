"""GradCache (macl_kernels/grad_cache.py, docs/math.md#gradient-caching).

Exactness: after ``GradCache.step`` every parameter's gradient (encoders and a learnable CLIP
scale) equals that of a reference step that runs the encoder over the same chunks from the same
random state *keeping the graph*, then the same loss and one ``backward()``: to 1e-10 relative in
float64 for every loss (functions and drop-in modules), one and two encoders, with dropout and a
random augmentation inside the model; to float32 rounding (1e-5) in float32. Without randomness
it equals one plain big-batch step. Then: BatchNorm detection, autocast, GradScaler, replay
checks, validation and (slow) DDP with ``gather_distributed=True`` on 2 gloo ranks.

Run as a script, this file is one rank of the DDP test:
``python tests/test_grad_cache.py RANK WORLD_SIZE RENDEZVOUS_FILE OUT_DIR``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

import macl_kernels as mk
from macl_kernels.grad_cache import batch_statistics_modules

F64_TOL = 1e-10
F32_TOL = 1e-5
N, D_IN, HIDDEN, D_OUT, CHUNK = 12, 6, 16, 8, 5  # 12 rows in chunks of 5, 5, 2


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids OpenMP's spinning on a shared 2-core machine
    (25x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.norm())
    diff = float((a - b).norm())
    return diff / scale if scale > 0 else diff


class RandomNoise(nn.Module):
    """A random augmentation inside the model: Gaussian noise in training mode."""

    def __init__(self, sigma: float = 0.1, generator: torch.Generator = None):
        super().__init__()
        self.sigma, self.generator = sigma, generator

    def forward(self, x):
        if not self.training:
            return x
        noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=self.generator)
        return x + self.sigma * noise


def make_encoder(seed: int, dropout: bool, dtype=torch.float64, norm: str = "layer",
                 generator=None) -> nn.Module:
    torch.manual_seed(seed)
    norm_layer = {"layer": lambda: nn.LayerNorm(HIDDEN), "batch": lambda: nn.BatchNorm1d(HIDDEN),
                  "group": lambda: nn.GroupNorm(4, HIDDEN)}[norm]
    layers = [RandomNoise(0.1, generator) if dropout else nn.Identity(), nn.Linear(D_IN, HIDDEN),
              norm_layer(), nn.GELU(), nn.Dropout(0.3 if dropout else 0.0),
              nn.Linear(HIDDEN, D_OUT)]
    return nn.Sequential(*layers).to(dtype)


def make_inputs(dtype=torch.float64, n: int = N, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    return ((x + 0.2 * torch.randn(n, D_IN, generator=g, dtype=torch.float64)).to(dtype),
            (x + 0.2 * torch.randn(n, D_IN, generator=g, dtype=torch.float64)).to(dtype))


def _loss_factories(backend: str):
    """name -> (uses the learnable scale, factory(scale) -> loss_fn(e1, e2))."""
    b = backend
    return {
        "macl": (False, lambda s: functools.partial(mk.macl_loss, backend=b)),
        "macl_anchor_exp_cross": (False, lambda s: functools.partial(
            mk.macl_loss, temperature_mode="anchor", schedule="exp", alpha=2.0, layout="cross",
            backend=b)),
        "infonce": (False, lambda s: functools.partial(mk.infonce_loss, temperature=0.2, backend=b)),
        "infonce_cross_sym_sum": (False, lambda s: functools.partial(
            mk.infonce_loss, layout="cross_sym", reduction="sum", backend=b)),
        "clip": (True, lambda s: (lambda e1, e2: mk.clip_loss(e1, e2, s.exp(), backend=b))),
        "dcl": (False, lambda s: functools.partial(mk.dcl_loss, backend=b)),
        "dclw": (False, lambda s: functools.partial(mk.dcl_loss, weighted=True, backend=b)),
        "tfree": (False, lambda s: functools.partial(mk.tfree_loss, backend=b)),
        "MACLLoss": (False, lambda s: mk.MACLLoss(backend=b)),
        "NTXentLoss": (False, lambda s: mk.NTXentLoss(backend=b)),
        "DCLLoss": (False, lambda s: mk.DCLLoss(backend=b)),
        "DCLWLoss": (False, lambda s: mk.DCLWLoss(backend=b)),
        "ClipLoss": (True, lambda s: (lambda e1, e2: mk.ClipLoss(backend=b)(e1, e2, s.exp()))),
    }


LOSS_NAMES = list(_loss_factories("torch"))


class Setup:
    """Encoder(s), a learnable log-scale outside them, and the loss, freshly initialised."""

    def __init__(self, loss: str, two: bool, dropout: bool, dtype=torch.float64,
                 backend: str = "torch", norm: str = "layer"):
        self.enc1 = make_encoder(0, dropout, dtype, norm)
        self.enc2 = make_encoder(1, dropout, dtype, norm) if two else None
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=dtype))
        uses_scale, factory = _loss_factories(backend)[loss]
        self.uses_scale = uses_scale
        self.loss_fn = factory(self.log_scale)

    def params(self):
        out = list(self.enc1.parameters())
        if self.enc2 is not None:
            out += list(self.enc2.parameters())
        if self.uses_scale:
            out.append(self.log_scale)
        return out

    def grads(self):
        return [p.grad.detach().clone() for p in self.params()]

    def cache(self, chunk=CHUNK, **kwargs):
        return mk.GradCache(self.loss_fn, self.enc1, self.enc2, chunk_size=chunk, **kwargs)


def reference_step(setup: Setup, x1, x2, chunk=CHUNK, autocast=None):
    """The encoder over the same chunks, in the same order (hence the same random numbers),
    keeping the graph; one backward (outside autocast, as PyTorch recommends)."""
    enc2 = setup.enc2 if setup.enc2 is not None else setup.enc1
    with autocast if autocast is not None else contextlib.nullcontext():
        e1 = torch.cat([setup.enc1(c) for c in x1.split(chunk)])
        e2 = torch.cat([enc2(c) for c in x2.split(chunk)])
        loss = setup.loss_fn(e1, e2)
    loss.backward()
    return loss.detach()


def plain_step(setup: Setup, x1, x2):
    enc2 = setup.enc2 if setup.enc2 is not None else setup.enc1
    loss = setup.loss_fn(setup.enc1(x1), enc2(x2))
    loss.backward()
    return loss.detach()


def compare(loss, dtype=torch.float64, two=False, dropout=True, backend="torch", chunk=CHUNK,
            plain=False, seed=123):
    """(loss error, max gradient error) of GradCache against the reference (or plain) step."""
    x1, x2 = make_inputs(dtype)
    ref = Setup(loss, two, dropout, dtype, backend)
    torch.manual_seed(seed)
    want_loss = plain_step(ref, x1, x2) if plain else reference_step(ref, x1, x2, chunk)
    got = Setup(loss, two, dropout, dtype, backend)
    torch.manual_seed(seed)
    got_loss = got.cache(chunk).step(x1, x2)
    errs = [rel_err(g, w) for g, w in zip(got.grads(), ref.grads())]
    return rel_err(got_loss, want_loss), max(errs)


# --- exactness --------------------------------------------------------------------------------

@pytest.mark.parametrize("two", [False, True], ids=["shared", "two_towers"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_float64_equals_chunked_reference_with_dropout(loss, two):
    loss_err, grad_err = compare(loss, two=two, dropout=True)
    assert loss_err <= F64_TOL and grad_err <= F64_TOL, (loss_err, grad_err)


@pytest.mark.parametrize("two", [False, True], ids=["shared", "two_towers"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_float64_without_randomness_equals_one_big_batch_step(loss, two):
    loss_err, grad_err = compare(loss, two=two, dropout=False, plain=True)
    assert loss_err <= F64_TOL and grad_err <= F64_TOL, (loss_err, grad_err)


@pytest.mark.parametrize("loss", ["macl", "infonce", "clip", "dclw", "tfree", "ClipLoss"])
def test_float32_equals_chunked_reference_to_rounding(loss):
    loss_err, grad_err = compare(loss, dtype=torch.float32, two=True, dropout=True)
    assert loss_err <= F32_TOL and grad_err <= F32_TOL, (loss_err, grad_err)


def test_dropout_really_is_random_and_replayed():
    """Without replay the gradient would differ: two steps from different seeds disagree, so the
    agreement above is not vacuous."""
    x1, x2 = make_inputs()
    a, b = Setup("macl", False, True), Setup("macl", False, True)
    torch.manual_seed(1)
    a.cache().step(x1, x2)
    torch.manual_seed(2)
    b.cache().step(x1, x2)
    assert max(rel_err(g, w) for g, w in zip(a.grads(), b.grads())) > 1e-3


@pytest.mark.parametrize("chunk", [1, 3, N, 100])
def test_any_chunk_size(chunk):
    loss_err, grad_err = compare("macl", two=True, dropout=True, chunk=chunk)
    assert loss_err <= F64_TOL and grad_err <= F64_TOL


def test_random_stream_consumed_once_like_the_reference():
    """After the step the global generator is where the reference step leaves it."""
    x1, x2 = make_inputs()
    torch.manual_seed(7)
    reference_step(Setup("macl", False, True), x1, x2)
    after_reference = torch.rand(3)
    torch.manual_seed(7)
    Setup("macl", False, True).cache().step(x1, x2)
    assert torch.equal(torch.rand(3), after_reference)


@pytest.mark.skipif(mk.available_backends()["cpu"] is not None, reason="cpu extension not built")
@pytest.mark.parametrize("loss", ["macl", "clip", "dclw"])
def test_cpu_backend(loss):
    loss_err, grad_err = compare(loss, two=True, dropout=True, backend="cpu")
    assert loss_err <= F64_TOL and grad_err <= F64_TOL
    loss_err, grad_err = compare(loss, dtype=torch.float32, two=True, dropout=True, backend="cpu")
    assert loss_err <= F32_TOL and grad_err <= F32_TOL


def test_gradients_accumulate_like_backward():
    """.grad is accumulated (not overwritten), like two backward() calls."""
    x1, x2 = make_inputs()
    ref, got = Setup("clip", True, False), Setup("clip", True, False)
    for _ in range(2):
        plain_step(ref, x1, x2)
        got.cache().step(x1, x2)
    assert max(rel_err(g, w) for g, w in zip(got.grads(), ref.grads())) <= F64_TOL


def test_scale_inside_a_module_and_loss_kwargs():
    """The scale may live in a module with the towers and be passed as a loss keyword."""
    x1, x2 = make_inputs()

    class Clip(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual, self.text = make_encoder(0, False), make_encoder(1, False)
            self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    ref, got = Clip(), Clip()
    criterion = mk.ClipLoss(backend="torch")
    criterion(ref.visual(x1), ref.text(x2), ref.logit_scale.exp()).backward()
    cache = mk.GradCache(criterion, got.visual, got.text, chunk_size=4)
    cache.step(x1, x2, logit_scale=got.logit_scale.exp())
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= F64_TOL, name


def test_mapping_and_tuple_inputs_and_get_rep():
    x1, x2 = make_inputs()

    class DictEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_encoder(0, True)

        def forward(self, features, scale=1.0):
            return {"pooled": scale * self.net(features)}

    ref, got = DictEncoder(), DictEncoder()
    loss_fn = functools.partial(mk.infonce_loss, backend="torch")
    torch.manual_seed(0)
    e1 = torch.cat([ref(c, scale=2.0)["pooled"] for c in x1.split(CHUNK)])
    e2 = torch.cat([ref(c, 2.0)["pooled"] for c in x2.split(CHUNK)])
    loss_fn(e1, e2).backward()
    torch.manual_seed(0)
    cache = mk.GradCache(loss_fn, got, chunk_size=CHUNK, get_rep=lambda out: out["pooled"])
    cache.step({"features": x1, "scale": 2.0}, (x2, 2.0))
    for p, q in zip(got.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= F64_TOL


# --- random state -------------------------------------------------------------------------------

def test_own_generator_needs_generators_argument():
    x1, x2 = make_inputs()
    gen = torch.Generator()

    def build():
        torch.manual_seed(0)
        return nn.Sequential(RandomNoise(0.5, gen), nn.Linear(D_IN, D_OUT)).double()

    loss_fn = functools.partial(mk.macl_loss, backend="torch")
    ref, got = build(), build()
    gen.manual_seed(5)
    loss_fn(torch.cat([ref(c) for c in x1.split(CHUNK)]),
            torch.cat([ref(c) for c in x2.split(CHUNK)])).backward()
    gen.manual_seed(5)
    with pytest.raises(RuntimeError, match="not replayed"):
        mk.GradCache(loss_fn, build(), chunk_size=CHUNK, check_replay=True).step(x1, x2)
    gen.manual_seed(5)
    mk.GradCache(loss_fn, got, chunk_size=CHUNK, generators=[gen], check_replay=True).step(x1, x2)
    for p, q in zip(got.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= F64_TOL


def test_check_replay_catches_python_random():
    class PythonRandom(nn.Module):
        def forward(self, x):
            return x * random.random()

    model = nn.Sequential(PythonRandom(), nn.Linear(D_IN, D_OUT)).double()
    x1, x2 = make_inputs()
    cache = mk.GradCache(functools.partial(mk.macl_loss, backend="torch"), model, chunk_size=CHUNK,
                         check_replay=True)
    with pytest.raises(RuntimeError, match="re-forward of inputs1 rows 0..4 differs"):
        cache.step(x1, x2)


def test_check_replay_passes_with_dropout():
    s = Setup("dclw", True, True)
    x1, x2 = make_inputs()
    s.cache(check_replay=True).step(x1, x2)


# --- batch statistics -----------------------------------------------------------------------

def test_batchnorm_in_training_mode_is_refused_with_the_fix():
    s = Setup("macl", True, False, norm="batch")
    x1, x2 = make_inputs()
    with pytest.raises(ValueError, match=r"encoder module '2' \(BatchNorm1d\).*GroupNorm.*eval "
                                         r"mode.*allow_batch_statistics=True"):
        s.cache().step(x1, x2)
    s.enc1.eval()  # running statistics: fine for encoder; encoder2 still trains
    with pytest.raises(ValueError, match="encoder2 module '2'"):
        s.cache().step(x1, x2)


def test_batch_statistics_modules_what_depends_on_the_batch():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.SyncBatchNorm(3), nn.InstanceNorm1d(3),
                          nn.GroupNorm(1, 3), nn.LayerNorm(3),
                          nn.BatchNorm1d(3, track_running_stats=False))
    assert [p for p, _ in batch_statistics_modules(model)] == ["0", "1", "5"]
    model.eval()  # eval mode uses running statistics, except without them
    assert [p for p, _ in batch_statistics_modules(model)] == ["5"]
    ddp_like = nn.Sequential()
    ddp_like.add_module("module", nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    assert [p for p, _ in batch_statistics_modules(ddp_like)] == ["module.1"]


def test_group_norm_is_accepted_and_exact():
    x1, x2 = make_inputs()
    ref, got = Setup("macl", False, True, norm="group"), Setup("macl", False, True, norm="group")
    torch.manual_seed(3)
    reference_step(ref, x1, x2)
    torch.manual_seed(3)
    got.cache().step(x1, x2)
    assert max(rel_err(g, w) for g, w in zip(got.grads(), ref.grads())) <= F64_TOL


def test_allow_batch_statistics_is_exact_per_chunk_and_updates_running_stats_once():
    x1, x2 = make_inputs()
    ref = Setup("macl", True, True, norm="batch")
    got = Setup("macl", True, True, norm="batch")
    torch.manual_seed(4)
    reference_step(ref, x1, x2)  # BatchNorm over each chunk: the per-chunk model
    torch.manual_seed(4)
    got.cache(allow_batch_statistics=True).step(x1, x2)
    assert max(rel_err(g, w) for g, w in zip(got.grads(), ref.grads())) <= F64_TOL
    for enc_got, enc_ref in ((got.enc1, ref.enc1), (got.enc2, ref.enc2)):
        for b_got, b_ref in zip(enc_got.buffers(), enc_ref.buffers()):
            assert rel_err(b_got, b_ref) <= F64_TOL  # running mean/var and num_batches_tracked
    # and that model differs from the big-batch one: the opt-in is an approximation
    plain = Setup("macl", True, False, norm="batch")
    cached = Setup("macl", True, False, norm="batch")
    plain_step(plain, x1, x2)
    cached.cache(allow_batch_statistics=True).step(x1, x2)
    assert max(rel_err(g, w) for g, w in zip(cached.grads(), plain.grads())) > 1e-6


# --- mixed precision ----------------------------------------------------------------------------

def test_autocast_bfloat16_matches_the_chunked_reference():
    x1, x2 = make_inputs(torch.float32)
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    got = Setup("macl", True, True, torch.float32)
    torch.manual_seed(9)
    with bf16():
        got.cache().step(x1, x2)
    # (a) the reference with a fresh autocast region per chunk: each chunk's weights are cast
    # (and their gradients cast back to float32) separately, as in the re-forwards
    per_chunk = Setup("macl", True, True, torch.float32)
    torch.manual_seed(9)
    e = []
    for enc, x in ((per_chunk.enc1, x1), (per_chunk.enc2, x2)):
        parts = []
        for c in x.split(CHUNK):
            with bf16():
                parts.append(enc(c))
        e.append(torch.cat(parts))
    per_chunk.loss_fn(*e).backward()
    assert max(rel_err(g, w) for g, w in zip(got.grads(), per_chunk.grads())) <= F32_TOL
    # (b) one autocast region around the whole reference step: autocast casts each weight once
    # and sums its gradient over the chunks in bfloat16 before the cast back, so the two agree to
    # bfloat16 rounding (GradCache sums the chunks in float32)
    one_region = Setup("macl", True, True, torch.float32)
    torch.manual_seed(9)
    reference_step(one_region, x1, x2, autocast=bf16())
    assert max(rel_err(g, w) for g, w in zip(got.grads(), one_region.grads())) <= 2e-2


def test_grad_scaler_scales_every_gradient_and_unscales_to_the_plain_step():
    x1, x2 = make_inputs(torch.float32)
    ref = Setup("clip", True, True, torch.float32)
    got = Setup("clip", True, True, torch.float32)
    torch.manual_seed(11)
    reference_step(ref, x1, x2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt = torch.optim.SGD(got.params(), lr=0.0)
    torch.manual_seed(11)
    loss = got.cache().step(x1, x2, scaler=scaler)
    assert loss.requires_grad is False
    assert max(rel_err(g, 2.0 ** 12 * w) for g, w in zip(got.grads(), ref.grads())) <= F32_TOL
    scaler.unscale_(opt)
    assert max(rel_err(g, w) for g, w in zip(got.grads(), ref.grads())) <= F32_TOL
    scaler.step(opt)
    scaler.update()


# --- validation ---------------------------------------------------------------------------------

def test_validation_names_the_argument():
    enc = make_encoder(0, False)
    loss_fn = functools.partial(mk.macl_loss, backend="torch")
    with pytest.raises(ValueError, match="chunk_size"):
        mk.GradCache(loss_fn, enc, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        mk.GradCache(loss_fn, enc, chunk_size=2.5)
    with pytest.raises(TypeError, match="loss_fn"):
        mk.GradCache("macl", enc, chunk_size=2)
    with pytest.raises(TypeError, match="encoder2"):
        mk.GradCache(loss_fn, enc, 3, chunk_size=2)
    with pytest.raises(TypeError, match="loss_parameters"):
        mk.GradCache(loss_fn, enc, chunk_size=2, loss_parameters=[torch.zeros(())])
    with pytest.raises(TypeError, match="generators"):
        mk.GradCache(loss_fn, enc, chunk_size=2, generators=[0])
    x1, x2 = make_inputs()
    cache = mk.GradCache(loss_fn, enc, chunk_size=4)
    with pytest.raises(TypeError, match="inputs1"):
        cache.step([1, 2], x2)
    with pytest.raises(ValueError, match="inputs2"):
        cache.step(x1, {"a": x2, "b": x2[:3]})
    with pytest.raises(ValueError, match="inputs1 has an empty batch"):
        cache.step(x1[:0], x2)
    none = mk.GradCache(functools.partial(mk.macl_loss, reduction="none", backend="torch"), enc,
                        chunk_size=4)
    with pytest.raises(ValueError, match="scalar"):
        none.step(x1, x2)
    tuple_out = mk.GradCache(loss_fn, lambda x: (enc(x),), chunk_size=4)
    with pytest.raises(TypeError, match="get_rep"):
        tuple_out.step(x1, x2)
    assert "chunk_size=4" in repr(cache)


# --- the example ------------------------------------------------------------------------------

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python",
                       "train_large_batch.py")


@pytest.mark.slow  # subprocesses: the example's exactness table and a short cached training run
def test_example_exactness_table_and_cached_training(tmp_path):
    out = subprocess.run([sys.executable, EXAMPLE, "--exactness", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "exactness.csv").exists() and "worst float64" in out.stdout
    runs = {}
    for chunk in ("0", "16"):
        out = subprocess.run([sys.executable, EXAMPLE, "--batch-size", "48", "--steps", "2",
                              "--cache-chunk", chunk, "--threads", "1", "--dropout", "0"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        runs[chunk] = [line.split()[3] for line in out.stdout.splitlines()
                       if line.startswith("step ")]
    # no dropout, the same seed: the same losses (step 1 follows an SGD update from the cached
    # gradient, so it checks that gradient too)
    assert len(runs["0"]) == 2
    for plain, cached in zip(runs["0"], runs["16"]):
        assert abs(float(plain) - float(cached)) <= 1e-4 * abs(float(plain))


# --- DDP ----------------------------------------------------------------------------------------

DDP_N_GLOBAL = 16
DDP_CHUNK = 3


def _ddp_models():
    return make_encoder(0, False), make_encoder(1, False)


def _ddp_batch():
    return make_inputs(n=DDP_N_GLOBAL, seed=5)


def _ddp_single_process():
    """Plain big-batch steps on the whole global batch (one process)."""
    x1, x2 = _ddp_batch()
    enc, _ = _ddp_models()
    mk.macl_loss(enc(x1), enc(x2), backend="torch").backward()
    shared = [p.grad.clone() for p in enc.parameters()]
    visual, text = _ddp_models()
    log_scale = nn.Parameter(torch.tensor(2.5, dtype=torch.float64))
    mk.clip_loss(visual(x1), text(x2), log_scale.exp(), backend="torch").backward()
    towers = [p.grad.clone() for p in list(visual.parameters()) + list(text.parameters())]
    return shared, towers + [log_scale.grad.clone()]


def _ddp_rank(rank: int, world_size: int, rendezvous: str, out_dir: str) -> int:
    import datetime

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from macl_kernels import distributed as mk_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    models = []
    try:
        x1, x2 = _ddp_batch()
        n = DDP_N_GLOBAL // world_size
        local = slice(rank * n, (rank + 1) * n)
        enc = DDP(_ddp_models()[0])
        models.append(enc)
        buckets_reduced = []

        def counting_hook(state, bucket):  # how many gradient all-reduces DDP launches
            buckets_reduced.append(bucket.index())
            return default_hooks.allreduce_hook(state, bucket)

        enc.register_comm_hook(None, counting_hook)
        loss_fn = functools.partial(mk.macl_loss, gather_distributed=True, backend="torch")
        mk.GradCache(loss_fn, enc, chunk_size=DDP_CHUNK).step(x1[local], x2[local])
        shared = [p.grad.clone() for p in enc.parameters()]
        assert buckets_reduced == [0], buckets_reduced  # one bucket, reduced once, not per chunk
        visual, text = (DDP(m) for m in _ddp_models())
        models += [visual, text]
        log_scale = nn.Parameter(torch.tensor(2.5, dtype=torch.float64))
        clip = mk.GradCache(
            lambda a, b: mk.clip_loss(a, b, log_scale.exp(), gather_distributed=True,
                                      backend="torch"),
            visual, text, chunk_size=DDP_CHUNK, loss_parameters=[log_scale])
        clip.step(x1[local], x2[local])
        towers = [p.grad.clone() for p in list(visual.parameters()) + list(text.parameters())]
        torch.save({"shared": shared, "towers": towers + [log_scale.grad.clone()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        mk_distributed.shutdown(*models)
    return 0


@pytest.mark.slow  # two gloo ranks as subprocesses
def test_ddp_gather_distributed_equals_single_process(tmp_path):
    world_size = 2
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(r), str(world_size),
                               str(tmp_path / "rendezvous"), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world_size)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for r, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {r} failed:\n{out}"
    shared, towers = _ddp_single_process()
    for r in range(world_size):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for g, w in zip(got["shared"], shared):
            assert rel_err(g, w) <= 1e-9, f"rank {r} shared encoder"
        for g, w in zip(got["towers"], towers):
            assert rel_err(g, w) <= 1e-9, f"rank {r} towers / logit scale"


if __name__ == "__main__":
    raise SystemExit(_ddp_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))
