"""
FID (equal to pytorch-fid), Inception Score, and FD-shapes, an offline Frechet distance for the
built-in data.

    python fid.py samples/ cifar10-train                  # FID-N of a folder of images against
                                                          # CIFAR-10 train
    python fid.py samples/ VIRTUAL_imagenet256_labeled.npz --is   # against ADM's reference
                                                                  # mu/sigma, plus IS
    python fid.py cifar10-train --save-stats cifar10_train.npz     # reference stats, pytorch-fid's
                                                                   # npz format
    python fid.py samples/ shapes-test --metric fd-shapes          # offline, built-in data only
    python sample.py ckpt.pt --fid-ref ref.npz --cfg-scales 3,3.2   # FID of samples, in memory

8-bit images: everything is measured as an 8-bit PNG stores it. Image files and the datasets
are 8-bit already. Generated images and reconstructions go through to_uint8, in memory
(generated_features: sample.py's FID and CFG search, train.py's evaluation). to_uint8 clamps and
truncates, as the released UNITE code does before torch-fidelity (utils/fid.py:80) and before its
PNGs (engines/eval.py:529).

Protocol (pytorch-fid's): images as floats in [0, 1] -> bilinear resize to 299x299
(align_corners=False) -> 2x-1 -> the TF 2015-12-05 Inception v3 as pytorch-fid ports it -> 2048-d
pool3 features -> mu, sigma in float64 -> FD = |mu1-mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^1/2). No
scipy.linalg.sqrtm: tr((s1 s2)^1/2) is the sum of square roots of the eigenvalues of the symmetric
F^T s1 F, with F F^T = s2 (Cholesky; eigh if s2 is singular).
FID is biased upward at small N: quote N (FID-10000, FID-50000) and compare only at equal N. Stats
made by another pipeline (ADM's reference batches come from the TF graph) are close to, not
identical with, ours.
Inception Score: softmax over all 1008 logits without the fc bias, 10 splits in order
(openai/improved-gan's inception_score.py; torch-fidelity's "logits_unbiased" is the same, but it
shuffles before splitting).

FD-shapes: the Inception weights may be unavailable offline, so for the built-in "shapes" data we
train (once, deterministically, ~50 s on one core, cached) a small CNN on the attribute labels and
compare its 256-d penultimate features. It is NOT FID and is not comparable with any published
number. Scale, against the 10k test-split stats (shapes v3): real train images give 31.9 at N=500,
8.3 at N=2000 and 3.0 at N=10000 (what a perfect generator gets at that N; 20 disjoint sets of 500
span 22-34); colour channels rotated 79, 2x box-blurred images 301, one image repeated 2874, uniform
noise 10986 (N=2000; docs/experiments.md).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from data import UserError, error_line, to_uint8  # noqa: F401 (fid.to_uint8 is public)

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# sha256 of that file as several independent public projects pin it (torch-fidelity's mirror of it,
# weights-inception-2015-12-05-6726825d.pth, has the same hash; one project also pins 95,628,359
# bytes). It could not be checked against the file here (no download). pytorch-fid itself checks
# nothing; its name suffix is the torch.hub convention, the first 8 hex digits of the sha256, which
# the assert below holds us to.
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
assert FID_WEIGHTS_SHA256.startswith(FID_WEIGHTS_URL.rsplit("-", 1)[1][:8])

# -----------------------------------------------------------------------------
# the FID Inception v3: torchvision's block structure with pytorch-fid's TF patches, the weight
# file's key names


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, k, s=1, p=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


def _avg3(x):
    # Patch (TF): the 3x3 average pool divides by the number of real pixels, padded zeros are not
    # counted
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/c/d at 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, p=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = (BasicConv2d(64, 96, 3, p=1),
                                                    BasicConv2d(96, 96, 3, p=1))
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, s=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = (BasicConv2d(64, 96, 3, p=1),
                                                    BasicConv2d(96, 96, 3, s=2))

    def forward(self, x):
        return torch.cat([self.branch3x3(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2,
                                                    self.branch3x3dbl_3), F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e at 17x17, factorised 7x7 convs
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(k=(1, 7), p=(0, 3)), dict(k=(7, 1), p=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = BasicConv2d(cin, c7, 1), BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = (BasicConv2d(cin, c7, 1),
                                                    BasicConv2d(c7, c7, **col))
        self.branch7x7dbl_3, self.branch7x7dbl_4 = (BasicConv2d(c7, c7, **row),
                                                    BasicConv2d(c7, c7, **col))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3)
        b7dbl = _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                       self.branch7x7dbl_4, self.branch7x7dbl_5)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, s=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), p=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), p=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, s=2)

    def forward(self, x):
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                                 self.branch7x7x3_4), F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):  # Mixed_7b/c at 8x8, split 1x3 / 3x1 heads
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        row, col = dict(k=(1, 3), p=(0, 1)), dict(k=(3, 1), p=(1, 0))
        self.branch3x3_2a, self.branch3x3_2b = (BasicConv2d(384, 384, **row),
                                                BasicConv2d(384, 384, **col))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = (BasicConv2d(cin, 448, 1),
                                                    BasicConv2d(448, 384, 3, p=1))
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = (BasicConv2d(384, 384, **row),
                                                      BasicConv2d(384, 384, **col))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        # Patch (TF): the last block (Mixed_7c) max-pools here where the paper and torchvision
        # average-pool
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """FID Inception. forward(x): (N, 3, H, W) floats in [0, 1] -> (N, 2048) pool3 features;
    logits(features) -> (N, 1008) logits without the fc bias (for the Inception Score).
    weights_path: a file used as given (warning if it is not the official one); None: cache dir or
    download, sha256-checked; pretrained=False: random weights (tests only). .sha256 holds the
    loaded file's sha256."""

    def __init__(self, weights_path=None, pretrained=True):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = BasicConv2d(3, 32, 3, s=2), BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = BasicConv2d(32, 64, 3, p=1), BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (InceptionA(192, 32), InceptionA(256, 64),
                                                       InceptionA(288, 64))
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = (InceptionD(768), InceptionE(1280, False),
                                                       InceptionE(2048, True))
        self.fc = nn.Linear(2048, 1008)  # TF's 1008 classes: 1000 ImageNet classes + 8 unused
        self.sha256 = None
        if pretrained:
            self.sha256 = load_inception_weights(self, weights_path)
        self.eval().requires_grad_(False)  # important! BatchNorm must use the stored statistics

    def forward(self, x):
        # pytorch-fid's resize
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1                                                       # [0, 1] -> [-1, 1]
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3,
                   self.Conv2d_2b_3x3)                                      # (N, 64, 147, 147)
        x = _chain(F.max_pool2d(x, 3, 2), self.Conv2d_3b_1x1,
                   self.Conv2d_4a_3x3)                                      # (N, 192, 71, 71)
        x = _chain(F.max_pool2d(x, 3, 2), self.Mixed_5b, self.Mixed_5c,
                   self.Mixed_5d,                                           # (N, 288, 35, 35)
                   self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d,
                   self.Mixed_6e)                                           # (N, 768, 17, 17)
        x = _chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)          # (N, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)                       # (N, 2048) pool3

    def logits(self, features):
        # no bias, as the original IS code (it reads the weights of TF's softmax/logits/MatMul)
        return features.to(self.fc.weight) @ self.fc.weight.T  # (N, 1008)


def load_inception_weights(net, path=None):
    """Load the FID Inception weights into net; return the file's sha256. Errors are one-line
    UserErrors."""
    if path is None:
        name = FID_WEIGHTS_URL.rsplit("/", 1)[1]
        path = data.download(FID_WEIGHTS_URL, os.path.join(data.cache_dir(), name), "sha256",
                             FID_WEIGHTS_SHA256)
    elif not os.path.isfile(path):
        raise UserError(f"Inception weight file not found: {path}")
    sha = data.file_hash(path)
    if sha != FID_WEIGHTS_SHA256:
        print(f"warning: {path} has sha256 {sha[:8]}..., not the official FID Inception file "
              f"({FID_WEIGHTS_SHA256[:8]}...): these numbers are not comparable with published "
              "FIDs", file=sys.stderr)
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise UserError(f"{path} is not an FID Inception state dict "
                        f"({type(e).__name__}: {msg})") from None
    return sha


# -----------------------------------------------------------------------------
# statistics, Frechet distance, Inception Score (float64 numpy on CPU)

def feature_stats(features):
    """(N, D) features -> mu (D,), sigma (D, D), both float64. Refuses N < 2; warns when N < D
    (singular sigma)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise UserError(f"need at least 2 images for statistics, got {len(f)}")
    if len(f) < f.shape[1]:
        print(f"warning: {len(f)} images < {f.shape[1]} feature dims: sigma is singular and the "
              f"distance is strongly biased; use >= {f.shape[1]} (papers use 50000)",
              file=sys.stderr)
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_factor(s):
    """F with F F^T = s: the Cholesky factor if s is positive definite (2x faster than eigh), else
    s^1/2 = V sqrt(max(w, 0)) V^T from eigh (s singular, e.g. from fewer images than dimensions)."""
    try:
        return np.linalg.cholesky(s)
    except np.linalg.LinAlgError:
        w, V = np.linalg.eigh(s)
        return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1-mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^1/2) as a float. s1 s2 = s1 F F^T is similar to
    the symmetric PSD M = F^T s1 F, so tr((s1 s2)^1/2) = sum sqrt(eig(M)): real, never fails, and no
    scipy.linalg.sqrtm."""
    mu1, mu2 = (np.atleast_1d(np.asarray(mu1, np.float64)),
                np.atleast_1d(np.asarray(mu2, np.float64)))
    s1, s2 = (np.atleast_2d(np.asarray(sigma1, np.float64)),
              np.atleast_2d(np.asarray(sigma2, np.float64)))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {s1.shape} vs {s2.shape} (stats from different feature networks?)")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise UserError("statistics contain NaN or inf")
    # s2 is usually the reference, from many images: positive definite, fast path
    root2 = _psd_factor(s2)
    M = root2.T @ s1 @ root2
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    return float(max(fd, 0.0))  # rounding can give -1e-12 for identical stats


def inception_score(logits_or_probs, splits=10):
    """(mean, std) of exp(E_x KL(p(y|x) || p(y))) over `splits` consecutive chunks. Rows that are
    already probabilities (non-negative, summing to 1) are used as they are; anything else is
    softmaxed."""
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if len(x) < splits:
        raise UserError(f"Inception Score needs at least {splits} images, got {len(x)}")
    if (x >= 0).all() and np.allclose(x.sum(1), 1):
        logp = np.log(np.clip(x, 1e-300, None))
    else:
        logp = x - x.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))  # log-softmax, (N, C)
    scores = []
    for k in range(splits):
        lp = logp[k * len(x) // splits:(k + 1) * len(x) // splits]
        log_py = np.log(np.exp(lp).mean(0))  # log p(y) over this split, (C,)
        scores.append(np.exp((np.exp(lp) * (lp - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# -----------------------------------------------------------------------------
# feature extraction, and gathering features across DDP ranks

def _as_batch(items, net):
    """A list of (3, H, W) tensors (uint8 0..255 or floats in [0, 1]) -> (B, 3, H, W) floats in
    [0, 1]."""
    x = [t.float() / 255 if t.dtype == torch.uint8 else t.float() for t in items]
    if any(t.shape != x[0].shape for t in x):  # mixed sizes: resize one by one as the network would
        if not isinstance(net, InceptionV3):
            raise UserError(f"images of different sizes ({tuple(x[0].shape)} and others)")
        x = [F.interpolate(t[None], size=(299, 299), mode="bilinear", align_corners=False)[0]
             for t in x]
    # NCHW as pytorch-fid's loader: conv kernels (and roundings) follow the layout
    x = torch.stack(x).contiguous()
    if x.amin() < -1e-3 or x.amax() > 1 + 1e-3:
        raise UserError(f"images must be in [0, 1], got values in "
                        f"[{x.amin():.2f}, {x.amax():.2f}]: clamp them, or map [-1, 1] samples "
                        "with (x + 1) / 2")
    return x


@torch.inference_mode()
def extract_features(net, images, batch_size=50, device="cpu", num_workers=0, progress=True):
    """(N, D) float32 numpy features of images: a tensor (N, 3, H, W) or a Dataset of (3, H, W)
    tensors, uint8 0..255 or floats in [0, 1] (e.g. a folder). net: InceptionV3 or ShapesNet,
    already on device."""
    if torch.is_tensor(images):
        batches = (list(images[i:i + batch_size]) for i in range(0, len(images), batch_size))
    else:
        batches = torch.utils.data.DataLoader(images, batch_size, num_workers=num_workers,
                                              collate_fn=list)
    total = (len(images) + batch_size - 1) // batch_size
    out = [net(_as_batch(b, net).to(device)).float().cpu()
           for b in tqdm(batches, total=total, disable=not progress, leave=False, file=sys.stderr)]
    return torch.cat(out).numpy()


def gather_features(features):
    """Every rank's (n_rank, D) features -> all ranks' (sum n_rank, D), in rank order, on every rank
    (uneven n_rank allowed). train.py generates its FID samples sharded across ranks; identity
    without DDP."""
    if not (dist.is_available() and dist.is_initialized()):
        return features
    n = torch.tensor([len(features)], device=features.device)
    ns = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(ns, n)
    padded = features.new_zeros((int(max(ns)), features.shape[1]))  # all_gather needs equal shapes
    padded[:len(features)] = features
    out = [torch.empty_like(padded) for _ in ns]
    dist.all_gather(out, padded)
    return torch.cat([o[:int(k)] for o, k in zip(out, ns)])


# -----------------------------------------------------------------------------
# 8-bit images and the evaluation loops shared by train.py and sample.py

def quantize_8bit(x):
    """x as an 8-bit image (a PNG) stores it, as floats in [0, 1]: what FID and PSNR measure."""
    return to_uint8(x).float() / 255


def psnr_8bit(recon, ref):
    """Per-image PSNR (N,) float64 in dB of 8-bit images (uint8, or floats in [0, 1] put through
    to_uint8), as the released utils/eval_metrics.py compute_psnr: 20 log10(255 / sqrt(mse)) on the
    0..255 scale, mse floored at 1e-10; its figure is the mean over images (engines/eval.py:532)."""
    a, b = (t if t.dtype == torch.uint8 else to_uint8(t) for t in (recon, ref))
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 20 * torch.log10(255 / mse.sqrt())


def shard(n, rank=0, world=1):
    """Evaluation item i is made on rank i % world; gather_features returns them rank by rank."""
    return list(range(rank, n, world))


@torch.inference_mode()
def generated_features(sample_fn, feature_fn, n, batch_size=100, rank=0, world=1):
    """(n, D) float64 numpy features of n generated images, on every rank. sample_fn(indices) ->
    images (B, 3, H, W) in [0, 1]; feature_fn(images) -> (B, D): InceptionV3, ShapesNet or any
    function. The images are made 8-bit first (quantize_8bit): the features are those of the PNGs
    sample.py writes, but none is written (in memory, as the released engines/eval.py:181-192)."""
    if n < world:
        raise UserError(f"{n} evaluation samples for {world} processes: ask for at least one each")
    idx = shard(n, rank, world)
    feats = [feature_fn(quantize_8bit(sample_fn(idx[i:i + batch_size]))).float()
             for i in range(0, len(idx), batch_size)]
    return gather_features(torch.cat(feats)).cpu().double().numpy()


def rank0_first(build):
    """build(), under DDP on rank 0 first (it may download or train a network and cache it), then on
    the other ranks, which read the cached file."""
    ddp = dist.is_available() and dist.is_initialized()
    out = build() if not ddp or dist.get_rank() == 0 else None
    if ddp:
        dist.barrier()
    return out if out is not None else build()


def load_inception(weights_path=None, device="cpu"):
    """The FID InceptionV3 on device (DDP-safe: rank0_first)."""
    return rank0_first(lambda: InceptionV3(weights_path)).to(device).eval()


def load_stats(path):
    """(mu, sigma) float64 of a statistics .npz (fid.py --save-stats, pytorch-fid, ADM's, JiT's)."""
    if not (path.lower().endswith(".npz") and os.path.isfile(path)):
        raise UserError(f"reference statistics not found: {path} (make them with python fid.py "
                        f"IMAGES --save-stats STATS.npz)")
    x = load_input(path)
    if not isinstance(x, tuple):
        raise UserError(f"{path} holds images, not mu/sigma: python fid.py {path} --save-stats "
                        f"STATS.npz")
    return np.asarray(x[0], np.float64), np.asarray(x[1], np.float64)


def protocol_note(net):
    """What made a score: printed with every FID / FD."""
    if isinstance(net, InceptionV3):
        official = net.sha256 == FID_WEIGHTS_SHA256
        note = "" if official else ", NOT the official weights: not comparable"
        return f"pytorch-fid protocol, inception sha256 {(net.sha256 or '?')[:8]}...{note}"
    if isinstance(net, ShapesNet):
        return "ShapesNet 256-d penultimate features; not FID, not comparable with FIDs"
    return f"features of {getattr(net, '__name__', type(net).__name__)}; not FID"


# -----------------------------------------------------------------------------
# FD-shapes: an offline Frechet distance for the built-in shapes data (not FID)

class ShapesNet(nn.Module):
    """Small CNN predicting every attribute of a 32x32 shapes image (data.ATTRIBUTES) from a 256-d
    feature; forward(x) (N, 3, 32, 32) in [0, 1] -> (N, 256) penultimate features, the ones
    FD-shapes compares."""

    def __init__(self, width=16, dim=256):
        super().__init__()
        layers, cin = [], 3
        for cout in (width, 2 * width, 4 * width):  # 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * 16, dim), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(dim, v) for k, v in data.ATTRIBUTES.items()})

    def forward(self, x):
        if x.shape[-2:] != (32, 32):
            raise UserError(f"FD-shapes needs 32x32 images, got {x.shape[-2]}x{x.shape[-1]}")
        # NCHW: results must not depend on the memory layout
        return self.body((x.contiguous() - 0.5) / 0.25)


def train_shapes_net(steps=600, n_train=20000, seed=0, batch_size=64):
    """ShapesNet trained on the shapes train split: Adam, summed cross-entropy over all attribute
    heads, lr warm-up then linear decay. Call it single-threaded for a result that is the same on
    every machine."""
    ds = data.shapes_dataset("train", n_train)
    # (N, 3, 32, 32) uint8
    x_all, y_all = ds.images, {k: torch.from_numpy(v) for k, v in ds.attrs.items()}
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG state
        torch.manual_seed(seed)
        net, g = ShapesNet(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1, (step + 1) / 50) * (1 - step / steps)
        idx = torch.randint(0, n_train, (batch_size,), generator=g)
        feats = net(x_all[idx].float() / 255)
        loss = sum(F.cross_entropy(head(feats), y_all[k][idx]) for k, head in net.heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def _train_and_cache_shapes_net(path, steps, n_train, n_test):
    threads, t0 = torch.get_num_threads(), time.time()
    torch.set_num_threads(1)  # bitwise-deterministic training and reference statistics
    try:
        net, test = train_shapes_net(steps, n_train), data.shapes_dataset("test", n_test)
        # (n_test, 256)
        feats = torch.from_numpy(extract_features(net, test.images, 500, progress=False))
        mu, sigma = feature_stats(feats.numpy())
        acc = {k: (h(feats).argmax(1).numpy() == test.attrs[k]).mean().item()
               for k, h in net.heads.items()}
    finally:
        torch.set_num_threads(threads)
    print(f"ShapesNet: trained {steps} steps in {time.time() - t0:.0f}s, "
          f"test accuracy: shape {acc['shape']:.2%}, "
          f"mean over attributes {np.mean(list(acc.values())):.2%}; cached at {path}",
          file=sys.stderr)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: DDP ranks may all train at once
    torch.save({"model": net.state_dict(), "mu": torch.from_numpy(mu),
                "sigma": torch.from_numpy(sigma), "test_acc": acc}, tmp)
    os.replace(tmp, path)  # atomic: never a half-written cache file


def load_shapes_net(device="cpu", steps=600, n_train=20000, n_test=10000):
    """The frozen FD-shapes network, trained once (~1 min) and cached in the cache dir together with
    its reference statistics (.ref_mu, .ref_sigma: the test split's features) and test accuracies
    (.test_acc)."""
    default = (steps, n_train, n_test) == (600, 20000, 10000)
    tag = f"shapes_fd_net_d{data.SHAPES_VERSION}"  # one cached net per version of the built-in data
    name = f"{tag}.pt" if default else f"{tag}_{steps}_{n_train}_{n_test}.pt"
    path = os.path.join(data.cache_dir(), name)
    if not os.path.exists(path):
        _train_and_cache_shapes_net(path, steps, n_train, n_test)
    with torch.random.fork_rng(devices=[]):  # building the module must not move the caller's RNG
        net = ShapesNet()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(ckpt["model"])
    except Exception as e:
        raise UserError(f"corrupt cache file {path} ({type(e).__name__}): "
                        "delete it to retrain") from None
    net.ref_mu, net.ref_sigma, net.test_acc = (ckpt["mu"].numpy(), ckpt["sigma"].numpy(),
                                               ckpt["test_acc"])
    return net.to(device).eval().requires_grad_(False)


def shapes_reference_stats(**kw):
    """(mu, sigma) float64 of ShapesNet features on the 10k-image shapes test split (cached with the
    net)."""
    net = load_shapes_net(**kw)
    return net.ref_mu, net.ref_sigma


def fd_shapes(images, net=None):
    """FD-shapes of generated images (N, 3, 32, 32) in [0, 1] against the shapes test split. Not
    FID."""
    net = load_shapes_net(images.device) if net is None else net
    mu, sigma = feature_stats(extract_features(net, images, 500, images.device, progress=False))
    return frechet_distance(mu, sigma, net.ref_mu, net.ref_sigma)


# -----------------------------------------------------------------------------
# command line

# unflipped uint8 (N, 3, 32, 32)
DATASETS = {"cifar10-train": lambda: data.cifar10_dataset("train").images,
            "cifar10-test": lambda: data.cifar10_dataset("test").images,
            "shapes-train": lambda: data.shapes_dataset("train").images,
            "shapes-test": lambda: data.shapes_dataset("test").images}


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> (3, H, W) uint8 tensors, RGB-converted (pytorch-fid's loader, any extension,
    any case)."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        # (3, H, W) uint8
        return torch.from_numpy(data.load_image(self.files[i]).copy()).permute(2, 0, 1)


def load_input(spec):
    """A CLI input -> (mu, sigma) from an .npz, or images (a uint8 tensor or an ImageFiles
    dataset)."""
    if spec in DATASETS:
        return DATASETS[spec]()
    if spec.lower().endswith(".npz") and os.path.isfile(spec):
        try:
            with np.load(spec) as f:
                # pytorch-fid stats, ADM reference batches (also hold arr_0)
                if "mu" in f and "sigma" in f:
                    return f["mu"], f["sigma"]
                if "arr_0" in f:  # an ADM-style sample batch, (N, H, W, 3) uint8
                    return torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2)
                keys = list(f.keys())
        except Exception as e:
            raise UserError(f"cannot read {spec} ({type(e).__name__})") from None
        raise UserError(f"{spec} holds {keys}, expected mu and sigma (or arr_0 images)")
    if os.path.isdir(spec):
        files = data.list_images(spec)
        if not files:
            raise UserError(f"no image files in {spec}")
        return ImageFiles(files)
    raise UserError(f"{spec}: no such folder or .npz file, "
                    f"nor a dataset name ({', '.join(DATASETS)})")


def run(args):
    if len(args.inputs) > 2 or (len(args.inputs) == 1
                                and not (args.save_stats or args.inception_score)):
        raise UserError("give two inputs to compare, or one with --save-stats and/or --is")
    if args.inception_score and args.metric != "fid":
        raise UserError("--is needs --metric fid (it uses the Inception logits)")
    inputs = [load_input(spec) for spec in args.inputs]  # all user errors before the slow work
    if args.inception_score and isinstance(inputs[0], tuple):
        raise UserError(f"--is needs images, but {args.inputs[0]} holds only statistics")
    net, stats, result = None, [], {"metric": "FID" if args.metric == "fid" else "FD-shapes"}
    for k, x in enumerate(inputs):
        if isinstance(x, tuple):  # precomputed (mu, sigma)
            stats.append(x)
            continue
        if net is None:  # built only when some input is images, so .npz-vs-.npz works offline
            net = (InceptionV3(args.inception) if args.metric == "fid"
                   else load_shapes_net()).to(args.device)
        feats = extract_features(net, x, args.batch_size, args.device, args.num_workers)
        stats.append(feature_stats(feats))
        result["n" if k == 0 else "n_ref"] = len(feats)
        if k == 0 and args.inception_score:
            result["is_mean"], result["is_std"] = inception_score(
                net.logits(torch.from_numpy(feats)).cpu())
            print(f"IS-{len(feats)}: {result['is_mean']:.3f} +- {result['is_std']:.3f} "
                  f"(10 splits, 1008-way logits)")
    if args.save_stats:
        tmp = args.save_stats + ".tmp"
        with open(tmp, "wb") as f:  # a file object, so numpy does not append .npz to the temp name
            np.savez_compressed(f, mu=stats[0][0], sigma=stats[0][1])
        os.replace(tmp, args.save_stats)  # atomic: never a half-written stats file
        print(f"saved mu {stats[0][0].shape} and sigma of {args.inputs[0]} to {args.save_stats}")
    if len(stats) == 2:
        result["value"] = frechet_distance(*stats[0], *stats[1])
        label = result["metric"] + (f"-{result['n']}" if "n" in result else "")
        if net is None:
            protocol = ("from two statistics files: their network and protocol are whatever "
                        "produced them")
        else:
            protocol = protocol_note(net)
            if args.metric == "fid":
                result["inception_sha256"] = net.sha256
        print(f"{label}: {result['value']:.3f} ({protocol})")
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description="FID (pytorch-fid protocol), Inception Score, "
                                "FD-shapes",
                                epilog=__doc__.split("\n\n")[1],  # the commands of the docstring
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+",
                   help=f"1 or 2 of: image folder, .npz (mu/sigma, or arr_0 images), "
                   f"{', '.join(DATASETS)}; the first one is the generated side")
    p.add_argument("--metric", choices=["fid", "fd-shapes"], default="fid",
                   help="fd-shapes: 32x32 shapes only")
    p.add_argument("--inception", default=None,
                   help="FID Inception weight file (default: cache dir or download)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-loading processes")
    p.add_argument("--save-stats", default=None, metavar="OUT.npz",
                   help="save mu/sigma of the first input")
    p.add_argument("--is", dest="inception_score", action="store_true",
                   help="also the Inception Score of input 1")
    args = p.parse_args()
    try:
        run(args)
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
