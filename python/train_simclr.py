"""SimCLR on scikit-learn's handwritten digits with any macl-kernels loss, with a linear probe.

    python python/train_simclr.py                                  # MACL, defaults (~1 min, 2 CPUs)
    python python/train_simclr.py --loss infonce --backend torch --batch-size 128 --epochs 10
    python python/train_simclr.py --loss infonce --seed 1 --out runs/infonce_s1
    python python/train_simclr.py --loss macl --backend reference  # the full-matrix oracle
    python python/train_simclr.py --loss supcon     # supervised (SupCon with the train labels)
    python python/train_simclr.py --loss isogclr    # iSogCLR: per-image learned temperatures

The data set is ``sklearn.datasets.load_digits`` (1797 grey 8x8 images, 10 classes), which ships
inside scikit-learn: nothing is downloaded. A fixed stratified split (``--split-seed``) holds out
30% of the images; self-supervised training sees the training images only, without labels
(``--loss supcon`` is the exception: supervised contrastive learning with the training labels).
``--loss sogclr`` / ``isogclr`` (LibAUC's ``GCLoss_v1``) keep per-image state indexed by the
images' positions in the training split; the logged temperature of ``isogclr`` is the batch's mean
learned temperature.

Each step draws two augmented views of every image in the batch (random affine: rotation, scale
and shift of about a pixel; contrast/brightness jitter; Gaussian noise; random erasing of a small
patch; all batched torch ops driven by one seeded ``torch.Generator``), encodes them with a small
CNN (or MLP) and a projection head, and applies the contrastive loss to the projections (layout
``2n``: the ``2B`` views are the anchors). MACL goes through ``macl_kernels.MACLLoss`` so that its
adaptive temperature and the alignment it is derived from are logged from the loss itself; for
the other losses the alignment (mean cosine similarity of the two views' projections) is computed
here. The loss is evaluated on detached copies of the projections so that its forward+backward
can be timed on its own (``loss_ms``); the encoder then back-propagates the loss's gradients,
which is exactly the gradient of the usual single ``loss.backward()``.

After every epoch the frozen backbone features (before the projection head) of the un-augmented
images are evaluated with a cosine kNN classifier (k = 10) and, every ``--probe-every`` epochs and
at the end, a linear probe (standardised features, scikit-learn ``LogisticRegression``), both fit
on the training split and scored on the held-out split. Row 0 is the randomly initialised
encoder. ``summary.json`` adds the raw-pixel baselines (the same probe and kNN on the 64 pixels),
which are strong on this small, clean data set: compare losses against each other and against
them, not against ImageNet numbers.

Outputs in ``--out DIR``: ``curves.csv`` (one row per epoch), ``curves.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import macl_kernels as mk
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import macl_kernels as mk

LOSSES = ("macl", "infonce", "dcl", "dclw", "tfree", "supcon", "sogclr", "isogclr")
CSV_COLUMNS = (
    "epoch", "loss", "temperature", "alignment", "uniformity", "knn_acc", "probe_acc",
    "fewshot_acc",
    "lr", "epoch_s", "loss_ms", "steps",
)
KNN_K = 10
FEWSHOT_LABELS = 5  # labelled images per class of the few-label probe
FEWSHOT_DRAWS = 10  # label subsets it averages over


# --------------------------------------------------------------------------------------------
# Data and augmentations
# --------------------------------------------------------------------------------------------


def load_digits_split(test_size: float = 0.3, split_seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: images ``[n, 1, 8, 8]`` float32 in ``[0, 1]``
    and int64 labels, from the copy of the data set that ships with scikit-learn."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None]  # pixel values are 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target, test_size=test_size,
                                              stratify=digits.target, random_state=split_seed)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
            torch.from_numpy(x_te), torch.from_numpy(y_te).long())


class DigitAugment:
    """Batched random augmentations for 8x8 digits (torch ops only, seeded by a generator).

    Per image: an affine warp (rotation up to ``rotate_deg``, isotropic scale ``1 +- scale``,
    shift up to ``shift_px`` pixels in each direction; bilinear, zero padding), then contrast
    ``x * U(1 - contrast, 1 + contrast)`` and brightness ``+ U(-brightness, brightness)``,
    Gaussian noise of standard deviation ``noise``, and with probability ``erase_p`` one
    ``erase_px x erase_px`` patch set to 0; finally clamped to ``[0, 1]``.
    """

    def __init__(self, rotate_deg: float = 12.0, scale: float = 0.1, shift_px: float = 1.0,
                 contrast: float = 0.3, brightness: float = 0.1, noise: float = 0.05,
                 erase_p: float = 0.5, erase_px: int = 3):
        self.rotate = math.radians(rotate_deg)
        self.scale, self.shift_px = scale, shift_px
        self.contrast, self.brightness, self.noise = contrast, brightness, noise
        self.erase_p, self.erase_px = erase_p, erase_px

    def _uniform(self, n: int, low: float, high: float, gen: torch.Generator, like):
        return low + (high - low) * torch.rand(n, generator=gen, dtype=like.dtype)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        angle = self._uniform(n, -self.rotate, self.rotate, gen, x)
        scale = self._uniform(n, 1 - self.scale, 1 + self.scale, gen, x)
        # affine_grid works in [-1, 1] coordinates: one pixel is 2 / width.
        shift = self._uniform(2 * n, -self.shift_px, self.shift_px, gen, x).view(n, 2)
        shift = shift * torch.tensor([2.0 / w, 2.0 / h], dtype=x.dtype)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        gain = self._uniform(n, 1 - self.contrast, 1 + self.contrast, gen, x).view(n, 1, 1, 1)
        bias = self._uniform(n, -self.brightness, self.brightness, gen, x).view(n, 1, 1, 1)
        out = out * gain + bias
        out = out + self.noise * torch.randn(out.shape, generator=gen, dtype=x.dtype)

        k = self.erase_px
        if self.erase_p > 0 and k > 0:
            erase = torch.rand(n, generator=gen) < self.erase_p
            top = torch.randint(0, h - k + 1, (n,), generator=gen)
            left = torch.randint(0, w - k + 1, (n,), generator=gen)
            rows = torch.arange(h).view(1, h, 1)
            cols = torch.arange(w).view(1, 1, w)
            patch = ((rows >= top.view(n, 1, 1)) & (rows < top.view(n, 1, 1) + k)
                     & (cols >= left.view(n, 1, 1)) & (cols < left.view(n, 1, 1) + k)
                     & erase.view(n, 1, 1))
            out = out.masked_fill(patch.unsqueeze(1), 0.0)
        return out.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def make_backbone(kind: str, width: int) -> Tuple[nn.Module, int]:
    """A small encoder of ``[n, 1, 8, 8]`` images and its feature dimension."""
    if kind == "cnn":
        c1, c2, c3 = width // 4, width // 2, width
        net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c3), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        return net, c3
    if kind == "mlp":
        net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 2 * width, bias=False), nn.BatchNorm1d(2 * width),
            nn.ReLU(), nn.Linear(2 * width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        )
        return net, width
    raise ValueError(f"unknown encoder {kind!r}")


class SimCLRModel(nn.Module):
    """Backbone ``h = f(x)`` (what the probe sees) and projection head ``z = g(h)`` (what the
    loss sees), as in SimCLR."""

    def __init__(self, encoder: str = "cnn", width: int = 128, proj_dim: int = 64):
        super().__init__()
        self.backbone, feat = make_backbone(encoder, width)
        self.head = nn.Sequential(nn.Linear(feat, feat, bias=False), nn.BatchNorm1d(feat),
                                  nn.ReLU(), nn.Linear(feat, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


class Criterion:
    """``loss(z1, z2)`` for ``--loss``, with the temperature and alignment of the last call."""

    def __init__(self, loss: str, backend: str, temperature: float, alpha: float, a0: float,
                 tfree_scale: float, dataset_size: int = 0):
        self.name, self.backend, self.temperature = loss, backend, temperature
        if loss == "macl":
            self.module = mk.MACLLoss(temperature=temperature, alpha=alpha, A_0=a0,
                                      backend=backend)
        if loss in ("sogclr", "isogclr"):
            # LibAUC's defaults (gamma 0.9, constant schedule; iSogCLR tau in [0.05, 0.7])
            self.module = mk.GCLoss_v1(N=dataset_size, tau=temperature,
                                       enable_isogclr=loss == "isogclr", backend=backend)
        kwargs = dict(backend=backend, validate=False)
        self.fn = {
            "macl": lambda z1, z2: self.module(z1, z2),
            # supervised: the training labels; the two views are SupCon's V = 2
            "supcon": lambda z1, z2: mk.supcon_loss(
                torch.stack([F.normalize(z1, dim=1), F.normalize(z2, dim=1)], dim=1),
                self.labels, temperature=temperature, base_temperature=temperature, **kwargs),
            "sogclr": lambda z1, z2: self.module(z1, z2, self.index),
            "isogclr": lambda z1, z2: self.module(z1, z2, self.index),
            "infonce": lambda z1, z2: mk.infonce_loss(z1, z2, temperature=temperature, **kwargs),
            "dcl": lambda z1, z2: mk.dcl_loss(z1, z2, temperature=temperature, **kwargs),
            "dclw": lambda z1, z2: mk.dcl_loss(z1, z2, temperature=temperature, weighted=True,
                                               **kwargs),
            "tfree": lambda z1, z2: mk.tfree_loss(z1, z2, scale=tfree_scale, **kwargs),
        }[loss]

    def __call__(self, z1: torch.Tensor, z2: torch.Tensor, labels=None, index=None):
        """``(loss, temperature or None, alignment)``; the last two detached 0-d tensors.
        ``labels`` (supcon) and ``index`` (the batch's data set indices, sogclr / isogclr)."""
        self.labels, self.index = labels, index
        loss = self.fn(z1, z2)
        if self.name == "macl":
            return loss, self.module.last_temperature, self.module.last_alignment
        if self.name == "isogclr":  # the batch's mean individual temperature
            with torch.no_grad():
                alignment = (F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(1).mean()
            return loss, self.module.learnable_tau[index].mean(), alignment
        with torch.no_grad():
            alignment = (F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(1).mean()
        tau = None if self.name == "tfree" else torch.tensor(self.temperature)
        return loss, tau, alignment


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def features(model: SimCLRModel, x: torch.Tensor, batch: int = 1024):
    """Backbone features and L2-normalised projections, in eval mode."""
    was_training = model.training
    model.eval()
    hs, zs = [], []
    for i in range(0, len(x), batch):
        h = model.backbone(x[i:i + batch])
        hs.append(h)
        zs.append(F.normalize(model.head(h), dim=1))
    model.train(was_training)
    return torch.cat(hs), torch.cat(zs)


def knn_accuracy(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor,
                 y_test: torch.Tensor, k: int = KNN_K) -> float:
    """Cosine kNN with similarity-weighted votes."""
    a = F.normalize(f_train.double(), dim=1)
    b = F.normalize(f_test.double(), dim=1)
    sim, idx = (b @ a.T).topk(k, dim=1)
    votes = torch.zeros(len(b), int(y_train.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, y_train[idx], sim)
    return float((votes.argmax(1) == y_test).double().mean())


def probe_accuracy(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray,
                   y_test: np.ndarray, labels_per_class: Optional[int] = None,
                   draws: int = FEWSHOT_DRAWS, seed: int = 0) -> float:
    """Linear probe: multinomial logistic regression on standardised frozen features.

    ``labels_per_class=None`` fits on every training label. Otherwise it fits on that many
    labelled images per class (the standardisation still uses all training features, which are
    unlabelled data a self-supervised learner has anyway) and returns the mean test accuracy over
    ``draws`` label subsets; the subsets depend on ``seed`` and the labels only, so runs that
    share the split are scored on the same subsets.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f_train)
    s_train, s_test = scaler.transform(f_train), scaler.transform(f_test)
    if labels_per_class is None:
        subsets = [np.arange(len(y_train))]
    else:
        rng = np.random.default_rng(seed)
        subsets = [np.concatenate([rng.choice(np.flatnonzero(y_train == c), labels_per_class,
                                              replace=False) for c in np.unique(y_train)])
                   for _ in range(draws)]
    scores = []
    for idx in subsets:
        clf = LogisticRegression(max_iter=3000, C=1.0)
        clf.fit(s_train[idx], y_train[idx])
        scores.append(clf.score(s_test, y_test))
    return float(np.mean(scores))


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola's uniformity ``log mean_{i != j} exp(-t ||z_i - z_j||^2)`` of unit rows
    (lower = more uniform on the sphere)."""
    z = z.double()
    sq = (2 - 2 * z @ z.T).clamp_min(0)
    n = len(z)
    off = ~torch.eye(n, dtype=torch.bool)
    return float(torch.logsumexp(-t * sq[off], 0) - math.log(n * (n - 1)))


def evaluate(model, data, with_probe: bool, seed: int,
             draws: int = FEWSHOT_DRAWS) -> Dict[str, float]:
    x_tr, y_tr, x_te, y_te = data
    h_tr, _ = features(model, x_tr)
    h_te, z_te = features(model, x_te)
    out = {"knn_acc": knn_accuracy(h_tr, y_tr, h_te, y_te), "uniformity": uniformity(z_te)}
    if with_probe:
        f_tr, f_te = h_tr.double().numpy(), h_te.double().numpy()
        out["probe_acc"] = probe_accuracy(f_tr, y_tr.numpy(), f_te, y_te.numpy())
        out["fewshot_acc"] = probe_accuracy(f_tr, y_tr.numpy(), f_te, y_te.numpy(),
                                            FEWSHOT_LABELS, draws=draws, seed=seed)
    return out


_PIXEL_CACHE: Dict[tuple, Dict[str, float]] = {}


def pixel_baselines(data, seed: int = 0, draws: int = FEWSHOT_DRAWS,
                    key: Optional[tuple] = None) -> Dict[str, float]:
    """The same probe and kNN on the raw 64 pixels: what the encoder has to beat (cached per
    ``key``, e.g. the split, for scripts that train several models in one process)."""
    if key is not None and key in _PIXEL_CACHE:
        return dict(_PIXEL_CACHE[key])
    result = _pixel_baselines(data, seed, draws)
    if key is not None:
        _PIXEL_CACHE[key] = dict(result)
    return result


def _pixel_baselines(data, seed: int, draws: int) -> Dict[str, float]:
    x_tr, y_tr, x_te, y_te = data
    p_tr, p_te = x_tr.flatten(1), x_te.flatten(1)
    f_tr, f_te = p_tr.double().numpy(), p_te.double().numpy()
    return {"pixels_probe_acc": probe_accuracy(f_tr, y_tr.numpy(), f_te, y_te.numpy()),
            "pixels_fewshot_acc": probe_accuracy(f_tr, y_tr.numpy(), f_te, y_te.numpy(),
                                                 FEWSHOT_LABELS, draws=draws, seed=seed),
            "pixels_knn_acc": knn_accuracy(p_tr, y_tr, p_te, y_te)}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="SimCLR on scikit-learn's 8x8 handwritten digits with a macl-kernels loss; "
                    "per-epoch loss, temperature, alignment, kNN and linear-probe accuracy.")
    p.add_argument("--loss", choices=LOSSES, default="macl", help="contrastive loss (default macl)")
    p.add_argument("--backend", default="auto",
                   help="macl_kernels backend: auto (default), reference, torch, triton, cpu, cuda")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (default 256; "
                                                               "2x as many views)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    p.add_argument("--seed", type=int, default=0, help="model init, batches and augmentations")
    p.add_argument("--split-seed", type=int, default=0,
                   help="train/test split (default 0; keep it fixed when comparing runs)")
    p.add_argument("--test-size", type=float, default=0.3, help="held-out fraction (default 0.3)")
    p.add_argument("--out", default=None,
                   help="output directory (default runs/train_simclr/<loss>_<backend>_s<seed>)")
    p.add_argument("--encoder", choices=("cnn", "mlp"), default="cnn", help="default cnn")
    p.add_argument("--width", type=int, default=128, help="backbone feature dimension")
    p.add_argument("--proj-dim", type=int, default=64, help="projection dimension (loss input)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=0.1,
                   help="tau (InfoNCE, DCL, DCLW) or MACL's tau_0 (default 0.1)")
    p.add_argument("--alpha", type=float, default=0.5, help="MACL alpha (default 0.5)")
    p.add_argument("--a0", type=float, default=0.0, help="MACL A_0 (default 0)")
    p.add_argument("--tfree-scale", type=float, default=2.0,
                   help="temperature-free loss scale (default 2)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="model and data dtype (float64: backend comparisons to rounding)")
    p.add_argument("--probe-every", type=int, default=5,
                   help="linear probe every N epochs and at the end (kNN runs every epoch)")
    p.add_argument("--fewshot-draws", type=int, default=FEWSHOT_DRAWS,
                   help=f"label subsets the 5-shot probe averages over (default {FEWSHOT_DRAWS})")
    p.add_argument("--max-steps", type=int, default=None,
                   help="at most this many steps per epoch (smoke tests; default: every batch)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-plot", action="store_true", help="skip curves.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no per-epoch log lines")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (contrastive losses need negatives)")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.probe_every < 1:
        parser.error("--probe-every must be >= 1")
    if args.fewshot_draws < 1 or (args.max_steps is not None and args.max_steps < 1):
        parser.error("--fewshot-draws and --max-steps must be >= 1")
    available = mk.available_backends("cpu")
    if args.backend != "auto":
        if args.backend not in available:
            parser.error(f"unknown backend {args.backend!r}; choose from "
                         f"{['auto', *available]}")
        if available[args.backend] is not None:
            parser.error(f"backend {args.backend!r} is not usable here: "
                         f"{available[args.backend]}")
    # What runs (the README's `auto` order): an explicit backend itself; "auto" on the CPU takes the
    # fused C++ backend "cpu" when it is usable here, otherwise "torch".
    args.resolved_backend = (args.backend if args.backend != "auto" else
                             next(b for b in ("cpu", "torch") if available[b] is None))
    if args.out is None:
        args.out = os.path.join("runs", "train_simclr",
                                f"{args.loss}_{args.backend}_s{args.seed}")
    return args


def _log(bar, text: str) -> None:
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def train(args: argparse.Namespace) -> Dict:
    """Train, evaluate every epoch, write the outputs; return ``{"rows", "summary"}``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = [t.to(dtype) if t.is_floating_point() else t
            for t in load_digits_split(args.test_size, args.split_seed)]
    x_train = data[0]
    n_train = len(x_train)
    if args.batch_size > n_train:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {n_train} training images")
    steps_per_epoch = n_train // args.batch_size  # drop_last: every step has the same batch
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)

    model = SimCLRModel(args.encoder, args.width, args.proj_dim).to(dtype)
    augment = DigitAugment()
    criterion = Criterion(args.loss, args.backend, args.temperature, args.alpha, args.a0,
                          args.tfree_scale, dataset_size=n_train)
    y_train = data[1]
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)

    rows: List[Dict] = []
    row0 = {"epoch": 0, "steps": 0,
            **evaluate(model, data, True, args.split_seed, args.fewshot_draws)}
    rows.append(row0)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.epochs, desc=f"simclr {args.loss}", unit="epoch", file=sys.stderr,
                   dynamic_ncols=True)
    if not args.quiet:
        _log(bar, f"digits: {n_train} train / {len(data[2])} test images, batch "
                  f"{args.batch_size} ({2 * args.batch_size} views), {steps_per_epoch} steps/"
                  f"epoch, loss {args.loss}, backend {args.backend} "
                  f"({args.resolved_backend}), {args.encoder} encoder, "
                  f"{args.dtype}, seed {args.seed}")
        _log(bar, f"epoch 0 (init): kNN {row0['knn_acc']:.4f}  probe {row0['probe_acc']:.4f}  "
                  f"{FEWSHOT_LABELS}-shot {row0['fewshot_acc']:.4f}")
    model.train()
    for epoch in range(1, args.epochs + 1):
        t_epoch = time.perf_counter()
        loss_s = 0.0
        sums = {"loss": 0.0, "temperature": 0.0, "alignment": 0.0}
        if args.loss in ("sogclr", "isogclr"):  # LibAUC's schedule: gamma 1 in epoch 0
            criterion.module.adjust_gamma(epoch - 1)
        perm = torch.randperm(n_train, generator=gen)
        for step in range(steps_per_epoch):
            index = perm[step * args.batch_size:(step + 1) * args.batch_size]
            x = x_train[index]
            views = torch.cat([augment(x, gen), augment(x, gen)])
            z1, z2 = model(views).chunk(2)
            # The loss on detached leaves: its forward+backward timed alone, then the encoder's
            # backward from the loss's gradients (the same gradient as one loss.backward()).
            l1, l2 = z1.detach().requires_grad_(), z2.detach().requires_grad_()
            t0 = time.perf_counter()
            loss, tau, align = criterion(l1, l2, labels=y_train[index], index=index)
            loss.backward()
            loss_s += time.perf_counter() - t0
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward([z1, z2], [l1.grad, l2.grad])
            opt.step()
            sched.step()
            sums["loss"] += float(loss.detach())
            sums["temperature"] += float(tau) if tau is not None else float("nan")
            sums["alignment"] += float(align)
        epoch_s = time.perf_counter() - t_epoch
        with_probe = epoch % args.probe_every == 0 or epoch == args.epochs
        row = {"epoch": epoch, "steps": steps_per_epoch,
               **{k: v / steps_per_epoch for k, v in sums.items()},
               "lr": sched.get_last_lr()[0], "epoch_s": epoch_s,
               "loss_ms": 1e3 * loss_s / steps_per_epoch,
               **evaluate(model, data, with_probe, args.split_seed, args.fewshot_draws)}
        if row["temperature"] != row["temperature"]:  # tfree has no temperature
            row["temperature"] = None
        rows.append(row)
        if not args.quiet:
            tau_text = f"{row['temperature']:.4f}" if row["temperature"] is not None else "-"
            probe = (f"  probe {row['probe_acc']:.4f}  {FEWSHOT_LABELS}-shot "
                     f"{row['fewshot_acc']:.4f}" if with_probe else "")
            _log(bar, f"epoch {epoch:3d}  loss {row['loss']:.4f}  tau {tau_text}  "
                      f"A {row['alignment']:.4f}  unif {row['uniformity']:.3f}  "
                      f"kNN {row['knn_acc']:.4f}{probe}  {epoch_s:.2f} s "
                      f"(loss {row['loss_ms']:.1f} ms/step)")
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", A=f"{row['alignment']:.3f}",
                            knn=f"{row['knn_acc']:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()

    final = rows[-1]
    trained = rows[1:]
    summary = {
        "args": vars(args),
        "final_probe_acc": final["probe_acc"], "final_fewshot_acc": final["fewshot_acc"],
        "final_knn_acc": final["knn_acc"],
        "init_probe_acc": row0["probe_acc"], "init_fewshot_acc": row0["fewshot_acc"],
        "init_knn_acc": row0["knn_acc"],
        **pixel_baselines(data, args.split_seed, args.fewshot_draws,
                          key=(args.test_size, args.split_seed, args.fewshot_draws)),
        "mean_epoch_s": float(np.mean([r["epoch_s"] for r in trained])),
        "median_epoch_s": float(np.median([r["epoch_s"] for r in trained])),
        "mean_loss_ms_per_step": float(np.mean([r["loss_ms"] for r in trained])),
        "n_train": n_train, "n_test": len(data[2]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "macl_kernels": mk.__version__,
                    "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
    }
    write_outputs(args.out, rows, summary, plot=not args.no_plot)
    if not args.quiet:
        print(f"final: linear probe {final['probe_acc']:.4f}, {FEWSHOT_LABELS}-shot probe "
              f"{final['fewshot_acc']:.4f}, kNN {final['knn_acc']:.4f} (init encoder "
              f"{row0['probe_acc']:.4f} / {row0['fewshot_acc']:.4f} / {row0['knn_acc']:.4f}; "
              f"raw pixels {summary['pixels_probe_acc']:.4f} / "
              f"{summary['pixels_fewshot_acc']:.4f} / {summary['pixels_knn_acc']:.4f}); "
              f"{summary['mean_epoch_s']:.2f} s/epoch; wrote {args.out}", flush=True)
    return {"rows": rows, "summary": summary}


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def write_csv(path: str, rows: Sequence[Dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})


def plot_curves(path: str, runs: Dict[str, Sequence[Dict]], title: str) -> None:
    """Loss, temperature, alignment and accuracy against the epoch; one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("loss", "training loss (mean over the epoch)"),
              ("temperature", "temperature tau (MACL: tau(A))"),
              ("alignment", "alignment A (mean positive cosine)"),
              ("accuracy", "held-out accuracy")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (key, label), ax in zip(panels, axes.flat):
        for i, (name, rows) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            if key == "accuracy":
                knn = [(r["epoch"], r["knn_acc"]) for r in rows]
                probe = [(r["epoch"], r["probe_acc"]) for r in rows
                         if r.get("probe_acc") is not None]
                ax.plot(*zip(*knn), "-", color=color, alpha=0.6, label=f"{name} kNN")
                ax.plot(*zip(*probe), "o--", color=color, ms=4, label=f"{name} linear probe")
            else:
                pts = [(r["epoch"], r[key]) for r in rows[1:] if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), "-", color=color, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir: str, rows: Sequence[Dict], summary: Dict, plot: bool = True) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, "curves.csv"), rows)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    if plot:
        a = summary["args"]
        plot_curves(os.path.join(out_dir, "curves.png"), {a["loss"]: rows},
                    f"SimCLR on digits: {a['loss']} ({a['resolved_backend']} backend), batch "
                    f"{a['batch_size']}, seed {a['seed']}; final probe "
                    f"{summary['final_probe_acc']:.3f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
