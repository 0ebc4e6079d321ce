"""
Send-VAE: a VAE whose NOISED latents, through a small non-linear mapper, are aligned to frozen VFM patch features.
"Boosting Latent Diffusion Models via Disentangled Representation Alignment" (v2: "... via Semantic-Disentangled
VAE"), Page, Niu et al., arXiv 2601.05823. Stage 1 of two; stage 2 is `python train.py --tokenizer CKPT`.

    python sendvae.py                                  # tiny VAE, built-in shapes data, CPU, ~7 minutes
    python sendvae.py --align-weight 0                 # the plain-VAE baseline (same run, no alignment)
    python sendvae.py --probe out_sendvae/ckpt.pt      # attribute probe (section 4.5): per-attribute F1
    python sendvae.py --preset f16d32 --data /imagenet/train --init va_vae.pt   # the paper: DINOv2-B/14, 256 px

One training step (section 3.3, eq. 1-3), and where the gradients go:

    x ─> VAE encoder ─> z ~ q(z|x) ─> VAE decoder ─> x_hat ── L1(x_hat, x) + 1e-6 KL ──────────────────┐
                         │                                                                            ├─> loss
                         └─> BN ─> z_t = a z + (1-a) eps, a ~ U(0,1) ─> mapper ─> (B, N, D) ─┐        │
    x ─> VFM (frozen, no grad; DINOv2: 224 px, last-layer LayerNorm-ed patch tokens) ─> (B, N, D) ┴─ mean_n (1 - cos)
    The alignment loss reaches the VAE ENCODER through z (scaled by a); the decoder only sees L1 + KL. Both the
    VAE and the mapper train; the mapper is thrown away afterwards. --align-weight 0 = plain VAE (the mapper
    still trains, on a detached z, so that the alignment cosine is measured the same way for both).

Offline there are no DINOv2 weights. The default VFM of the tiny run is a STAND-IN: the frozen conv trunk of
fid.py's ShapesNet (trained once on the shapes attribute labels, cached), whose last feature map gives 4x4 patch
tokens of 64-d. It was trained on the very attributes the probe measures, so the probe gain it gives is a check
of the plumbing, not evidence about DINOv2. Not implemented: LPIPS (no VGG weights here), the PatchGAN, DDP.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import (DataError, autocast, batch_indices, cache_dir, download, error_line, file_hash, get_dataset,
                  load_checkpoint, load_image, pick_precision, print0, save_checkpoint, save_grid)
from model import VAE_PRESETS, AutoencoderKL, UniteConfig, UNITE, VAEConfig, ViTBlock, attend, count_params, sincos_2d

# -----------------------------------------------------------------------------
# DINOv2 (the VFM): a minimal ViT that loads the official checkpoint files as they are

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}_pretrain.pth"
# sha256 of the official files: NOT pinned. We could not verify them here (no network), and a digest from memory
# would be a guess. An unpinned file is loaded with a warning; pin the digests here once checked.
DINOV2_SHA256 = {"vits14": None, "vitb14": None}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_file(arch, path=None):
    """Path of the DINOv2 weight file: an explicit path, or <cache dir>/dinov2_<arch>_pretrain.pth (downloaded
    there only if its sha256 is pinned). Missing -> one-line DataError saying where to put the file."""
    if arch not in DINOV2_SHA256:
        raise DataError(f"unknown DINOv2 arch {arch!r}: vits14 or vitb14")
    url, digest = DINOV2_URL.format(arch=arch), DINOV2_SHA256[arch]
    if path:  # explicitly given: a checksum mismatch only warns (it may be a re-saved or converted copy)
        if not os.path.isfile(path):
            raise DataError(f"DINOv2 weight file not found: {path}")
        if digest and file_hash(path) != digest:
            print(f"warning: {path} is not the official {arch} file (sha256 differs)", file=sys.stderr)
        return path
    path = os.path.join(cache_dir(), f"dinov2_{arch}_pretrain.pth")
    if digest:
        return download(url, path, "sha256", digest)
    if not os.path.isfile(path):
        raise DataError(f"DINOv2 weights not found: download {url} and put it at {path} (or pass --vfm FILE); "
                        f"offline, use a stand-in: --vfm shapesnet or --vfm unite:CKPT")
    print(f"warning: {path}: sha256 not pinned in this code, file not verified", file=sys.stderr)
    return path


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class DinoBlock(ViTBlock):
    """model.ViTBlock (same norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2 names, LayerNorm eps 1e-6, exact GELU)
    plus DINOv2's layer scale on both residual branches (ls1.gamma, ls2.gamma)."""

    def __init__(self, dim, heads):
        super().__init__(dim, heads)
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v).transpose(1, 2).reshape(B, T, D)
        x = x + self.ls1.gamma * self.attn.proj(a)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DINOv2(nn.Module):
    """DINOv2 ViT (no registers) loading the official state dict as is (mask_token ignored). The shape is read
    off the weights: width from cls_token, depth from blocks.N, patch from patch_embed.proj, position grid from
    pos_embed (37x37 = 518 px / 14), heads = width / 64 (every DINOv2 size). `dims` = (width, depth, patch,
    pos_grid) builds an untrained one instead (tests, --vfm random-vit).
    forward(x): ImageNet-normalised (N, 3, H, W) -> last block's LayerNorm-ed patch tokens (N, H/14 * W/14, D),
    i.e. the official `x_norm_patchtokens` (CLS dropped) that REPA / REPA-E align to."""

    def __init__(self, arch="vitb14", weights_path=None, dims=None):
        super().__init__()
        sd = None
        if dims is None:
            path = dinov2_file(arch, weights_path)
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise DataError(f"{path} is not a DINOv2 state dict ({type(e).__name__})") from None
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
                raise DataError(f"not an official DINOv2 state dict: {str(e).splitlines()[1].strip()}") from None
        self.eval().requires_grad_(False)

    def interpolate_pos_encoding(self, h, w):
        """(1, 1 + h*w, D): the 37x37 table resized to the h x w patch grid exactly as the official
        vision_transformer.py interpolate_pos_encoding: bicubic, no antialias, align_corners False, and the
        size given as scale_factor (grid + 0.1) / 37 (the "+0.1" offset avoids a float round-down, dino issue #8).
        (REPA/REPA-E's load_encoders instead resample the table once with timm's resample_abs_pos_embed, a
        size-based call; the two differ slightly. The issue asks for the official function, so it is used.)"""
        M, D = self.pos_grid, self.pos_embed.shape[-1]
        if (h, w) == (M, M):
            return self.pos_embed
        patch = self.pos_embed[:, 1:].float().reshape(1, M, M, D).permute(0, 3, 1, 2)      # (1, D, 37, 37)
        patch = F.interpolate(patch, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic")
        assert patch.shape[-2:] == (h, w)
        return torch.cat([self.pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, D)], dim=1)

    def forward(self, x):
        B, _, H, W = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)                             # (B, hw, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)                        # (B, 1+hw, D)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]                                                          # (B, hw, D)


def dinov2_input(x, size=224):
    """[0, 1] images (B, 3, H, W) -> ImageNet-normalised, bicubic-resized to size x size (REPA-E's
    preprocess_raw_image order: normalise, then resize; 224 px gives the 16x16 token grid)."""
    mean, std = torch.tensor(IMAGENET_MEAN, device=x.device), torch.tensor(IMAGENET_STD, device=x.device)
    x = (x - mean[:, None, None]) / std[:, None, None]
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


# -----------------------------------------------------------------------------
# the VFM seen as patch tokens: DINOv2, or an explicitly labelled offline stand-in

class FrozenVFM(nn.Module):
    """forward(x in [0, 1]) -> (B, grid*grid, dim) patch features; frozen, never receives gradients."""

    def __init__(self, net, prep, dim, grid, label, stand_in):
        super().__init__()
        self.net, self.prep = net.eval().requires_grad_(False), prep
        self.dim, self.grid, self.label, self.stand_in = dim, grid, label, stand_in

    @torch.no_grad()
    def forward(self, x):
        return self.net(self.prep(x)).float()


class ShapesTrunk(nn.Module):
    """fid.py's ShapesNet up to its last conv stage: (B, 3, 32, 32) -> (B, 16, 64), a 4x4 grid of 64-d tokens."""

    def __init__(self, net):
        super().__init__()
        self.body = net.body[:-3]  # drop Flatten / Linear / ReLU

    def forward(self, x):
        return self.body((x.contiguous() - 0.5) / 0.25).flatten(2).transpose(1, 2)     # ShapesNet's input scaling


class UniteFeatures(nn.Module):
    """A UNITE checkpoint's frozen Generative Encoder used as a feature extractor: its tokenizer pass with fixed
    register noise and t = 0 -> (B, K, C) LayerNorm-ed latent tokens on the patch grid."""

    def __init__(self, ge):
        super().__init__()
        self.ge = ge
        self.register_buffer("regs", torch.randn(1, ge.cfg.num_tokens, ge.cfg.latent_dim,
                                                 generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        B, null = x.shape[0], torch.full((x.shape[0],), self.ge.cfg.num_classes, device=x.device)
        return self.ge(self.regs.expand(B, -1, -1), torch.zeros(B, device=x.device), null, x)


def load_vfm(spec, image_size):
    """--vfm: dinov2_vitb14 | dinov2_vits14 | FILE.pth (a DINOv2 file) | shapesnet | unite:CKPT | random-vit."""
    if spec.startswith("dinov2_") or (spec.endswith((".pth", ".pt")) and not spec.startswith("unite:")):
        net = DINOv2(spec[len("dinov2_"):], None) if spec.startswith("dinov2_") else DINOv2(weights_path=spec)
        return FrozenVFM(net, dinov2_input, net.norm.normalized_shape[0], 16, f"DINOv2 {spec}", False)
    if spec == "shapesnet":
        if image_size != 32:
            raise DataError("--vfm shapesnet needs 32x32 images (it is trained on the built-in shapes data)")
        import fid
        return FrozenVFM(ShapesTrunk(fid.load_shapes_net()), lambda x: x, 64, 4,
                         "STAND-IN shapesnet: fid.py's ShapesNet conv trunk (trained on the shapes attributes), "
                         "not DINOv2", True)
    if spec.startswith("unite:"):
        path = spec[len("unite:"):]
        m = load_unite(path)
        if m.cfg.image_size != image_size:
            raise DataError(f"--vfm {spec}: trained at {m.cfg.image_size} px, the VAE is {image_size} px")
        return FrozenVFM(UniteFeatures(m.encoder), lambda x: x, m.cfg.latent_dim, m.cfg.grid,
                         f"STAND-IN unite:{path}: a frozen UNITE Generative Encoder, not DINOv2", True)
    if spec == "random-vit":  # meaningless features: tests only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = DINOv2(dims=(64, 2, 14, 37))
        size = 224 if image_size >= 224 else 56
        return FrozenVFM(net, lambda x: dinov2_input(x, size), 64, size // 14,
                         "STAND-IN random-vit: an untrained ViT (tests only), not DINOv2", True)
    raise DataError(f"unknown --vfm {spec!r}: dinov2_vitb14, dinov2_vits14, a .pth file, shapesnet, unite:CKPT, "
                    f"random-vit")


# -----------------------------------------------------------------------------
# the mapper and the alignment loss (section 3.3)

def noise_mix(z, alpha, eps):
    """Eq. 1: z_t = alpha z + (1 - alpha) eps, alpha (B,) per sample, as SiT's linear path (t = 1 clean, the
    convention of model.py). alpha = 1 gives z."""
    a = alpha.view(-1, *[1] * (z.dim() - 1))
    return a * z + (1 - a) * eps


def align_loss(pred, target):
    """Eq. 2: mean over samples and patches of 1 - cos(pred_n, target_n); pred, target (B, N, D). 0 when equal,
    2 when opposite."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


class Mapper(nn.Module):
    """h_phi: BN (affine-free, as REPA-E's latent normalisation) -> [noise] -> patch embedding -> `depth` pre-norm
    ViT blocks (width = the VFM's, heads = width / 64: 12 for 768-d, the paper's rule) -> MLP projector
    (Linear-SiLU-Linear-SiLU-Linear, REPA's build_mlp; hidden 2048 in the paper) -> (B, g*g, D_vfm), g = the VFM's
    token grid. Depth 0 = patch embedding + projector (Tab. 2). The patch size maps the latent grid onto the VFM
    grid (f16 latent + DINOv2 at 224: both 16x16, patch 1; f8: patch 2); a coarser latent grid is upsampled
    (bilinear) to g x g at the end, a case the paper never has."""

    def __init__(self, z_channels, latent_grid, vfm_dim, vfm_grid, depth=1, proj_dim=2048):
        super().__init__()
        D, self.vfm_grid = vfm_dim, vfm_grid
        p = max(1, latent_grid // vfm_grid)
        self.bn = nn.BatchNorm2d(z_channels, affine=False, eps=1e-4, momentum=0.1)
        self.patch_embed = nn.Conv2d(z_channels, D, p, p)
        self.register_buffer("pos", sincos_2d(D, latent_grid // p)[None], persistent=False)  # fixed 2-D sin-cos
        self.blocks = nn.ModuleList(ViTBlock(D, max(1, D // 64)) for _ in range(depth))
        self.proj = nn.Sequential(nn.Linear(D, proj_dim), nn.SiLU(), nn.Linear(proj_dim, proj_dim), nn.SiLU(),
                                  nn.Linear(proj_dim, vfm_dim))

    def forward(self, z_t):
        x = self.patch_embed(z_t).flatten(2).transpose(1, 2) + self.pos                    # (B, n*n, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.proj(x)                                                                    # (B, n*n, D_vfm)
        n, g = math.isqrt(x.shape[1]), self.vfm_grid
        if n != g:
            x = F.interpolate(x.transpose(1, 2).unflatten(2, (n, n)), size=(g, g), mode="bilinear")
            x = x.flatten(2).transpose(1, 2)                                                # (B, g*g, D_vfm)
        return x


def alignment(mapper, z, feats, alpha, eps):
    """L_align for latents z (B, C, h, w) against VFM tokens feats (B, N, D); returns (loss, mean cosine)."""
    z_t = noise_mix(mapper.bn(z), alpha, eps)     # BN first: the noise level means the same at any latent scale
    loss = align_loss(mapper(z_t), feats)
    return loss, 1 - loss.detach()


# -----------------------------------------------------------------------------
# attribute probe (section 4.5): a linear classifier on the flattened latents, F1 per attribute

@torch.no_grad()
def flat_latents(vae, images, batch=250):
    """(N, 3, H, W) uint8 or [0, 1] floats -> (N, C*h*w) posterior means (the probe's features)."""
    dev = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(dev)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        out.append(vae.encode(x)[0].flatten(1).float().cpu())
    return torch.cat(out)


def f1_score(pred, true, n_values):
    """Binary attributes: F1 of the positive class (multi-label convention). More values: macro F1 over the
    values present in true or pred (as sklearn's f1_score(average="macro"))."""
    f1 = []
    for c in ([1] if n_values == 2 else range(n_values)):
        tp = ((pred == c) & (true == c)).sum().item()
        denom = (pred == c).sum().item() + (true == c).sum().item()
        if denom or n_values == 2:
            f1.append(2 * tp / denom if denom else 0.0)
    return sum(f1) / len(f1)


def linear_probe(x_train, labels_train, x_test, labels_test, ridge=1.0):
    """Closed-form linear classifier: standardise the features, ridge-regress one-hot targets of every attribute
    at once (one float64 solve), predict the argmax per attribute. labels_*: {attribute: (N,) int}.
    Returns {attribute: F1 on the test set}."""
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    X = torch.cat([(x_train - mu) / sd, torch.ones(len(x_train), 1)], 1).double()        # (N, F+1)
    Xt = torch.cat([(x_test - mu) / sd, torch.ones(len(x_test), 1)], 1).double()
    n_values = {k: int(max(v.max(), labels_test[k].max())) + 1 for k, v in labels_train.items()}
    Y = torch.cat([F.one_hot(torch.as_tensor(v).long(), n_values[k]) for k, v in labels_train.items()], 1).double()
    reg = ridge * torch.eye(X.shape[1], dtype=torch.float64)
    W = torch.linalg.solve(X.T @ X + reg, X.T @ Y)                                        # (F+1, sum of values)
    scores, out, i = Xt @ W, {}, 0
    for k, n in n_values.items():
        out[k] = f1_score(scores[:, i:i + n].argmax(1), torch.as_tensor(labels_test[k]).long(), n)
        i += n
    return out


def celeba_probe_data(folder, size, n):
    """CelebA: folder with list_attr_celeba.txt and the images (in folder/ or folder/img_align_celeba/), in file
    order, center-cropped to size. Returns (images uint8 (n, 3, size, size), {attribute: (n,) 0/1})."""
    attr_file = os.path.join(folder, "list_attr_celeba.txt")
    if not os.path.isfile(attr_file):
        raise DataError(f"--probe-data {folder}: no list_attr_celeba.txt there")
    lines = open(attr_file).read().split("\n")
    names, rows = lines[1].split(), [l.split() for l in lines[2:2 + n] if l.strip()]
    img_dir = os.path.join(folder, "img_align_celeba")
    img_dir = img_dir if os.path.isdir(img_dir) else folder
    imgs = torch.stack([torch.from_numpy(load_image(os.path.join(img_dir, r[0]), size)).permute(2, 0, 1)
                        for r in rows])
    return imgs, {a: torch.tensor([int(r[1 + j]) > 0 for r in rows]).long() for j, a in enumerate(names)}


def probe_figures(vae, args, size):
    """Per-attribute F1 and their mean; shapes: train split -> test split; CelebA: first n -> next n_test."""
    n, nt = args.probe_train, args.probe_test
    if args.probe_data:
        imgs, attrs = celeba_probe_data(args.probe_data, size, n + nt)
        tr, te = (imgs[:n], {k: v[:n] for k, v in attrs.items()}), (imgs[n:], {k: v[n:] for k, v in attrs.items()})
    else:
        a, b = get_dataset("shapes", size, "train"), get_dataset("shapes", size, "test")
        tr = (a.images[:n], {k: torch.from_numpy(v[:n]) for k, v in a.attrs.items()})
        te = (b.images[:nt], {k: torch.from_numpy(v[:nt]) for k, v in b.attrs.items()})
    f1 = linear_probe(flat_latents(vae, tr[0]), tr[1], flat_latents(vae, te[0]), te[1])
    return f1, sum(f1.values()) / len(f1)


def print_probe(f1, mean, source):
    print(f"attribute probe on {source} (linear, flattened posterior means; F1, macro over values):")
    print("  " + "  ".join(f"{k} {v:.3f}" for k, v in f1.items()) + f"  | mean {mean:.3f}")


# -----------------------------------------------------------------------------
# the command line: train (default) or --probe

RUNS = {  # run defaults: a CPU budget for tiny; the paper's for the 256 px presets (AdamW 3e-4, batch 1024, 80 ep)
    "tiny": dict(data="shapes", vfm="shapesnet", batch_size=32, lr=1e-3, max_steps=600, proj_dim=256),
    "paper": dict(data=None, vfm="dinov2_vitb14", batch_size=1024, lr=3e-4, max_steps=100_000, proj_dim=2048),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(VAE_PRESETS), help="VAE shape (model.VAE_PRESETS)")
    p.add_argument("--data", default=None, help="shapes | cifar10 | image folder (tiny default: shapes)")
    p.add_argument("--init", default="", help="fine-tune the VAE of this sendvae.py checkpoint (config included)")
    p.add_argument("--out-dir", default="out_sendvae")
    # the alignment (section 3.3) and its ablations (Tab. 2, 3)
    p.add_argument("--vfm", default=None, help="dinov2_vitb14 (paper presets) | dinov2_vits14 | FILE.pth | "
                   "shapesnet (tiny default, a stand-in) | unite:CKPT (stand-in) | random-vit (tests)")
    p.add_argument("--align-weight", type=float, default=1.0, help="lambda_align (paper 1.0); 0 = plain VAE")
    p.add_argument("--mapper-depth", type=int, default=1, choices=[0, 1, 2], help="ViT blocks in the mapper")
    p.add_argument("--align-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="noise the latent before the mapper (alpha ~ U(0,1)); --no-align-noise = Tab. 3 'off'")
    p.add_argument("--proj-dim", type=int, default=None, help="mapper MLP hidden width (paper presets 2048)")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    # optimisation
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="AdamW (paper 3e-4)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=0, help="also stop after this many CPU-seconds of the loop "
                   "(0 = off; bench.py --ablation)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: 0 in-memory, 8 folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    # evaluation and the probe
    p.add_argument("--probe", default="", metavar="CKPT", help="only run the attribute probe on this checkpoint")
    p.add_argument("--probe-data", default="", help="CelebA folder (list_attr_celeba.txt); default: shapes")
    p.add_argument("--probe-train", type=int, default=4000, help="images to fit the probe on")
    p.add_argument("--probe-test", type=int, default=2000, help="images to score it on")
    p.add_argument("--eval-images", type=int, default=1000, help="test images for PSNR and the cosine")
    args = p.parse_args(argv)
    for k, v in RUNS["tiny" if args.preset == "tiny" else "paper"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def load_vae(path, ck=None):
    """(AutoencoderKL, checkpoint dict) of a sendvae.py checkpoint (ck: that file, if already loaded)."""
    ck = ck or load_checkpoint(path, "sendvae.py ", keys=("vae_config", "vae"))
    try:
        vae = AutoencoderKL(VAEConfig(**ck["vae_config"]))
        vae.load_state_dict(ck["vae"])
    except Exception as e:
        raise DataError(f"{path} is not a sendvae.py checkpoint ({type(e).__name__})") from None
    return vae.eval(), ck


def load_unite(path, ck=None):
    """The EMA model of a one-stage train.py checkpoint."""
    ck = ck or load_checkpoint(path, "train.py ", keys=("config", "ema"))
    try:
        m = UNITE(UniteConfig(**ck["config"]))
        m.load_state_dict(ck["ema"])
    except Exception as e:
        raise DataError(f"{path} is not a one-stage train.py checkpoint ({type(e).__name__})") from None
    return m.eval()


class UniteTokenizer(UniteFeatures):
    """A one-stage UNITE checkpoint's tokenizer as the probe sees a VAE: encode(x) -> (z0 (B, K, C),)."""

    def encode(self, x):
        return (self(x),)


def load_probe_target(path):
    """--probe CKPT: a sendvae.py checkpoint (its VAE's posterior means) or a train.py UNITE checkpoint (the EMA
    Generative Encoder's tokens), so that bench.py's ablation probes both kinds the same way.
    Returns (module with .encode, image size, description)."""
    ck = load_checkpoint(path)
    if "vae" in ck:
        vae, ck = load_vae(path, ck)
        return vae, vae.cfg.resolution, f"VAE, VFM {ck.get('vfm')}, align weight {ck['args']['align_weight']}"
    m = load_unite(path, ck)
    return UniteTokenizer(m.encoder).eval(), m.cfg.image_size, "UNITE Generative Encoder (EMA), tokenizer pass"


@torch.no_grad()
def evaluate(vae, mapper, vfm, images, align_noise, seed, batch=250):
    """(PSNR in dB of the posterior-mean reconstruction, mean alignment cosine) on images (N, 3, H, W) uint8.
    The cosine uses the training noise (fixed seed) when --align-noise, else the clean latent."""
    dev, g = next(vae.parameters()).device, torch.Generator().manual_seed(seed)
    mapper.eval()  # BN running statistics
    psnr, cos = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(dev).float() / 255
        mean, _ = vae.encode(x)                                                             # (B, C, h, w)
        mse = ((vae.decode(mean).clamp(0, 1) - x) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        psnr.append(10 * torch.log10(1 / mse))
        alpha = torch.rand(len(x), generator=g) if align_noise else torch.ones(len(x))
        eps = torch.randn(mean.shape, generator=g)
        cos.append(alignment(mapper, mean, vfm(x), alpha.to(dev), eps.to(dev))[1].expand(len(x)))
    mapper.train()
    return torch.cat(psnr).mean().item(), torch.cat(cos).mean().item()


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.probe:  # ------------------------------------------------ probe only
        vae, size, label = load_probe_target(args.probe)
        f1, mean = probe_figures(vae.to(device), args, size)
        print(f"{args.probe}: {label}")
        print_probe(f1, mean, args.probe_data or "shapes")
        print(json.dumps({"probe_f1": {k: round(v, 4) for k, v in f1.items()}, "probe_f1_mean": round(mean, 4)}))
        return

    torch.manual_seed(args.seed)
    vcfg = VAEConfig(**VAE_PRESETS[args.preset])
    vae = AutoencoderKL(vcfg)
    if args.init:  # fine-tuning (the paper starts from VA-VAE): the checkpoint's config replaces the preset
        vae, _ = load_vae(args.init)
        vcfg = vae.cfg
    vae.to(device).train()
    vfm = load_vfm(args.vfm, vcfg.resolution).to(device)  # before the data: a missing DINOv2 fails in one line
    if args.data is None:
        raise DataError(f"--data is required for --preset {args.preset} (an image folder, or cifar10)")
    ds = get_dataset(args.data, vcfg.resolution, "train")
    g_lat = vcfg.resolution // vcfg.factor
    mapper = Mapper(vcfg.z_channels, g_lat, vfm.dim, vfm.grid, args.mapper_depth, args.proj_dim).to(device)
    opt = torch.optim.AdamW(list(vae.parameters()) + list(mapper.parameters()), lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=0.0)
    precision = pick_precision(args.precision, device)
    os.makedirs(args.out_dir, exist_ok=True)
    log = open(os.path.join(args.out_dir, "log.txt"), "a")
    p0 = lambda *a: print0(*a, log=log)
    p0(f"Send-VAE {args.preset}: VAE {count_params(vae) / 1e6:.2f}M (latent {vcfg.z_channels}x{g_lat}x{g_lat}), "
       f"mapper {count_params(mapper) / 1e6:.2f}M (depth {args.mapper_depth}, noise {args.align_noise}), "
       f"align weight {args.align_weight} | VFM: {vfm.label} ({vfm.grid}x{vfm.grid} tokens of {vfm.dim}) | "
       f"data {args.data}: {len(ds)} images | {device}, {precision} | batch {args.batch_size}, lr {args.lr:.1e}, "
       f"{args.max_steps} steps" + (f" | init {args.init}" if args.init else ""))
    p0("args: " + json.dumps(vars(args)))
    workers = args.num_workers if args.num_workers is not None else 0 if hasattr(ds, "images") else 8
    loader = iter(torch.utils.data.DataLoader(ds, num_workers=workers,
                                              batch_sampler=batch_indices(len(ds), args.batch_size, args.seed, 0, 1, 1, 0)))
    gen = torch.Generator(device).manual_seed(args.seed)  # the step's noise

    def checkpoint(step, results=None):
        save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
            "vae": vae.state_dict(), "vae_config": asdict(vcfg), "mapper": mapper.state_dict(),
            "optimizer": opt.state_dict(), "step": step, "args": vars(args), "vfm": vfm.label,
            "vfm_stand_in": vfm.stand_in, "results": results or {}})

    t0 = t_start = time.time()
    sums = torch.zeros(5)
    cpu0, steps = time.process_time(), args.max_steps
    for step in range(args.max_steps):
        if args.time_budget > 0 and time.process_time() - cpu0 > args.time_budget:
            steps = step
            break
        # ------------------------------------------------ one optimization step
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps)  # linear warmup, then constant (as REPA-E)
        for grp in opt.param_groups:
            grp["lr"] = lr
        x = next(loader)[0].to(device)                                                      # (B, 3, H, W) [0, 1]
        B = x.shape[0]
        feats = vfm(x)                                                                      # (B, N, D), no grad
        eps_post = torch.randn(B, vcfg.z_channels, g_lat, g_lat, device=device, generator=gen)
        eps_align = torch.randn(B, vcfg.z_channels, g_lat, g_lat, device=device, generator=gen)
        alpha = torch.rand(B, device=device, generator=gen) if args.align_noise else torch.ones(B, device=device)
        with autocast(device, precision):
            mean, logvar = vae.encode(x)                                                    # (B, C, h, w) each
            z = mean + (0.5 * logvar).exp() * eps_post                                      # posterior sample
            recon = vae.decode(z)
            # L1 in the [-1, 1] range the code works in (2x the [0, 1] L1), so the KL weight 1e-6 means the
            # same as REPA-E's l1_lpips_kl_gan.yaml; KL summed over latent dims, mean over the batch (as LDM)
            l1 = 2 * (recon.float() - x).abs().mean()
            kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1).mean()
            w = args.align_weight
            align, cos = alignment(mapper, z if w > 0 else z.detach(), feats, alpha, eps_align)
            loss = l1 + args.kl_weight * kl + (w if w > 0 else 1.0) * align  # eq. 3 (w = 0: mapper-only probe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(vae.parameters()) + list(mapper.parameters()), args.grad_clip)
        if not torch.isfinite(norm):
            raise DataError(f"step {step}: non-finite loss/gradient: lower --lr or use --precision fp32")
        opt.step()
        sums += torch.stack([loss.detach(), l1.detach(), kl.detach(), align.detach(), cos]).float().cpu()
        # ------------------------------------------------ once in a while: log, save
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            n = (step % args.log_every) + 1
            l, r, k, a, c = (sums / n).tolist()
            p0(f"step {step + 1} | loss {l:.4f} | l1 {r:.4f} | kl {k:.1f} | align {a:.4f} (cos {c:.3f}) | "
               f"grad {norm.item():.3f} | lr {lr:.1e} | {n * B / (time.time() - t0):.1f} img/s")
            sums, t0 = torch.zeros(5), time.time()
        if args.ckpt_every > 0 and (step + 1) % args.ckpt_every == 0:
            checkpoint(step + 1)
    train_s, train_cpu_s = time.time() - t_start, time.process_time() - cpu0

    # ------------------------------------------------ end of run: PSNR, cosine, probe; last stdout line = JSON
    vae.eval()
    test = get_dataset(args.data, vcfg.resolution, "test") if args.data in ("shapes", "cifar10") else ds
    imgs = test.images[:args.eval_images] if hasattr(test, "images") else \
        torch.stack([(test[i][0] * 255).round().byte() for i in range(min(args.eval_images, len(test)))])
    psnr, cos = evaluate(vae, mapper, vfm, imgs, args.align_noise, args.seed)
    res = {"preset": args.preset, "vfm": args.vfm, "vfm_stand_in": vfm.stand_in, "align_weight": args.align_weight,
           "mapper_depth": args.mapper_depth, "align_noise": args.align_noise, "steps": steps,
           "psnr": round(psnr, 2), "align_cos": round(cos, 4)}
    if args.data == "shapes" or args.probe_data:
        f1, mean_f1 = probe_figures(vae, args, vcfg.resolution)
        print_probe(f1, mean_f1, args.probe_data or "shapes")
        res.update(probe_f1_mean=round(mean_f1, 4), probe_f1={k: round(v, 4) for k, v in f1.items()})
    with torch.no_grad():
        x = imgs[:8].to(device).float() / 255
        save_grid(torch.cat([x, vae.decode(vae.encode(x)[0]).clamp(0, 1)]), os.path.join(args.out_dir, "recon.png"), 8)
    res.update(train_s=round(train_s, 1), cpu_s=round(train_cpu_s, 1), total_s=round(time.time() - t_start, 1))
    checkpoint(steps, res)
    p0(f"PSNR {psnr:.2f} dB (posterior mean, {len(imgs)} test images) | alignment cosine {cos:.3f} "
       f"({'noised' if args.align_noise else 'clean'} latents, VFM {'STAND-IN ' if vfm.stand_in else ''}{args.vfm})")
    p0(f"wrote {args.out_dir}/ckpt.pt and {args.out_dir}/recon.png (top: inputs, bottom: reconstructions)")
    p0(json.dumps(res))


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {error_line(e)}")
