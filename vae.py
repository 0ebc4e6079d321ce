"""
The LDM convolutional VAE (AutoencoderKL, REPA-E's models/autoencoder.py with the LDM module names,
so VA-VAE, REPA-E and SD-VAE weights load key for key), which sendvae.py trains, and TwoStage, the
SiT-style baseline that `train.py --tokenizer` builds: the Generative Encoder in denoise-only mode
on the frozen VAE's normalised latents.
Images are in [0, 1] as everywhere in this repository; the VAE sees 2x - 1, as the LDM VAEs do.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GenerativeEncoder, UniteConfig, attend, draw_noise, flow_loss


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)      # f16d32 (VA-VAE / IN-VAE); f8d4 (SD-VAE) is (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)       # feature-map sizes with a self-attention block
                                          # (the mid block has one)
    resolution: int = 256
    z_channels: int = 32
    norm_groups: int = 32                 # GroupNorm groups (LDM: 32; the tiny preset has
                                          # 16-channel maps)

    @property
    def factor(self):                     # spatial down-sampling: 2 ** (levels - 1)
        return 2 ** (len(self.ch_mult) - 1)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = (nn.GroupNorm(groups, cin, eps=1e-6),
                                  nn.Conv2d(cin, cout, 3, padding=1))
        self.norm2, self.conv2 = (nn.GroupNorm(groups, cout, eps=1e-6),
                                  nn.Conv2d(cout, cout, 3, padding=1))
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map, 1x1-conv q/k/v (LDM)."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, 1, HW, C)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        a = attend(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(a)


def _level(blocks, attns, resample):
    """One resolution level, with LDM's module names
    (down.i.block.j, down.i.downsample.conv, ...)."""
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        name, conv = resample
        setattr(m, name, nn.Module())
        getattr(m, name).conv = conv
    return m


def _mid(c, g):
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c, g), AttnBlock(c, g), ResnetBlock(c, c, g)
    return m


class VAEEncoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, 2 z, H/f, W/f): posterior mean and log-variance."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        g, res, cin = c.norm_groups, c.resolution, c.ch
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, m in enumerate(c.ch_mult):
            blocks = [ResnetBlock(cin if j == 0 else c.ch * m, c.ch * m, g)
                      for j in range(c.num_res_blocks)]
            cin = c.ch * m
            attns = [AttnBlock(cin, g) for _ in blocks] if res in c.attn_resolutions else []
            last = i == len(c.ch_mult) - 1
            # stride-2 conv with LDM's asymmetric (0, 1, 0, 1) padding
            self.down.append(_level(blocks, attns,
                                    None if last else ("downsample", nn.Conv2d(cin, cin, 3, 2))))
            res //= 1 if last else 2
        self.mid = _mid(cin, g)
        self.norm_out, self.conv_out = (nn.GroupNorm(g, cin, eps=1e-6),
                                        nn.Conv2d(cin, 2 * c.z_channels, 3, padding=1))

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for j, blk in enumerate(lvl.block):
                h = lvl.attn[j](blk(h)) if len(lvl.attn) else blk(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VAEDecoder(nn.Module):
    """(B, z, h, w) -> (B, 3, h f, w f) in [-1, 1] (unclamped). `up` is indexed by level as in LDM
    (up[0] is the full-resolution level, run last)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        g, res, cin = c.norm_groups, c.resolution // c.factor, c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, g)
        up = []
        for i in reversed(range(len(c.ch_mult))):
            cout = c.ch * c.ch_mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, g)
                      for j in range(c.num_res_blocks + 1)]
            cin = cout
            attns = [AttnBlock(cout, g) for _ in blocks] if res in c.attn_resolutions else []
            up.insert(0, _level(blocks, attns,
                                ("upsample", nn.Conv2d(cout, cout, 3, padding=1)) if i else None))
            res *= 2 if i else 1
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = (nn.GroupNorm(g, cin, eps=1e-6),
                                        nn.Conv2d(cin, 3, 3, padding=1))

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(self.up):
            for j, blk in enumerate(lvl.block):
                h = lvl.attn[j](blk(h)) if len(lvl.attn) else blk(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """encode(x in [0, 1]) -> (mean, logvar) each (B, C, h, w); decode(z) -> (B, 3, H, W) in [0, 1]
    (unclamped). logvar is clamped to [-30, 20] as in LDM's DiagonalGaussianDistribution."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = VAEEncoder(cfg), VAEDecoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):
        mean, logvar = self.quant_conv(self.encoder(2 * x - 1)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return (self.decoder(self.post_quant_conv(z)) + 1) / 2


def patchify(z, p):
    """(B, C, h, w) -> (B, (h/p)(w/p), C p p) tokens in raster order (SiT's patch p on a latent)."""
    B, C, h, w = z.shape
    z = z.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)     # (B, h/p, w/p, C, p, p)
    return z.reshape(B, (h // p) * (w // p), C * p * p)


def unpatchify(tokens, p, C):
    """The inverse of patchify: (B, T, C p p) -> (B, C, h, w) for a square grid."""
    B, T, _ = tokens.shape
    g = int(math.isqrt(T))
    z = tokens.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5)              # (B, C, g, p, g, p)
    return z.reshape(B, C, g * p, g * p)


class LatentVAE(nn.Module):
    """A frozen AutoencoderKL in GE-token units, with the per-channel latent mean/std (buffers,
    saved in the checkpoint): tokens(x) -> (B, h*w / p^2, C p^2) = patchify((z - mean) / std, p),
    forward(tokens) -> images. p = 2 turns an f8 VAE's 32 x 32 latent at 256 px into 256 tokens, as
    SiT-XL/2 on SD-VAE."""

    def __init__(self, vae_cfg: VAEConfig, patch=1):
        super().__init__()
        self.patch = patch
        self.vae = AutoencoderKL(vae_cfg).requires_grad_(False)
        self.register_buffer("latent_mean", torch.zeros(vae_cfg.z_channels))
        self.register_buffer("latent_std", torch.ones(vae_cfg.z_channels))

    @torch.no_grad()
    def fit_latent_stats(self, batches):
        """Per-channel mean/std of the posterior means over an iterable of image batches
        (B, 3, H, W), once."""
        z = torch.cat([self.vae.encode(x)[0] for x in batches])                       # (N, C, h, w)
        self.latent_mean.copy_(z.mean(dim=(0, 2, 3)))
        self.latent_std.copy_(z.std(dim=(0, 2, 3)))

    @torch.no_grad()
    def tokens(self, x, eps=None):
        """Images -> normalised tokens (B, T, C p^2); eps of that shape draws a posterior sample
        (REPA-E's train_ldm_only samples the posterior every step), None gives the posterior
        mean."""
        mean, logvar = self.vae.encode(x)                                             # (B, C, h, w)
        scale = lambda z: (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]
        z = patchify(scale(mean), self.patch)
        if eps is not None:
            std = (0.5 * logvar).exp() / self.latent_std[:, None, None]
            z = z + patchify(std, self.patch) * eps
        return z

    def forward(self, tokens):
        z = unpatchify(tokens.float(), self.patch, self.latent_mean.numel())          # (B, C, h, w)
        return self.vae.decode(z * self.latent_std[:, None, None] + self.latent_mean[:, None, None])


class TwoStage(nn.Module):
    """The two-stage baseline (Send-VAE Fig. 3, stage 2): the GE in denoise-only mode
    (a SiT: flow loss only) on the latents of a frozen VAE. Same interface as UNITE:
    forward -> (loss, stats), .denoiser, .decoder, reconstruct. cfg gives the token grid:
    patch_size = vae_cfg.factor * p, latent_dim = z_channels * p^2 for a latent patch p
    (latent_tokens_config)."""

    def __init__(self, cfg: UniteConfig, vae_cfg: VAEConfig):
        super().__init__()
        p = cfg.patch_size // vae_cfg.factor
        assert p * vae_cfg.factor == cfg.patch_size and cfg.latent_dim == vae_cfg.z_channels * p * p
        self.cfg = cfg
        self.encoder = GenerativeEncoder(cfg, with_patch_embed=False)
        # no output LayerNorm (as SiT): UNITE's latents are LayerNorm-ed per token by construction,
        # a VAE's are not, and an affine LayerNorm could not reach per-token means and scales of the
        # normalised VAE latent
        self.encoder.out_norm = nn.Identity()
        self.decoder = LatentVAE(vae_cfg, p)                                  # frozen

    @property
    def denoiser(self):
        return self.encoder

    def forward(self, images, labels, noise=None):
        if noise is None:
            noise = draw_noise(self.cfg, images.shape[0], images.device)
        # the step's register noise has the latent's shape (B, h*w, C): reused as the
        # posterior-sample eps, so the run stays independent of the number of processes
        # (see draw_noise)
        z0 = self.decoder.tokens(images, noise["registers"])                  # (B, h*w, C), no grad
        flow = flow_loss(self.encoder, z0.float(), labels, noise, self.cfg)
        return flow, {"recon": torch.zeros_like(flow.detach()), "flow": flow.detach()}

    @torch.no_grad()
    def reconstruct(self, images, noise=None, t=None):
        # the VAE's (posterior mean): no noise to take
        return self.decoder(self.decoder.tokens(images)).clamp(0, 1)


def latent_tokens_config(vae_cfg: VAEConfig, image_size, patch=None):
    """UniteConfig fields for a GE on this VAE's latent: patch p of the latent grid (None: the
    paper's choice, 256 tokens at 256 px: p = 2 for f8 as SiT-XL/2 on SD-VAE, p = 1 for f16 as
    LightningDiT; at least 1, so the tiny 4 x 4 latent keeps p = 1)."""
    p = patch or max(1, image_size // vae_cfg.factor // 16)
    if (image_size // vae_cfg.factor) % p:
        raise ValueError(f"a latent patch of {p} does not divide the "
                         f"{image_size // vae_cfg.factor} grid")
    return dict(patch_size=vae_cfg.factor * p, latent_dim=vae_cfg.z_channels * p * p)


# the paper's two tokenizers at 256 px (REPA-E registry) and a CPU one for 32x32 data
VAE_PRESETS = {
    "f16d32": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                   z_channels=32),
    "f8d4": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), z_channels=4),
    "tiny": dict(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, attn_resolutions=(), z_channels=16,
                 resolution=32, norm_groups=8),
}
