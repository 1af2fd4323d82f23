"""SupCon (docs/math.md#supervised-contrastive-supcon): ``supcon_loss`` against an oracle that
re-implements SupContrast's ``SupConLoss.forward`` semantics (dense, float64), and the
``SupConLoss`` drop-in against one that re-implements pytorch-metric-learning's (cosine
similarity, masked log-sum-exp, ``AvgNonZeroReducer``, the zero-loss rules), on every backend
usable here: loss and input gradients in float64 (and float32 against the float64 oracle), with
anchors without positives, one-class batches, ``V = 1`` and ``V = 3``, both contrast modes, a
float (asymmetric) mask, ``ref_emb``. The reference values of the peers' own runs (float64) are
checked too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import macl_kernels as mk
from conftest import KERNEL_BACKENDS, TOLERANCES, assert_rel_close, backend_device, \
    heavy_on_interpreter

BACKENDS = heavy_on_interpreter(("reference",) + tuple(KERNEL_BACKENDS))
F64 = TOLERANCES["float64"]
F32 = TOLERANCES["float32"]


# --------------------------------------------------------------------------------------------
# Oracles: the peers' semantics, written densely
# --------------------------------------------------------------------------------------------


def supcontrast_oracle(features, labels=None, mask=None, temperature=0.07,
                       base_temperature=0.07, contrast_mode="all"):
    """SupContrast's loss: rows view-major; logits over every row, self masked out of the
    denominator; the mask (labels, explicit, or the identity) tiled over views, self removed; the
    mean log-probability over the positives (divisor 1 where none) times ``-T / Tb``; the mean
    over the anchors."""
    bsz, views = features.shape[:2]
    features = features.reshape(bsz, views, -1)
    if labels is None and mask is None:
        mask = torch.eye(bsz, dtype=features.dtype)
    elif labels is not None:
        mask = (labels[:, None] == labels[None, :]).to(features.dtype)
    else:
        mask = mask.to(features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1))
    anchors = features[:, 0] if contrast_mode == "one" else contrast
    anchor_count = 1 if contrast_mode == "one" else views
    logits = anchors @ contrast.T / temperature
    m = anchors.shape[0]
    not_self = torch.ones_like(logits)
    not_self[torch.arange(m), torch.arange(m)] = 0
    mask = mask.repeat(anchor_count, views) * not_self
    log_prob = logits - torch.logsumexp(logits.masked_fill(not_self == 0, float("-inf")), dim=1,
                                        keepdim=True)
    npos = mask.sum(1)
    npos = torch.where(npos < 1e-6, torch.ones_like(npos), npos)
    per_anchor = -(temperature / base_temperature) * (mask * log_prob).sum(1) / npos
    return per_anchor.mean()


def pml_oracle(embeddings, labels, temperature=0.1, ref_emb=None, ref_labels=None):
    """pytorch-metric-learning's loss: cosine similarities / T; positives same label (self
    removed without ``ref_emb``), negatives other labels; log-sum-exp over both; ``-mean log p``
    over the positives (divisor ``|P| + tiny``); the mean of the losses > 0; 0 for a batch with
    no positive or no negative pair, or at most one of each."""
    own = ref_emb is None
    ref = embeddings if own else ref_emb
    ref_labels = labels if own else ref_labels
    mat = F.normalize(embeddings, dim=1) @ F.normalize(ref, dim=1).T / temperature
    pos = (labels[:, None] == ref_labels[None, :]).to(mat.dtype)
    neg = 1 - pos
    if own:
        pos.fill_diagonal_(0)
    if (pos.sum() <= 1 and neg.sum() <= 1) or not (pos.bool().any() and neg.bool().any()):
        return embeddings.sum() * 0
    keep = (pos + neg).bool()
    lse = torch.logsumexp(mat.masked_fill(~keep, float("-inf")), dim=1, keepdim=True)
    log_prob = mat - lse
    losses = -(pos * log_prob).sum(1) / (pos.sum(1) + torch.finfo(mat.dtype).tiny)
    kept = losses[losses > 0]
    return kept.mean() if kept.numel() else embeddings.sum() * 0


def features_case(bsz, views, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(bsz, views, d, generator=g, dtype=torch.float64),
                       dim=-1).to(dtype)


def grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


# --------------------------------------------------------------------------------------------
# supcon_loss vs SupContrast
# --------------------------------------------------------------------------------------------

SUPCON_CASES = [
    # (bsz, views, d, labels or "mask" or None, T, Tb, mode)
    (6, 2, 4, [0, 1, 0, 2, 1, 0], 0.07, 0.07, "all"),
    (7, 1, 3, [0, 1, 1, 2, 2, 2, 3], 0.1, 0.07, "all"),  # two anchors without a positive
    (4, 3, 5, [0, 0, 1, 1], 0.1, 0.07, "one"),
    (4, 3, 4, None, 0.5, 0.5, "all"),  # SimCLR with V = 3
    (5, 2, 6, "mask", 0.2, 0.1, "all"),  # an asymmetric float mask
    (5, 3, 6, "mask", 0.2, 0.1, "one"),
    (40, 2, 8, "classes3", 0.1, 0.1, "all"),  # 80 rows: several tiles under the interpreter
    (5, 2, 3, [4, 4, 4, 4, 4], 0.3, 0.3, "all"),  # one class: finite in SupContrast
]


def resolve_labels(spec, bsz, seed):
    g = torch.Generator().manual_seed(seed + 100)
    if spec == "mask":
        return None, torch.rand(bsz, bsz, generator=g, dtype=torch.float64).round()
    if spec == "classes3":
        return torch.randint(0, 3, (bsz,), generator=g) * 7 - 5, None  # arbitrary ints
    return (None if spec is None else torch.tensor(spec)), None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(SUPCON_CASES)))
def test_supcon_matches_supcontrast(backend, case):
    bsz, views, d, spec, T, Tb, mode = SUPCON_CASES[case]
    labels, mask = resolve_labels(spec, bsz, case)
    device = backend_device(backend)
    feats = features_case(bsz, views, d, seed=case)

    def ours(f):
        return mk.supcon_loss(f, None if labels is None else labels.to(device),
                              mask=None if mask is None else mask.to(device), temperature=T,
                              base_temperature=Tb, contrast_mode=mode, backend=backend)

    got, (got_grad,) = grads(ours, feats.to(device))
    want, (want_grad,) = grads(lambda f: supcontrast_oracle(f, labels, mask, T, Tb, mode), feats)
    assert_rel_close(got.cpu(), want, F64, "loss")
    assert_rel_close(got_grad.cpu(), want_grad, F64, "d_features")
    # float32 inputs against the float64 oracle on the same rounded inputs
    f32 = feats.float()
    got32, (g32,) = grads(ours, f32.to(device))
    want32, (w32,) = grads(lambda f: supcontrast_oracle(f, labels, mask, T, Tb, mode),
                           f32.double())
    assert got32.dtype == torch.float32
    assert_rel_close(got32.cpu().double(), want32, F32, "loss fp32")
    assert_rel_close(g32.cpu().double(), w32, F32, "d_features fp32")


def test_supcon_peer_reference_values():
    """The values SupContrast's and pytorch-metric-learning's own code give on these inputs
    (float64 runs of the peers, docs/math.md#supervised-contrastive-supcon)."""
    peer = [(0, 9.65903218459301, 9.65903218459302), (1, 6.78247589989721, 6.64682638189927),
            (2, 10.6338136016397, None), (3, 2.51307386841922, 2.51307386841922)]
    seeds = [0, 1, 2, 3]
    for case, supcontrast, pml in peer:
        bsz, views, d, spec, T, Tb, mode = SUPCON_CASES[case]
        g = torch.Generator().manual_seed(seeds[case])
        feats = F.normalize(torch.randn(bsz, views, d, generator=g, dtype=torch.float64), dim=-1)
        labels = None if spec is None else torch.tensor(spec)
        got = mk.supcon_loss(feats, labels, temperature=T, base_temperature=Tb,
                             contrast_mode=mode, backend="cpu").item()
        assert abs(got - supcontrast) <= 1e-9 * abs(supcontrast)
        if pml is not None:
            y = (torch.arange(bsz) if labels is None else labels).repeat(views)
            got = mk.SupConLoss(temperature=T, backend="cpu")(
                torch.cat(torch.unbind(feats, 1)), y).item()
            assert abs(got - pml) <= 1e-9 * abs(pml)


def test_supcon_mean_valid_and_none():
    feats = features_case(7, 1, 3, seed=1)
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 3])
    per = mk.supcon_loss(feats, labels, reduction="none", backend="cpu")
    assert per.shape == (7,) and per[0] == 0 and per[6] == 0
    valid = mk.supcon_loss(feats, labels, reduction="mean_valid", backend="cpu")
    assert_rel_close(valid, per.sum() / 5, F64, "mean_valid")


# --------------------------------------------------------------------------------------------
# SupConLoss vs pytorch-metric-learning
# --------------------------------------------------------------------------------------------

PML_CASES = [
    # (n, d, labels, T, ref: None or (r, ref_labels))
    (12, 4, [0, 1, 0, 2, 1, 0, 0, 1, 0, 2, 1, 0], 0.1, None),
    (7, 3, [0, 1, 1, 2, 2, 2, 3], 0.1, None),  # anchors without a positive are left out
    (5, 3, [1, 1, 1, 1, 1], 0.1, None),  # one class: exactly 0
    (4, 3, [0, 1, 2, 3], 0.1, None),  # no positive pair: exactly 0
    (70, 8, "classes5", 0.07, None),
    (6, 4, [0, 1, 2, 0, 1, 2], 0.2, (9, [0, 0, 1, 1, 5, 5, 2, 7, 7])),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(PML_CASES)))
def test_supconloss_matches_pml(backend, case):
    n, d, labels, T, ref = PML_CASES[case]
    g = torch.Generator().manual_seed(case)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
    labels = (torch.randint(0, 5, (n,), generator=g) if labels == "classes5"
              else torch.tensor(labels))
    device = backend_device(backend)
    criterion = mk.SupConLoss(temperature=T, backend=backend)
    if ref is None:
        got, (got_grad,) = grads(lambda e: criterion(e, labels.to(device)), emb.to(device))
        want, (want_grad,) = grads(lambda e: pml_oracle(e, labels, T), emb)
    else:
        r, ref_labels = ref
        ref_emb = torch.randn(r, d, generator=g, dtype=torch.float64)
        ref_labels = torch.tensor(ref_labels)
        got, got_grad = grads(lambda e, q: criterion(e, labels.to(device), ref_emb=q,
                                                     ref_labels=ref_labels.to(device)),
                              emb.to(device), ref_emb.to(device))
        want, want_grad = grads(lambda e, q: pml_oracle(e, labels, T, q, ref_labels), emb,
                                ref_emb)
    assert_rel_close(got.cpu(), want, F64, "loss")
    for a, b in zip(got_grad if isinstance(got_grad, tuple) else (got_grad,),
                    want_grad if isinstance(want_grad, tuple) else (want_grad,)):
        assert_rel_close(a.cpu(), b, F64, "grad")


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def test_supcon_bad_inputs():
    feats = features_case(4, 2, 3, seed=0)
    with pytest.raises(ValueError, match="labels"):
        mk.supcon_loss(feats, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="labels"):
        mk.supcon_loss(feats, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="mask"):
        mk.supcon_loss(feats, mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="labels or mask"):
        mk.supcon_loss(feats, torch.tensor([0, 1, 2, 3]), mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="V >= 1"):
        mk.supcon_loss(torch.zeros(4, 0, 3))
    with pytest.raises(ValueError, match="features"):
        mk.supcon_loss(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="contrast_mode"):
        mk.supcon_loss(feats, contrast_mode="some")
    with pytest.raises(ValueError, match="temperature"):
        mk.supcon_loss(feats, temperature=0.0)
    criterion = mk.SupConLoss()
    emb, y = feats[:, 0], torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="indices_tuple"):
        criterion(emb, y, indices_tuple=(y, y, y))
    with pytest.raises(ValueError, match="ref_labels"):
        criterion(emb, y, ref_emb=emb)
    with pytest.raises(ValueError, match="labels"):
        criterion(emb, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="distance"):
        mk.SupConLoss(distance=None)


def test_supcon_small_temperature_float32_is_finite():
    """SupContrast subtracts the row maximum including self and overflows in float32 at small
    temperatures (NaN at T = 0.005, docs/math.md); the fused log-sum-exp does not."""
    feats = features_case(6, 2, 4, seed=0, dtype=torch.float32).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    loss = mk.supcon_loss(feats, labels, temperature=0.005, base_temperature=0.07, backend="cpu")
    (grad,) = torch.autograd.grad(loss, feats)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want = supcontrast_oracle(feats.detach().double(), labels, None, 0.005, 0.07)
    assert_rel_close(loss.detach().double(), want, F32, "loss")
