"""
Send-VAE: a VAE whose NOISED latents, through a small non-linear mapper, are aligned to frozen VFM
patch features. "Boosting Latent Diffusion Models via Disentangled Representation Alignment" (v2:
"... via Semantic-Disentangled VAE"), Page, Niu et al., arXiv 2601.05823. Stage 1 of two; stage 2 is
`python train.py --tokenizer CKPT`.

    python sendvae.py                              # tiny, shapes, CPU: 4-6 min (+2.5 min 1st time)
    python sendvae.py --align-weight 0             # the plain-VAE baseline (same run, no alignment)
    python sendvae.py --probe out_sendvae/ckpt.pt  # attribute probe (section 4.5): per-attribute F1
    torchrun --nproc_per_node=8 sendvae.py --preset f16d32 --data /imagenet/train \\
        --init vavae-f16d32.pt --disc-init vavae-f16d32-discriminator-ckpt.pt    # the paper's run

One training step (section 3.3, eq. 1-3; L_VAE as REPA-E's configs/l1_lpips_kl_gan.yaml):

    x ─> encoder ─> z ~ q(z|x) ─> decoder ─> x_hat ─ L1 + LPIPS + 1e-6 KL + 0.1 GAN ────────┐
                     │                                                                      ├─> loss
                     └─> BN ─> z_t = a z + (1-a) eps, a ~ U(0,1) ─> mapper ─> (B, N, D) ─┐  │
    x ─> VFM (frozen; DINOv2: 224 px, last LayerNorm-ed patch tokens) ─> (B, N, D) ──────┴──┘
    The two (B, N, D) meet in L_align = mean over patches of (1 - cos), weight 1. Then the PatchGAN
    discriminator takes its own hinge-loss step on (x, x_hat.detach()). The alignment reaches the
    VAE ENCODER through z (scaled by a); the decoder sees only L_VAE. The VAE and the mapper train;
    the mapper is thrown away afterwards. --align-weight 0 = plain VAE (the mapper still trains, on
    a detached z, so the alignment cosine is measured the same way).

Runs on one process or under torchrun (gloo on CPU, nccl on GPU) with --batch-size global and
--micro-batch per process (accumulation derived). Every random draw is keyed by (seed, step, global
row), and the mapper's BatchNorm uses running statistics updated from the whole global batch, so N
processes give the run of 1 process at the same global batch; the PatchGAN's BatchNorm uses batch
statistics per micro-batch (as REPA-E per GPU), so with the GAN on, runs agree at equal
--micro-batch.

Offline there are no DINOv2 or VGG weights. The tiny default's VFM is a STAND-IN: a small ViT
trained once on the shapes attributes (cached), a different network from fid.py's ShapesNet that
scores FD-shapes in stage 2. It was trained on the attributes the probe measures, so its probe gain
shows that alignment moves what the VFM encodes into the latent; it says nothing about DINOv2.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from data import (StopCheck, UserError, all_mean, autocast, cache_dir, download, file_hash,
                  get_dataset, load_checkpoint, load_image, make_loader, open_log, resume_file,
                  run_main, save_checkpoint, save_grid, setup_run, split_batch)
from model import UniteConfig, UNITE, ViTBlock, attend, count_params, sincos_2d
from perceptual import load_lpips, lpips_loss
from vae import VAE_PRESETS, AutoencoderKL, VAEConfig

# -----------------------------------------------------------------------------
# DINOv2 (the VFM): a minimal ViT that loads the official checkpoint files as they are

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}_pretrain.pth"
# sha256 of the official files: NOT pinned. We could not verify them here (no network), and a digest
# from memory would be a guess. An unpinned file loads with a warning; pin the digests once checked.
DINOV2_SHA256 = {"vits14": None, "vitb14": None}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_file(arch, path=None):
    """Path of the DINOv2 weight file: an explicit path, or <cache dir>/dinov2_<arch>_pretrain.pth
    (downloaded there only if its sha256 is pinned). Missing -> one-line UserError saying where."""
    if arch not in DINOV2_SHA256:
        raise UserError(f"unknown DINOv2 arch {arch!r}: vits14 or vitb14")
    url, digest = DINOV2_URL.format(arch=arch), DINOV2_SHA256[arch]
    if path:  # explicitly given: a mismatch only warns (it may be a re-saved or converted copy)
        if not os.path.isfile(path):
            raise UserError(f"DINOv2 weight file not found: {path}")
        if digest and file_hash(path) != digest:
            print(f"warning: {path} is not the official {arch} file (sha256 differs)",
                  file=sys.stderr)
        return path
    path = os.path.join(cache_dir(), f"dinov2_{arch}_pretrain.pth")
    if digest:
        return download(url, path, "sha256", digest)
    if not os.path.isfile(path):
        raise UserError(f"DINOv2 weights not found: download {url} and put it at {path} (or "
                        f"pass --vfm FILE); offline, use a stand-in: --vfm shapesvit or "
                        f"--vfm unite:CKPT")
    print(f"warning: {path}: sha256 not pinned in this code, file not verified", file=sys.stderr)
    return path


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class DinoBlock(ViTBlock):
    """model.ViTBlock (norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2, LayerNorm eps 1e-6, exact
    GELU) plus DINOv2's layer scale on both residual branches (ls1.gamma, ls2.gamma)."""

    def __init__(self, dim, heads):
        super().__init__(dim, heads)
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads) \
            .permute(2, 0, 3, 1, 4)
        a = attend(q, k, v).transpose(1, 2).reshape(B, T, D)
        x = x + self.ls1.gamma * self.attn.proj(a)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DINOv2(nn.Module):
    """DINOv2 ViT (no registers) loading the official state dict as is (mask_token ignored). The
    shape is read off the weights: width from cls_token, depth from blocks.N, patch from
    patch_embed.proj, position grid from pos_embed (37x37 = 518 px / 14), heads = width / 64 (every
    DINOv2 size). `dims` = (width, depth, patch, pos_grid) builds an untrained one instead (tests,
    random-vit).
    forward(x): ImageNet-normalised (N, 3, H, W) -> last block's LayerNorm-ed patch tokens
    (N, H/14 * W/14, D), the official `x_norm_patchtokens` (CLS dropped) REPA / REPA-E align to."""

    def __init__(self, arch="vitb14", weights_path=None, dims=None):
        super().__init__()
        sd = None
        if dims is None:
            path = dinov2_file(arch, weights_path)
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"{path} is not a DINOv2 state dict ({type(e).__name__})") from None
            depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
            dims = (sd["cls_token"].shape[-1], depth, sd["patch_embed.proj.weight"].shape[-1],
                    math.isqrt(sd["pos_embed"].shape[1] - 1))
        D, depth, self.patch_size, self.pos_grid = dims
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, self.patch_size, self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.pos_grid ** 2, D) * 0.02)
        self.blocks = nn.ModuleList(DinoBlock(D, max(1, D // 64)) for _ in range(depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        if sd is not None:
            sd.pop("mask_token", None)
            try:
                self.load_state_dict(sd)  # strict: any other key name is an error
            except RuntimeError as e:
                raise UserError(f"not an official DINOv2 state dict: "
                                f"{str(e).splitlines()[1].strip()}") from None
        self.eval().requires_grad_(False)

    def interpolate_pos_encoding(self, h, w):
        """(1, 1 + h*w, D): the 37x37 table resized to the h x w patch grid exactly as the official
        vision_transformer.py: bicubic, no antialias, size given as scale_factor (grid + 0.1) / 37
        (the +0.1 avoids a float round-down, dino issue #8). REPA/REPA-E's load_encoders instead
        resample the table once with timm's resample_abs_pos_embed; the two differ slightly."""
        M, D = self.pos_grid, self.pos_embed.shape[-1]
        if (h, w) == (M, M):
            return self.pos_embed
        patch = self.pos_embed[:, 1:].float().reshape(1, M, M, D).permute(0, 3, 1, 2)  # (1,D,M,M)
        patch = F.interpolate(patch, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic")
        assert patch.shape[-2:] == (h, w)
        return torch.cat([self.pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, D)], 1)

    def forward(self, x):
        B, _, H, W = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)                   # (B, hw, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)               # (B, 1+hw, D)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]                                                 # (B, hw, D)


def dinov2_input(x, size=224):
    """[0, 1] images (B, 3, H, W) -> ImageNet-normalised, bicubic-resized to size x size (REPA-E's
    preprocess_raw_image order, train_repae.py:44-47: normalise, then resize; 224 px: 16x16
    tokens)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return F.interpolate((x - mean) / std, size=(size, size), mode="bicubic", align_corners=False)


# -----------------------------------------------------------------------------
# offline stand-in VFM of the tiny run: a small ViT trained on the shapes attributes, cached

class ShapesViT(nn.Module):
    """32x32 shapes image in [0, 1] -> (B, 16, dim): 8x8 patches (a 4x4 grid, the tiny latent's
    grid, so the mapper needs no resampling, as f16 + DINOv2-224 in the paper), learned positions,
    `depth` pre-norm ViT blocks of 32-d heads, final LayerNorm (as DINOv2's x_norm_patchtokens).
    Trained with one linear head per attribute on the token mean. Deliberately unlike fid.py's
    ShapesNet, the FD-shapes scorer: attention instead of convolutions, another seed and batch
    order."""

    def __init__(self, dim=96, depth=4, patch=8):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (32 // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, dim // 32) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, v) for k, v in data.ATTRIBUTES.items()})

    def forward(self, x):
        x = self.patch_embed((x.contiguous() - 0.5) / 0.25).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)                                                        # (B, 16, dim)


def train_shapes_vit(steps=3000, seed=1, batch_size=64, lr=1e-3):
    """AdamW (wd 0.05), summed cross-entropy over the attribute heads, 100-step warm-up then linear
    decay; 3000 steps: shape accuracy 0.99, mean over the 7 attributes 0.91 on the test split
    (ShapesNet: 1.00, 0.91), ~2.3 min on one core. Single-threaded: the same net on every
    machine."""
    ds = data.shapes_dataset("train")
    x_all, y_all = ds.images, {k: torch.from_numpy(v) for k, v in ds.attrs.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net, g = ShapesViT(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1, (step + 1) / 100) * (1 - step / steps)
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        feats = net(x_all[idx].float() / 255).mean(1)                             # (B, dim)
        loss = sum(F.cross_entropy(h(feats), y_all[k][idx]) for k, h in net.heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def load_shapes_vit(device="cpu"):
    """The stand-in ViT, trained once and cached (as fid.load_shapes_net) with its test
    accuracies."""
    path = os.path.join(cache_dir(), f"shapes_vit_d{data.SHAPES_VERSION}.pt")
    if not os.path.exists(path):
        threads, t0 = torch.get_num_threads(), time.time()
        torch.set_num_threads(1)
        try:
            net, test = train_shapes_vit(), data.shapes_dataset("test")
            with torch.no_grad():
                f = torch.cat([net(test.images[i:i + 500].float() / 255).mean(1)
                               for i in range(0, len(test), 500)])
            acc = {k: (h(f).argmax(1).numpy() == test.attrs[k]).mean().item()
                   for k, h in net.heads.items()}
        finally:
            torch.set_num_threads(threads)
        print(f"stand-in ShapesViT: trained in {time.time() - t0:.0f}s, test accuracy shape "
              f"{acc['shape']:.2%}, mean {sum(acc.values()) / len(acc):.2%}; cached at {path}",
              file=sys.stderr)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save({"model": net.state_dict(), "test_acc": acc}, tmp)
        os.replace(tmp, path)  # atomic
    with torch.random.fork_rng(devices=[]):
        net = ShapesViT()
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(ck["model"])
    except Exception as e:
        raise UserError(f"corrupt cache file {path} ({type(e).__name__}): delete it") from None
    net.test_acc = ck["test_acc"]
    return net.to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# the VFM seen as patch tokens: DINOv2, or an explicitly labelled offline stand-in

class FrozenVFM(nn.Module):
    """forward(x in [0, 1]) -> (B, grid*grid, dim) patch features; frozen, never gets gradients."""

    def __init__(self, net, prep, dim, grid, label, stand_in):
        super().__init__()
        self.net, self.prep = net.eval().requires_grad_(False), prep
        self.dim, self.grid, self.label, self.stand_in = dim, grid, label, stand_in

    @torch.no_grad()
    def forward(self, x):
        return self.net(self.prep(x)).float()


class ShapesTrunk(nn.Module):
    """fid.py's ShapesNet up to its last conv stage: (B, 3, 32, 32) -> (B, 16, 64), 4x4 tokens."""

    def __init__(self, net):
        super().__init__()
        self.body = net.body[:-3]  # drop Flatten / Linear / ReLU

    def forward(self, x):
        return self.body((x.contiguous() - 0.5) / 0.25).flatten(2).transpose(1, 2)


class UniteFeatures(nn.Module):
    """A UNITE checkpoint's frozen Generative Encoder as a feature extractor: its tokenizer pass
    with
    fixed register noise and t = 0 -> (B, K, C) LayerNorm-ed latent tokens on the patch grid."""

    def __init__(self, ge):
        super().__init__()
        self.ge = ge
        self.register_buffer("regs", torch.randn(1, ge.cfg.num_tokens, ge.cfg.latent_dim,
                                                 generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        B, null = x.shape[0], torch.full((x.shape[0],), self.ge.cfg.num_classes, device=x.device)
        return self.ge(self.regs.expand(B, -1, -1), torch.zeros(B, device=x.device), null, x)


def load_vfm(spec, image_size):
    """--vfm: dinov2_vitb14 | dinov2_vits14 | FILE.pth (DINOv2) | shapesvit | shapesnet | unite:CKPT
    | random-vit."""
    official = spec.startswith("dinov2_")
    if official or (spec.endswith((".pth", ".pt")) and not spec.startswith("unite:")):
        net = DINOv2(spec[len("dinov2_"):]) if official else DINOv2(weights_path=spec)
        return FrozenVFM(net, dinov2_input, net.norm.normalized_shape[0], 16, f"DINOv2 {spec}",
                         False)
    if spec in ("shapesvit", "shapesnet") and image_size != 32:
        raise UserError(f"--vfm {spec} needs 32x32 images (trained on the built-in shapes data)")
    if spec == "shapesvit":
        return FrozenVFM(load_shapes_vit(), lambda x: x, 96, 4,
                         "STAND-IN shapesvit: a small ViT trained on the shapes attributes "
                         "(seed 1), not fid.py's ShapesNet that scores FD-shapes; not DINOv2", True)
    if spec == "shapesnet":  # the earlier stand-in: the FD-shapes scorer itself (stage 2: circular)
        import fid
        return FrozenVFM(ShapesTrunk(fid.load_shapes_net()), lambda x: x, 64, 4,
                         "STAND-IN shapesnet: fid.py's ShapesNet conv trunk (the FD-shapes "
                         "scorer), not DINOv2", True)
    if spec.startswith("unite:"):
        path = spec[len("unite:"):]
        m = load_unite(path)
        if m.cfg.image_size != image_size:
            raise UserError(f"--vfm {spec}: trained at {m.cfg.image_size} px, the VAE is "
                            f"{image_size}")
        return FrozenVFM(UniteFeatures(m.encoder), lambda x: x, m.cfg.latent_dim, m.cfg.grid,
                         f"STAND-IN unite:{path}: a frozen UNITE Generative Encoder, not DINOv2",
                         True)
    if spec == "random-vit":  # meaningless features: tests only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = DINOv2(dims=(64, 2, 14, 37))
        size = 224 if image_size >= 224 else 56
        return FrozenVFM(net, lambda x: dinov2_input(x, size), 64, size // 14,
                         "STAND-IN random-vit: an untrained ViT (tests only), not DINOv2", True)
    raise UserError(f"unknown --vfm {spec!r}: dinov2_vitb14, dinov2_vits14, a .pth file, "
                    f"shapesvit, shapesnet, unite:CKPT, random-vit")


# -----------------------------------------------------------------------------
# the mapper and the alignment loss (section 3.3)

def noise_mix(z, alpha, eps):
    """Eq. 1: z_t = alpha z + (1 - alpha) eps, alpha (B,) per sample, as SiT's linear path (t = 1
    clean, the convention of model.py). alpha = 1 gives z."""
    a = alpha.view(-1, *[1] * (z.dim() - 1))
    return a * z + (1 - a) * eps


def align_loss(pred, target):
    """Eq. 2: mean over samples and patches of 1 - cos(pred_n, target_n); (B, N, D) each."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


class Mapper(nn.Module):
    """h_phi: BN (affine-free, as REPA-E's latent normalisation) -> [noise] -> patch embedding ->
    `depth` pre-norm ViT blocks (width = the VFM's, heads = width / 64: 12 for 768-d, the paper's
    rule) -> MLP projector (Linear-SiLU-Linear-SiLU-Linear, REPA's build_mlp; hidden 2048 in the
    paper) -> (B, g*g, D_vfm), g = the VFM's token grid. Depth 0 = patch embedding + projector
    (Tab. 2). The patch size maps the latent grid onto the VFM grid (f16 + DINOv2-224: both 16x16,
    patch 1; f8: patch 2); a coarser latent grid is upsampled (bilinear) at the end.
    The BN always normalises with its running statistics, updated by update_bn from the whole global
    batch after each step: REPA-E's VAE-side alignment runs its SiT's BN in eval mode
    (train_repae.py:373-374, "Avoid BN stats to be updated by the VAE") and updates the statistics
    in the SiT's own pass with SyncBatchNorm (train_repae.py:211-212, models/sit.py). It also makes
    the loss independent of how the global batch is split over processes and micro-steps. Its
    gradient does not see the normalisation, so the encoder can gain SNR against the unit noise by
    growing z until the statistics catch up. batch_stats=True (--bn-stats batch) normalises each
    micro-batch by its own statistics, with the gradient through them (scale-invariant; BatchNorm's
    usual training mode); runs then agree only at equal --micro-batch. Tiny default, seeds 0 / 1,
    600 steps: running: KL ~20k, PSNR 18.2 / 15.9 dB, probe F1 0.73 / 0.66; batch: KL ~1.2k,
    16.4 / 17.9 dB, F1 0.78 / 0.82; plain VAE (--align-weight 0): KL ~0.8k, 20.6 / 18.6 dB,
    F1 0.70 / 0.68."""

    def __init__(self, z_channels, latent_grid, vfm_dim, vfm_grid, depth=1, proj_dim=2048,
                 batch_stats=False):
        super().__init__()
        D, self.vfm_grid, self.batch_stats = vfm_dim, vfm_grid, batch_stats
        p = max(1, latent_grid // vfm_grid)
        self.bn = nn.BatchNorm2d(z_channels, affine=False, eps=1e-4, momentum=0.1)  # REPA-E's
        self.patch_embed = nn.Conv2d(z_channels, D, p, p)
        self.register_buffer("pos", sincos_2d(D, latent_grid // p)[None], persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(D, max(1, D // 64)) for _ in range(depth))
        self.proj = nn.Sequential(nn.Linear(D, proj_dim), nn.SiLU(), nn.Linear(proj_dim, proj_dim),
                                  nn.SiLU(), nn.Linear(proj_dim, vfm_dim))

    def train(self, mode=True):
        super().train(mode)
        self.bn.train(mode and self.batch_stats)  # running statistics unless --bn-stats batch
        return self

    @torch.no_grad()
    def update_bn(self, moments, n, first=False):
        """Running statistics <- momentum blend with the batch's: moments (2, C) = sums of z and z^2
        over n values per channel (the global batch, all-reduced). first: take them as they are."""
        mean = moments[0] / n
        var = (moments[1] / n - mean ** 2).clamp_min(0) * n / max(n - 1, 1)  # unbiased, as BN
        m = 1.0 if first else self.bn.momentum
        self.bn.running_mean.lerp_(mean, m)
        self.bn.running_var.lerp_(var, m)
        self.bn.num_batches_tracked += 1

    def forward(self, z_t):
        x = self.patch_embed(z_t).flatten(2).transpose(1, 2) + self.pos          # (B, n*n, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.proj(x)                                                          # (B, n*n, D_vfm)
        n, g = math.isqrt(x.shape[1]), self.vfm_grid
        if n != g:
            x = F.interpolate(x.transpose(1, 2).unflatten(2, (n, n)), size=(g, g), mode="bilinear")
            x = x.flatten(2).transpose(1, 2)                                      # (B, g*g, D_vfm)
        return x


def alignment(mapper, z, feats, alpha, eps):
    """L_align for latents z (B, C, h, w) vs VFM tokens feats (B, N, D): (loss, mean cosine)."""
    z_t = noise_mix(mapper.bn(z), alpha, eps)  # BN first: a noise level means the same at any scale
    loss = align_loss(mapper(z_t), feats)
    return loss, 1 - loss.detach()


def latent_moments(z):
    """(2, C) per-channel sums of z and z^2 over batch and positions, and their count."""
    z = z.detach().float()
    return torch.stack([z.sum((0, 2, 3)), (z * z).sum((0, 2, 3))]), z.numel() // z.shape[1]


class SendVAE(nn.Module):
    """The trained pair (VAE + mapper) with one forward, as DDP needs: images in [0, 1], the step's
    per-sample noise and the VFM tokens -> (recon, mean, logvar, z, alignment loss, cosine)."""

    def __init__(self, vae, mapper):
        super().__init__()
        self.vae, self.mapper = vae, mapper

    def forward(self, x, noise, feats, detach_align=False):
        mean, logvar = self.vae.encode(x)                                         # (B, C, h, w)
        z = mean + (0.5 * logvar).exp() * noise["post"]                           # posterior sample
        recon = self.vae.decode(z)                                                # (B, 3, H, W)
        align, cos = alignment(self.mapper, z.detach() if detach_align else z, feats,
                               noise["alpha"], noise["align"])
        return recon, mean, logvar, z, align, cos


def step_noise(zshape, seed, step, rows, device, align_noise=True):
    """The step's random draws for the global samples `rows`, each from its own generator seeded by
    (seed, step, row) as model.step_noise: posterior eps, alignment eps and alpha ~ U(0, 1) (1 with
    --no-align-noise). A rank draws only its rows; any world size or accumulation gives the same."""
    parts = []
    for r in rows:
        g = torch.Generator(device).manual_seed(((seed * 1_000_003 + step) * 1_000_003 + int(r))
                                                % 2 ** 63)
        parts.append(dict(post=torch.randn(zshape, device=device, generator=g),
                          align=torch.randn(zshape, device=device, generator=g),
                          alpha=torch.rand(1, device=device, generator=g)))
    out = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
    out["alpha"] = out["alpha"][:, 0] if align_noise else torch.ones_like(out["alpha"][:, 0])
    return out


# ----------------------------------------------------------------------------- L_VAE: REPA-E's loss
# (loss/losses.py ReconstructionLoss_Single_Stage, configs/l1_lpips_kl_gan.yaml)

class NLayerDiscriminator(nn.Module):
    """PatchGAN as taming-transformers / REPA-E loss/discriminator.py (input_nc 3, ndf 64, n_layers
    3, BatchNorm, no ActNorm), same module names (main.N.*), so REPA-E's *-discriminator-ckpt.pt and
    an LDM checkpoint's loss.discriminator.* load as they are. (B, 3, H, W) in [-1, 1] ->
    (B, 1, h, w) patch logits (30x30 at 256 px)."""

    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers, mult = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], 1
        for n in range(1, n_layers + 1):  # stride 2, except the last: stride 1
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        self.main = nn.Sequential(*layers, nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        for m in self.modules():  # weights_init, loss/discriminator.py:98-104
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    """0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), loss/losses.py:38-47."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def vae_loss(x, recon, mean, logvar, args, lpips=None, disc=None):
    """L_VAE (losses.py:297-376) for x, recon in [0, 1]: L1 + w_lpips LPIPS + w_kl KL + w_gan
    (-mean D(x_hat)), in fp32 with autocast off as REPA-E (its loss forward is
    autocast(enabled=False), losses.py:149). REPA-E's images are in [-1, 1] (utils.py
    preprocess_imgs_vae), so L1 is on that scale (2x the [0, 1] L1) and D sees 2x - 1; LPIPS gets
    2x - 1 and no dropout (lpips_loss released=False): REPA-E feeds [-1, 1] and, since its PR #17,
    no longer rescales again inside lpips.py (the initial commit 3ad8046 did, lpips.py:92-93);
    PerceptualLoss.forward puts LPIPS in eval mode (perceptual_loss.py:80). KL is LDM's: summed
    over latent dims, mean over the batch (losses.py:355-356); logvar_init 0 leaves L1 unscaled.
    The generator's GAN term must not train D: its weights are frozen for that forward
    (losses.py:323-324). lpips / disc None = term off. Returns (loss, {term: detached value})."""
    zero = torch.zeros((), device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        x, recon, mean, logvar = x.float(), recon.float(), mean.float(), logvar.float()
        l1 = 2 * (recon - x).abs().mean()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        lp = lpips_loss(lpips, recon, x, released=False) if lpips is not None else zero
        gan = zero
        if disc is not None:
            disc.requires_grad_(False)
            gan = -disc(2 * recon - 1).mean()
            disc.requires_grad_(True)  # the graph above is built: D gets no gradient from it
    loss = l1 + args.lpips_weight * lp + args.kl_weight * kl + args.gan_weight * gan
    return loss, dict(l1=l1.detach(), lpips=lp.detach(), kl=kl.detach(), gan=gan.detach())


def disc_loss(disc, x, recon):
    """The discriminator's step (losses.py:238-277): hinge on D(x) and D(x_hat.detach()), two
    separate forwards (BatchNorm statistics per call, as there), fp32. -> (loss, mean logits)."""
    with torch.autocast(x.device.type, enabled=False):
        real = disc(2 * x.float() - 1)
        fake = disc(2 * recon.detach().float() - 1)
    return hinge_d_loss(real, fake), real.detach().mean(), fake.detach().mean()


# -----------------------------------------------------------------------------
# starting points: our checkpoints, REPA-E, LDM and VA-VAE AutoencoderKL files

VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def find_vae_weights(ck):
    """(AutoencoderKL state dict, layout) of a loaded file; our module names are LDM's (model.py).
    - sendvae.py: {"vae_config", "vae", ...}
    - REPA-E train_repae.py checkpoint: {"vae", "discriminator", "ema", ...}
      (train_repae.py:482-492)
    - REPA-E VAE file (README pretrained/*/*.pt, save_vae_weights.py output): the bare state dict
    - LDM / VA-VAE (hustvl/LightningDiT): {"state_dict": {...}} plus loss.* (LPIPS, discriminator)
      and VA-VAE's foundation-model / projection keys, skipped as LightningDiT's init_from_ckpt does
      (tokenizer/autoencoder.py); `module.` / `_orig_mod.` prefixes are dropped."""
    if not isinstance(ck, dict):
        return {}, "not a dict"
    layout = "sendvae.py" if "vae_config" in ck else "REPA-E checkpoint" if "vae" in ck else \
        "LDM / VA-VAE" if "state_dict" in ck else "bare state dict (REPA-E / LDM names)"
    sd = ck.get("vae", ck.get("state_dict", ck))
    if not isinstance(sd, dict):
        return {}, layout
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            k = k[len(p):] if k.startswith(p) else k
        if k.startswith(VAE_KEYS) and torch.is_tensor(v):
            out[k] = v
    return out, layout


def read_weights(path, what):
    """torch.load with weights_only (tensors and plain containers; also argparse.Namespace, which
    REPA-E's train checkpoints hold under "args"). Anything else: one UserError line."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: file not found")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{what} {path}: not a weights file readable with weights_only=True "
                        f"({type(e).__name__}); re-save just its state dict with torch.save") \
            from None


def preset_shapes(cfg):
    with torch.device("meta"):  # shapes only, nothing allocated
        return {k: v.shape for k, v in AutoencoderKL(cfg).state_dict().items()}


def load_init(path, vcfg):
    """--init FILE -> (AutoencoderKL, VAEConfig, layout). A sendvae.py checkpoint brings its config;
    any other layout must match --preset's shapes exactly. Otherwise one UserError line naming the
    first missing or mismatched tensor (and the preset the file does match, if any)."""
    ck = read_weights(path, "--init")
    sd, layout = find_vae_weights(ck)
    if layout == "sendvae.py":
        vcfg = VAEConfig(**ck["vae_config"])
    vae = AutoencoderKL(vcfg)
    own = vae.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or extra or bad:
        if missing:
            what = (f"no AutoencoderKL weight {missing[0]!r} ({len(missing)} of {len(own)} "
                    f"missing; expected LDM / REPA-E names encoder.*, decoder.*, quant_conv.*, "
                    f"post_quant_conv.*)")
        else:
            what = (f"{bad[0]!r} has shape {tuple(sd[bad[0]].shape)}, expected "
                    f"{tuple(own[bad[0]].shape)}" if bad else f"unexpected tensor {extra[0]!r}")
        shapes = {k: v.shape for k, v in sd.items()}
        fits = [n for n, p in VAE_PRESETS.items() if sd and preset_shapes(VAEConfig(**p)) == shapes]
        raise UserError(f"--init {path} ({layout}): {what}"
                        + (f"; the file matches --preset {fits[0]}" if fits else ""))
    vae.load_state_dict(sd)
    return vae, vcfg, layout


def load_disc(path, disc):
    """--disc-init FILE: REPA-E's *-discriminator-ckpt.pt (a bare NLayerDiscriminator state dict), a
    REPA-E train checkpoint ("discriminator"), an LDM / VA-VAE file (state_dict
    loss.discriminator.*) or a sendvae.py checkpoint ("disc"). Wrong file: one UserError line."""
    ck = read_weights(path, "--disc-init")
    sd = ck.get("discriminator", ck.get("disc", ck)) if isinstance(ck, dict) else None
    if isinstance(ck, dict) and "state_dict" in ck:
        p = "loss.discriminator."
        sd = {k[len(p):]: v for k, v in ck["state_dict"].items() if k.startswith(p)}
    try:
        disc.load_state_dict(sd)
    except Exception as e:
        msg = str(e).splitlines() or [type(e).__name__]
        raise UserError(f"--disc-init {path}: not a 3-layer ndf-64 PatchGAN state dict "
                        f"({msg[min(1, len(msg) - 1)].strip()})") from None


# -----------------------------------------------------------------------------
# attribute probe (section 4.5): logistic regression on the flattened latents, F1 per attribute

PROBE_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # L2 strengths tried (on the mean cross-entropy)


@torch.no_grad()
def flat_latents(vae, images, batch=250):
    """(N, 3, H, W) uint8 or [0, 1] floats -> (N, C*h*w) posterior means (the probe's features)."""
    dev, out = next(vae.parameters()).device, []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(dev)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        out.append(vae.encode(x)[0].flatten(1).float())
    return torch.cat(out)


def f1_score(pred, true, n_values):
    """Binary attributes: F1 of the positive class (multi-label convention). More values: macro F1
    over the values present in true or pred (as sklearn's f1_score(average="macro"))."""
    f1 = []
    for c in ([1] if n_values == 2 else range(n_values)):
        tp = ((pred == c) & (true == c)).sum().item()
        denom = (pred == c).sum().item() + (true == c).sum().item()
        if denom or n_values == 2:
            f1.append(2 * tp / denom if denom else 0.0)
    return sum(f1) / len(f1)


def fit_logistic(X, Y, sizes, lam, steps=300):
    """Multinomial logistic regression for every attribute at once: attribute j has its own softmax
    over sizes[j] values (its own block of columns), minimising sum_j [mean CE_j + lam_j / 2
    |W_j|^2] (bias free) by full-batch L-BFGS from zero. The blocks do not interact, so this is
    len(sizes) independent regressions in one solver. X (N, F) standardised, Y (N, A) long, lam
    (A,). Returns (W (F, sum sizes), b)."""
    W = torch.zeros(X.shape[1], sum(sizes), device=X.device, requires_grad=True)
    b = torch.zeros(sum(sizes), device=X.device, requires_grad=True)
    reg = torch.cat([torch.full((n,), float(l), device=X.device) for n, l in zip(sizes, lam)])
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, history_size=10, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = (X @ W + b).split(sizes, dim=1)
        loss = sum(F.cross_entropy(s, y) for s, y in zip(logits, Y.unbind(1)))
        loss = loss + 0.5 * (reg * W.pow(2)).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach(), b.detach()


def probe_f1(X, Y, W, b, sizes):
    logits = (X @ W + b).split(sizes, dim=1)
    return [f1_score(s.argmax(1).cpu(), y.cpu(), n) for s, y, n in zip(logits, Y.unbind(1), sizes)]


def linear_probe(x_train, labels_train, x_test, labels_test, val_frac=0.2, seed=0):
    """The probe as the paper's linear probing: features standardised with the training split's
    mean / std; per attribute, the L2 strength (PROBE_L2) with the best F1 on a held-out val_frac of
    the training split (seeded; ties: the stronger one), then a refit on the whole training split;
    F1 on the test split, which is never seen before. labels_*: {attribute: (N,) int}.
    Returns ({attribute: test F1}, {attribute: chosen L2}, {L2: [held-out F1 per attribute]})."""
    names = list(labels_train)
    sizes = [int(max(labels_train[k].max(), labels_test[k].max())) + 1 for k in names]
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    X, Xt = (x_train - mu) / sd, (x_test.to(x_train.device) - mu) / sd
    Y = torch.stack([torch.as_tensor(labels_train[k]).long() for k in names], 1).to(X.device)
    Yt = torch.stack([torch.as_tensor(labels_test[k]).long() for k in names], 1).to(X.device)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed)).to(X.device)
    val, fit = perm[:int(len(X) * val_frac)], perm[int(len(X) * val_frac):]
    held = {lam: probe_f1(X[val], Y[val], *fit_logistic(X[fit], Y[fit], sizes, [lam] * len(sizes)),
                          sizes) for lam in PROBE_L2}
    best = [max(PROBE_L2, key=lambda lam: (held[lam][j], lam)) for j in range(len(names))]
    test = probe_f1(Xt, Yt, *fit_logistic(X, Y, sizes, best), sizes)
    return dict(zip(names, test)), dict(zip(names, best)), held


def celeba_probe_data(folder, size, n, nt):
    """CelebA: folder with list_attr_celeba.txt and the images (in folder/ or
    folder/img_align_celeba/) center-cropped to size. With list_eval_partition.txt: the first n of
    the official train partition and the first nt of the test partition; without: the first n, then
    the next nt. Returns ((images uint8, {attribute: 0/1}) for train, the same for test, split
    description)."""
    attr_file = os.path.join(folder, "list_attr_celeba.txt")
    if not os.path.isfile(attr_file):
        raise UserError(f"--probe-data {folder}: no list_attr_celeba.txt there")
    lines = open(attr_file).read().split("\n")
    names, rows = lines[1].split(), [ln.split() for ln in lines[2:] if ln.strip()]
    part_file = os.path.join(folder, "list_eval_partition.txt")
    if os.path.isfile(part_file):
        part = dict(ln.split() for ln in open(part_file) if ln.strip())
        tr = [r for r in rows if part.get(r[0]) == "0"][:n]
        te = [r for r in rows if part.get(r[0]) == "2"][:nt]
        how = "official CelebA partition: train -> test"
    else:
        tr, te = rows[:n], rows[n:n + nt]
        how = "list_attr_celeba.txt order: first -> next images (no list_eval_partition.txt)"
    img_dir = os.path.join(folder, "img_align_celeba")
    img_dir = img_dir if os.path.isdir(img_dir) else folder

    def load(rs):
        imgs = torch.stack([torch.from_numpy(load_image(os.path.join(img_dir, r[0]), size))
                            .permute(2, 0, 1) for r in rs])
        return imgs, {a: torch.tensor([int(r[1 + j]) > 0 for r in rs]).long()
                      for j, a in enumerate(names)}
    return load(tr), load(te), how


def probe_figures(vae, args, size):
    """Per-attribute test F1, their mean, the chosen L2s and a line saying what was fit on what."""
    n, nt = args.probe_train, args.probe_test
    if args.probe_data:
        tr, te, how = celeba_probe_data(args.probe_data, size, n, nt)
    else:
        a, b = get_dataset("shapes", size, "train"), get_dataset("shapes", size, "test")
        tr = (a.images[:n], {k: torch.from_numpy(v[:n]) for k, v in a.attrs.items()})
        te = (b.images[:nt], {k: torch.from_numpy(v[:nt]) for k, v in b.attrs.items()})
        how = "shapes train split -> shapes test split (different seeds)"
    f1, lams, _ = linear_probe(flat_latents(vae, tr[0]), tr[1], flat_latents(vae, te[0]), te[1])
    split = (f"fit on {len(tr[0])} images (L2 per attribute chosen on a held-out 20% of them), "
             f"F1 on {len(te[0])} other images; {how}")
    return f1, sum(f1.values()) / len(f1), lams, split


def print_probe(f1, mean, source, split):
    print(f"attribute probe on {source} (multinomial logistic regression on standardised, "
          f"flattened posterior means; F1, macro over values): {split}")
    print("  " + "  ".join(f"{k} {v:.3f}" for k, v in f1.items()) + f"  | mean {mean:.3f}")


# -----------------------------------------------------------------------------
# the command line: train (default) or --probe

# Run defaults: a CPU budget for tiny; the paper's run for the 256 px presets (section 4.1: VA-VAE
# init, 80 epochs of ImageNet, global batch 1024, AdamW 3e-4; the rest as REPA-E train_repae.py:
# betas 0.9 / 0.999, weight decay 0, eps 1e-8 (:577-580), grad clip 1.0 (:581, :396, :405), constant
# lr with no warm-up (it has no scheduler), discriminator AdamW 1e-4 (:609) from step 0
# (l1_lpips_kl_gan.yaml discriminator_start), no EMA of the VAE (its only EMA is the SiT's,
# :193/:437; save_vae_weights.py exports ckpt["vae"], the raw weights).
# Paper micro-batch 32 per GPU (1024 = 32 x 4 accum x 8 GPUs). Saved activations of f16d32 at
# 256 px counted on the step with fake tensors (bf16 autocast, fused attention as on a GPU; equal to
# the real count at micro-batch 1): 1.05 GB per image = VAE + mapper 0.87 (bf16) + LPIPS and the
# GAN generator term 0.18 (fp32, as REPA-E); D's own step afterwards 0.03. States 2.1 GB (VAE +
# mapper 84.3M: weights, grads, DDP buckets, AdamW; frozen DINOv2-B and VGG16; D 2.8M + AdamW).
# Per GPU >= 35.7 GB at 32 and >= 69.1 GB at 64: 64 fits only as a lower bound (no allocator
# fragmentation, cuDNN workspaces, CUDA context), so 32. Count: `python sendvae_mem.py 32 64` with
# the scratch script /work/scratch/sendvae_mem.py (outside the repo; saved_tensors_hooks as
# train.py's saved_bytes).
# tiny: L1 + KL + alignment only. LPIPS needs VGG16 weights (none offline) and its 256-px-scale VGG
# features are meaningless on 32 px images (relu5_3 would be 2x2); the GAN (3 discriminator passes +
# its backward) makes a tiny step 2.4x as expensive (60 steps: 24.7 vs 10.1 CPU-s) in a CPU budget
# where the VAE is still under-trained.
RUNS = {
    "tiny": dict(data="shapes", vfm="shapesvit", batch_size=32, micro_batch=0, lr=1e-3, epochs=None,
                 max_steps=600, warmup_steps=20, proj_dim=256, lpips_weight=0.0, gan_weight=0.0),
    "paper": dict(data=None, vfm="dinov2_vitb14", batch_size=1024, micro_batch=32, lr=3e-4,
                  epochs=80.0, max_steps=None, warmup_steps=0, proj_dim=2048, lpips_weight=1.0,
                  gan_weight=0.1),
}


def parse_args(argv=None):
    t, p_ = RUNS["tiny"], RUNS["paper"]
    by = lambda k: f" (tiny: {t[k]}; f16d32 / f8d4: {p_[k]})"  # preset-dependent defaults
    p = argparse.ArgumentParser(description="Send-VAE (arXiv 2601.05823): VAE fine-tuning with the "
                                "noised-latent alignment to VFM patch features",
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(VAE_PRESETS),
                   help="VAE shape (vae.VAE_PRESETS; default %(default)s)")
    p.add_argument("--data", default=None, help="shapes | cifar10 | image folder" + by("data"))
    p.add_argument("--init", default="", help="VAE to fine-tune: a sendvae.py checkpoint, or an "
                   "AutoencoderKL file in LDM / REPA-E / VA-VAE layout\n(the paper: VA-VAE f16d32)")
    p.add_argument("--disc-init", default="", help="PatchGAN weights (REPA-E "
                   "*-discriminator-ckpt.pt, an LDM/VA-VAE file's loss.discriminator.*);\n"
                   "default: random init as REPA-E")
    p.add_argument("--out-dir", default="out_sendvae", help="default %(default)s")
    p.add_argument("--resume", default="", help="'' (fresh, default) | auto (out-dir/ckpt.pt if "
                   "present) | PATH")
    # the alignment (section 3.3) and its ablations (Tab. 2, 3)
    p.add_argument("--vfm", default=None, help="dinov2_vitb14 | dinov2_vits14 | FILE.pth | "
                   "shapesvit (stand-in) | shapesnet (old stand-in) |\nunite:CKPT (stand-in) | "
                   "random-vit (tests)" + by("vfm"))
    p.add_argument("--align-weight", type=float, default=1.0,
                   help="lambda_align (paper %(default)s); 0 = plain VAE")
    p.add_argument("--mapper-depth", type=int, default=1, choices=[0, 1, 2],
                   help="ViT blocks in the mapper (default %(default)s)")
    p.add_argument("--align-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="noise the latent before the mapper (alpha ~ U(0,1)); --no-align-noise = "
                   "Tab. 3 'off'")
    p.add_argument("--proj-dim", type=int, default=None,
                   help="mapper MLP hidden width" + by("proj_dim"))
    p.add_argument("--bn-stats", default="running", choices=["running", "batch"],
                   help="the mapper's latent BatchNorm: running statistics from the global batch\n"
                   "(REPA-E's eval-mode BN; default) or each micro-batch's own (Mapper docstring)")
    # L_VAE (REPA-E configs/l1_lpips_kl_gan.yaml); 0 switches a term off
    p.add_argument("--lpips-weight", type=float, default=None,
                   help="LPIPS (VGG16)" + by("lpips_weight"))
    p.add_argument("--kl-weight", type=float, default=1e-6, help="default %(default)s")
    p.add_argument("--gan-weight", type=float, default=None,
                   help="hinge PatchGAN generator term" + by("gan_weight"))
    p.add_argument("--disc-lr", type=float, default=1e-4,
                   help="discriminator AdamW (default %(default)s)")
    p.add_argument("--disc-start", type=int, default=0,
                   help="step at which the GAN term and D's training start (default %(default)s)")
    # optimisation
    p.add_argument("--batch-size", type=int, default=None, help="global batch" + by("batch_size"))
    p.add_argument("--micro-batch", type=int, default=None,
                   help="per process per micro-step; 0 = batch / processes" + by("micro_batch"))
    p.add_argument("--lr", type=float, default=None, help="AdamW" + by("lr"))
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up" + by("warmup_steps"))
    p.add_argument("--epochs", type=float, default=None, help="training length" + by("epochs"))
    p.add_argument("--max-steps", type=int, default=None,
                   help="overrides --epochs" + by("max_steps"))
    p.add_argument("--time-budget", type=float, default=0,
                   help="also stop after this many CPU-seconds of the loop (0 = off, default; "
                   "bench.py)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="default %(default)s")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast; auto = bf16 where fast (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default %(default)s)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers (default: 0 in-memory, 8 folder)")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    p.add_argument("--log-every", type=int, default=50, help="default %(default)s")
    p.add_argument("--ckpt-every", type=int, default=500,
                   help="checkpoint every N steps (-1 = only at the end; default %(default)s)")
    # evaluation and the probe
    p.add_argument("--probe", default="", metavar="CKPT",
                   help="only run the attribute probe on this checkpoint")
    p.add_argument("--probe-data", default="", help="CelebA folder (list_attr_celeba.txt); "
                   "default: shapes")
    p.add_argument("--probe-train", type=int, default=4000,
                   help="images to fit the probe on (default %(default)s)")
    p.add_argument("--probe-test", type=int, default=2000,
                   help="images to score it on (default %(default)s)")
    p.add_argument("--eval-images", type=int, default=1000,
                   help="test images for PSNR and the cosine (default %(default)s)")
    args = p.parse_args(argv)
    for k, v in RUNS["tiny" if args.preset == "tiny" else "paper"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def load_vae(path, ck=None):
    """(AutoencoderKL, checkpoint dict) of a sendvae.py checkpoint (ck: that file, if loaded)."""
    ck = ck or load_checkpoint(path, "sendvae.py ", keys=("vae_config", "vae"))
    try:
        vae = AutoencoderKL(VAEConfig(**ck["vae_config"]))
        vae.load_state_dict(ck["vae"])
    except Exception as e:
        raise UserError(f"{path} is not a sendvae.py checkpoint ({type(e).__name__})") from None
    return vae.eval(), ck


def load_unite(path, ck=None):
    """The EMA model of a one-stage train.py checkpoint."""
    ck = ck or load_checkpoint(path, "train.py ", keys=("config", "ema"))
    try:
        m = UNITE(UniteConfig(**ck["config"]))
        m.load_state_dict(ck["ema"])
    except Exception as e:
        raise UserError(f"{path} is not a one-stage train.py checkpoint ({type(e).__name__})") \
            from None
    return m.eval()


class UniteTokenizer(UniteFeatures):
    """A one-stage UNITE checkpoint's tokenizer as the probe sees a VAE: encode(x) -> (z0,)."""

    def encode(self, x):
        return (self(x),)


def load_probe_target(path):
    """--probe CKPT: a sendvae.py checkpoint (its VAE's posterior means) or a train.py UNITE
    checkpoint (the EMA Generative Encoder's tokens), so bench.py's ablation probes both kinds the
    same way. Returns (module with .encode, image size, description)."""
    ck = load_checkpoint(path)
    if "vae" in ck:
        vae, ck = load_vae(path, ck)
        return vae, vae.cfg.resolution, (f"VAE, VFM {ck.get('vfm')}, align weight "
                                         f"{ck['args']['align_weight']}")
    m = load_unite(path, ck)
    return UniteTokenizer(m.encoder).eval(), m.cfg.image_size, "UNITE Generative Encoder (EMA)"


@torch.no_grad()
def evaluate(vae, mapper, vfm, images, align_noise, seed, batch=250):
    """(PSNR in dB of the posterior-mean reconstruction, mean alignment cosine) on images (N, 3, H,
    W) uint8. The cosine uses noise of a fixed seed when --align-noise, else the clean latent."""
    dev, g = next(vae.parameters()).device, torch.Generator().manual_seed(seed)
    mapper.eval()
    psnr, cos = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(dev).float() / 255
        mean, _ = vae.encode(x)                                                   # (B, C, h, w)
        mse = ((vae.decode(mean).clamp(0, 1) - x) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        psnr.append(10 * torch.log10(1 / mse))
        alpha = torch.rand(len(x), generator=g) if align_noise else torch.ones(len(x))
        eps = torch.randn(mean.shape, generator=g)
        cos.append(alignment(mapper, mean, vfm(x), alpha.to(dev), eps.to(dev))[1].expand(len(x)))
    mapper.train()
    return torch.cat(psnr).mean().item(), torch.cat(cos).mean().item()


def run_probe(args):
    vae, size, label = load_probe_target(args.probe)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(auto if args.device == "auto" else args.device)
    f1, mean, lams, split = probe_figures(vae.to(dev), args, size)
    print(f"{args.probe}: {label}")
    print_probe(f1, mean, args.probe_data or "shapes", split)
    print(json.dumps({"probe_f1": {k: round(v, 4) for k, v in f1.items()},
                      "probe_f1_mean": round(mean, 4), "probe_l2": lams, "probe_split": split}))


def load_state(path, vcfg, vae, mapper, opt, disc, opt_d):
    """Resume VAE, mapper, discriminator and optimizers from a sendvae.py checkpoint; its step."""
    ck = load_checkpoint(path, "sendvae.py ", keys=("vae_config", "vae", "mapper", "step"))
    if ck["vae_config"] != asdict(vcfg) or (disc is None) != (ck.get("disc") is None):
        raise UserError(f"{path} was trained with another VAE config or GAN setting; use "
                        f"another --out-dir")
    try:
        vae.load_state_dict(ck["vae"])
        mapper.load_state_dict(ck["mapper"])
        opt.load_state_dict(ck["optimizer"])
        if disc is not None:
            disc.load_state_dict(ck["disc"])
            opt_d.load_state_dict(ck["disc_optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: another mapper / VFM / optimizer setting "
                        f"({type(e).__name__}); use another --out-dir") from None
    return ck["step"]


def end_of_run(vae, mapper, vfm, ds, args, device, vcfg, p0):
    """Rank 0's figures: PSNR and alignment cosine on held-out images, the attribute probe, and a
    reconstruction grid. Returns the JSON's keys."""
    vae.eval()
    test = get_dataset(args.data, vcfg.resolution, "test") \
        if args.data in ("shapes", "cifar10") else ds
    imgs = test.images[:args.eval_images] if hasattr(test, "images") else torch.stack(
        [(test[i][0] * 255).round().byte() for i in range(min(args.eval_images, len(test)))])
    psnr, cos = evaluate(vae, mapper, vfm, imgs, args.align_noise, args.seed)
    res = dict(psnr=round(psnr, 2), align_cos=round(cos, 4))
    if args.data == "shapes" or args.probe_data:
        f1, mean_f1, lams, split = probe_figures(vae, args, vcfg.resolution)
        print_probe(f1, mean_f1, args.probe_data or "shapes", split)
        res.update(probe_f1_mean=round(mean_f1, 4), probe_l2=lams, probe_split=split,
                   probe_f1={k: round(v, 4) for k, v in f1.items()})
    with torch.no_grad():
        x = imgs[:8].to(device).float() / 255
        save_grid(torch.cat([x, vae.decode(vae.encode(x)[0]).clamp(0, 1)]),
                  os.path.join(args.out_dir, "recon.png"), 8)
    p0(f"PSNR {psnr:.2f} dB (posterior mean, {len(imgs)} test images) | alignment cosine "
       f"{cos:.3f} ({'noised' if args.align_noise else 'clean'} latents, VFM "
       f"{'STAND-IN ' if vfm.stand_in else ''}{args.vfm})")
    return res


STAT_NAMES = ["loss", "l1", "lpips", "kl", "gan", "align", "cos", "d_loss", "real", "fake"]


def micro_step(model, disc, disc_ddp, x, noise, feats, args, lpips, sync, accum, precision):
    """Forward and backward of one micro-batch: the VAE + mapper on L_VAE + w L_align (eq. 3), then
    D on (x, x_hat.detach()) when `disc` is given (the GAN is on: losses.py:238-277; disc_ddp is
    its DDP wrapper). Gradients are all-reduced only when `sync` (the last micro-step). Returns
    (z, STAT_NAMES values / accum)."""
    with contextlib.nullcontext() if sync else model.no_sync():
        with autocast(x.device, precision):
            recon, mean, logvar, z, align, cos = model(x, noise, feats, args.align_weight <= 0)
        loss, st = vae_loss(x, recon, mean, logvar, args, lpips, disc)
        w = args.align_weight if args.align_weight > 0 else 1.0  # w = 0: a mapper-only probe
        loss = loss + w * align                                                   # eq. 3
        (loss / accum).backward()
    d = torch.zeros(3, device=x.device)
    if disc is not None:
        with contextlib.nullcontext() if sync else disc_ddp.no_sync():
            d_loss, real, fake = disc_loss(disc_ddp, x, recon)
            (d_loss / accum).backward()
        d = torch.stack([d_loss.detach(), real, fake])
    return z, torch.cat([torch.stack([loss.detach(), st["l1"], st["lpips"], st["kl"], st["gan"],
                                      align.detach(), cos]), d]) / accum


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        return run_probe(args)
    rank, world, device, precision = setup_run(args.device, args.precision)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    vcfg = VAEConfig(**VAE_PRESETS[args.preset])
    vae, layout = AutoencoderKL(vcfg), "random init"
    if args.init:  # fine-tuning (the paper starts from VA-VAE)
        vae, vcfg, layout = load_init(args.init, vcfg)
    vae.to(device).train()
    vfm = load_vfm(args.vfm, vcfg.resolution) if rank == 0 else None  # rank 0 trains a stand-in ...
    if world > 1:
        dist.barrier()                                                  # ... the others read it
    vfm = (vfm or load_vfm(args.vfm, vcfg.resolution)).to(device)
    if args.data is None:
        raise UserError(f"--data is required for --preset {args.preset} (an image folder or "
                        f"cifar10)")
    ds = get_dataset(args.data, vcfg.resolution, "train")
    g_lat = vcfg.resolution // vcfg.factor
    mapper = Mapper(vcfg.z_channels, g_lat, vfm.dim, vfm.grid, args.mapper_depth, args.proj_dim,
                    args.bn_stats == "batch")
    raw = SendVAE(vae, mapper.to(device)).train()
    disc = NLayerDiscriminator().to(device).train() if args.gan_weight > 0 else None  # train mode
    if disc is not None and args.disc_init:  # as REPA-E, whose loss module is never put in eval
        load_disc(args.disc_init, disc)
    lpips = load_lpips(device) if args.lpips_weight > 0 else None  # offline: one line on where
    adamw = dict(betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, **adamw)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, **adamw) if disc else None

    args.micro_batch, accum, steps_per_epoch = split_batch(args.batch_size, args.micro_batch, world,
                                                            len(ds))
    total = args.max_steps or int(args.epochs * steps_per_epoch)
    p0 = open_log(args.out_dir, rank)
    step, resume = 0, resume_file(args.resume, args.out_dir)
    if resume:
        step = load_state(resume, vcfg, vae, mapper, opt, disc, opt_d)
        p0(f"resumed from {resume} at step {step}")
    ids = [device.index] if device.type == "cuda" else None
    # the mapper's BN buffers are kept equal by update_bn (no broadcast needed)
    model = DDP(raw, device_ids=ids, broadcast_buffers=False) if world > 1 else raw
    # D's BatchNorm runs on batch statistics; DDP's default buffer broadcast as accelerate does
    disc_ddp = DDP(disc, device_ids=ids) if world > 1 and disc is not None else disc

    terms = [n for n, w in (("L1", 1), ("LPIPS", args.lpips_weight), ("KL", args.kl_weight),
                            ("GAN", args.gan_weight), ("align", args.align_weight)) if w > 0]
    p0(f"Send-VAE {args.preset}: VAE {count_params(vae) / 1e6:.2f}M (latent {vcfg.z_channels}x"
       f"{g_lat}x{g_lat}; {layout}{' ' + args.init if args.init else ''}), mapper "
       f"{count_params(mapper) / 1e6:.2f}M (depth {args.mapper_depth}, noise {args.align_noise}), "
       f"align weight {args.align_weight} | loss: {' + '.join(terms)} | VFM: {vfm.label} "
       f"({vfm.grid}x{vfm.grid} tokens of {vfm.dim}) | data {args.data}: {len(ds)} images | "
       f"{device}, {precision}, world {world} | batch {args.batch_size} = {args.micro_batch} x "
       f"{accum} accum x {world} | {total} steps ({steps_per_epoch} per epoch) | lr {args.lr:.1e}")
    p0("args: " + json.dumps(vars(args)))
    loader = make_loader(ds, args.batch_size, args.seed, step, accum, world, rank, device,
                         args.num_workers)

    def checkpoint(results=None):  # atomic (data.py); every rank waits for it
        if rank == 0:
            save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
                "vae": vae.state_dict(), "vae_config": asdict(vcfg), "mapper": mapper.state_dict(),
                "optimizer": opt.state_dict(), "disc": disc.state_dict() if disc else None,
                "disc_optimizer": opt_d.state_dict() if disc else None, "step": step,
                "args": vars(args), "vfm": vfm.label, "vfm_stand_in": vfm.stand_in,
                "init": args.init, "results": results or {}})
        if world > 1:
            dist.barrier()

    stats, seen, bad = torch.zeros(len(STAT_NAMES), device=device), 0, 0
    stop = StopCheck(args.time_budget, "cpu", device, world)  # CPU clock: fair on a shared CPU
    t0, step0, zshape = time.time(), step, (vcfg.z_channels, g_lat, g_lat)
    while step < total and not stop():
        # ------------------------------------------------ one optimization step
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
        for grp in opt.param_groups:
            grp["lr"] = lr
        gan_on = disc is not None and step >= args.disc_start
        moments, n_lat = torch.zeros(2, vcfg.z_channels, device=device), 0
        for m in range(accum):
            x = next(loader)[0].to(device, non_blocking=True)                     # (b, 3, H, W)
            lo = (m * world + rank) * args.micro_batch  # global rows of this micro-batch (= data's)
            noise = step_noise(zshape, args.seed, step, range(lo, lo + args.micro_batch), device,
                               args.align_noise)
            with autocast(device, precision):
                feats = vfm(x)                                                    # (b, N, D)
            sync = m == accum - 1 or world == 1  # all-reduce gradients only on the last micro-step
            z, st = micro_step(model, disc if gan_on else None, disc_ddp, x, noise, feats, args,
                               lpips, sync, accum, precision)
            mo, k = latent_moments(z)
            moments, n_lat, stats = moments + mo, n_lat + k, stats + st
        if world > 1:
            dist.all_reduce(moments)
        # step 0 normalised with the initial (0, 1) statistics; its batch then sets them (REPA-E
        # starts from the VAE's -latents-stats.pt file instead, train_repae.py:203-208)
        if args.bn_stats == "running":
            mapper.update_bn(moments, n_lat * world, first=step == 0)
        norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        d_norm = torch.nn.utils.clip_grad_norm_(disc.parameters(), args.grad_clip) if gan_on else \
            torch.zeros((), device=device)
        if torch.isfinite(norm) and torch.isfinite(d_norm):  # a sync; the same on every rank
            opt.step()
            if gan_on:
                opt_d.step()
            bad = 0
        else:  # the same rule as optim.train_step
            bad += 1
            p0(f"step {step}: non-finite loss/gradient, step skipped")
            if bad >= 5:
                raise UserError("5 non-finite steps in a row: lower --lr or use --precision fp32")
        opt.zero_grad(set_to_none=True)
        if opt_d:
            opt_d.zero_grad(set_to_none=True)
        step, seen = step + 1, seen + args.batch_size
        # ------------------------------------------------ once in a while: log, save
        if step % args.log_every == 0 or step == total:
            n = (step - 1) % args.log_every + 1
            v = dict(zip(STAT_NAMES, (all_mean(stats, world) / n).tolist()))  # a sync: log time
            gan_txt = (f" | gan {v['gan']:.4f} | d {v['d_loss']:.4f} (real {v['real']:.3f} fake "
                       f"{v['fake']:.3f}, grad {d_norm.item():.3f})" if disc is not None else "")
            p0(f"step {step} | loss {v['loss']:.4f} | l1 {v['l1']:.4f} | lpips {v['lpips']:.4f} | "
               f"kl {v['kl']:.1f} | align {v['align']:.4f} (cos {v['cos']:.3f}) | grad "
               f"{norm.item():.3f}{gan_txt} | lr {lr:.1e} | {seen / (time.time() - t0):.1f} img/s")
            stats, seen, t0 = torch.zeros(len(STAT_NAMES), device=device), 0, time.time()
        if args.ckpt_every > 0 and step % args.ckpt_every == 0:
            checkpoint()
    train_s, train_cpu_s = time.time() - stop.t0, time.process_time() - stop.cpu0
    if stop.out_of_time and not stop.sigterm:
        p0(f"--time-budget {args.time_budget:g} CPU-s reached: stopped at step {step} of {total}")
    if stop.sigterm:
        checkpoint()
        p0(f"SIGTERM: saved {args.out_dir}/ckpt.pt at step {step}, exiting")
        return
    # ------------------------------------------------ end of run: PSNR, cosine, probe; JSON last
    res = {"preset": args.preset, "vfm": args.vfm, "vfm_stand_in": vfm.stand_in,
           "align_weight": args.align_weight, "mapper_depth": args.mapper_depth,
           "align_noise": args.align_noise, "loss_terms": terms, "steps": step, "world": world}
    if rank == 0:
        res.update(end_of_run(vae, mapper, vfm, ds, args, device, vcfg, p0))
        res.update(train_s=round(train_s, 1), cpu_s=round(train_cpu_s, 1),
                   img_per_s=round((step - step0) * args.batch_size / max(train_s, 1e-9), 1),
                   total_s=round(time.time() - stop.t0, 1))
    checkpoint(res)
    p0(f"wrote {args.out_dir}/ckpt.pt and {args.out_dir}/recon.png (top: inputs, bottom: recons)")
    p0(json.dumps(res))


if __name__ == "__main__":
    run_main(main)
