"""
UNITE: one transformer, the Generative Encoder (GE), is both the image tokenizer and the latent
denoiser. "End-to-End Training for Unified Tokenization and Latent Denoising", Duggal, Bai et al.,
arXiv 2603.22283.
Definitions only: blocks, the GE, the ViT decoder, the losses, the samplers, and the size presets.

Time convention, used everywhere in this repo (as in UNITE's code):
t = 1 is clean data, t = 0 is pure noise,
    z_t = t * z0 + (1 - t) * eps,    eps ~ N(0, I),    velocity v = dz_t/dt = z0 - eps.
The GE predicts x (= z0) and the velocity is recovered as v = (x_hat - z_t) / max(1 - t, 0.05).
The null class (for classifier-free guidance) is index `num_classes`.

Where the paper text and the released code differ, this file follows the code and says so.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from dopri5 import dopri5


# -----------------------------------------------------------------------------
# small helpers

def modulate(x, shift, scale):
    """adaLN: x (B, T, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim, positions):
    """Fixed sin-cos embedding (len(positions), dim), as MAE/DiT."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = positions.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim, grid):
    """Fixed 2-D sin-cos embedding (grid*grid, dim): half the channels for columns, half rows."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, xs.flatten()), sincos_1d(dim // 2, ys.flatten())], dim=1)


def rope_tables(n_tokens, head_dim, n_identity=0, theta=10000.0):
    """1-D RoPE cos/sin tables (n_identity + n_tokens, head_dim), interleaved pairs, "lang"
    frequencies (UNITE's VisionRotaryEmbeddingFast); the first n_identity rows (in-context class
    tokens) get cos=1, sin=0."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)        # (hd/2,)
    ang = torch.arange(n_tokens).float()[:, None] * freqs[None]                     # (T, hd/2)
    ang = ang.repeat_interleave(2, dim=1)                                            # (T, hd)
    cos = torch.cat([torch.ones(n_identity, head_dim), ang.cos()])
    sin = torch.cat([torch.zeros(n_identity, head_dim), ang.sin()])
    return cos, sin


CPU_BF16_MATH_ATTENTION = True  # train.py --plan sets False: count what a GPU's fused kernel saves


def attend(q, k, v):
    """F.scaled_dot_product_attention, q/k/v (B, H, T, hd). On CPU in bf16 the fused kernel measured
    ~4x slower than the math path at our short sequences (fwd + bwd, T = 20..68); in fp32 it is the
    faster one: the math path for exactly that case."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and CPU_BF16_MATH_ATTENTION:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def apply_rope(x, cos, sin):
    """x (B, H, T, hd): each interleaved pair (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


# -----------------------------------------------------------------------------
# Generative Encoder blocks (DiT / LightningDiT style, as UNITE's modules/encoder.py)

class Attention(nn.Module):
    """Multi-head self-attention with QK-RMSNorm and 1-D RoPE."""

    def __init__(self, dim, heads, qk_norm=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # QK-RMSNorm in fp32 (under autocast q, k are bf16)
        q, k = self.q_norm(q.float()), self.k_norm(k.float())
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = attend(q.to(v.dtype), k.to(v.dtype), v)       # in v's dtype: bf16 under autocast
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class SwiGLU(nn.Module):
    """SwiGLU MLP, hidden int(2/3 * 4 * dim) (2048 at 768): as costly as a 4x GELU MLP."""

    def __init__(self, dim):
        super().__init__()
        hidden = int(2 / 3 * 4 * dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    """Pre-norm block: RMSNorm -> adaLN -> attn -> gated residual; same for the MLP; then a
    per-block RMSNorm of the residual stream ("block norm", kept by the paper for stability,
    Tab. 7b)."""

    def __init__(self, dim, heads, qk_norm=True, block_norm=True):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.mlp = SwiGLU(dim)
        self.norm3 = nn.RMSNorm(dim, eps=1e-6) if block_norm else nn.Identity()
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)  # 6x (B, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return self.norm3(x)


class FourierTimeEmbed(nn.Module):
    """Gaussian-Fourier features of t in [0, 1] (not x1000): sin/cos(2 pi t W), W ~ N(0, 1)."""

    def __init__(self, dim, n_freq=256):
        super().__init__()
        self.register_buffer("W", torch.randn(n_freq))  # fixed at init, saved in the checkpoint
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        ang = 2 * math.pi * t.float()[:, None] * self.W[None]                          # (B, n_freq)
        return self.mlp(torch.cat([ang.sin(), ang.cos()], dim=1))                      # (B, D)


# -----------------------------------------------------------------------------
# configuration

@dataclass
class UniteConfig:
    image_size: int = 256
    patch_size: int = 16            # tokenizer patch; the decoder predicts the same patches
    latent_dim: int = 32            # C: channels per latent token
    enc_depth: int = 12
    enc_width: int = 768
    enc_heads: int = 12
    dec_depth: int = 12
    dec_width: int = 768
    dec_heads: int = 12
    dec_in_width: int = 768         # between the decoder's two input Linears (released: 768)
    num_classes: int = 1000         # null class = num_classes
    in_context_len: int = 32        # class tokens prepended from block in_context_start (0 = off)
    in_context_start: int = 4
    qk_norm: bool = True
    block_norm: bool = True
    class_dropout: float = 0.1      # label dropout in the denoising pass, for CFG
    recon_t_max: float = 0.01       # tokenizer pass: t ~ U[0, 0.01), the code's config
    # L = w L_recon + L_flow. Released: w = 1, L_recon = L1 + LPIPS. The tiny preset has no LPIPS
    # and a flow loss ~10x its L1, so it sets w = 30 (w = 10 / 30 / 100: docs/experiments.md)
    recon_weight: float = 1.0
    noise_aug_prob: float = 0.5     # decoder-input noise on half the batch ...
    noise_aug_min: float = 0.7      # ... with s ~ U[0.7, 1] (Tab. 7c)
    flow_copies: int = 14           # K noised copies per image (A1 Tab. 8; the code's config: 3)
    flow_chunk: int = 3             # copies per denoiser forward (released flow_mini_batch)
    time_shift: float = 0.5         # alpha of t' = a t / (1 + (a - 1) t) (Tab. 7e)
    t_eps: float = 0.05             # (1 - t) clamp in the velocity
    separate: bool = False          # Tab. 7a: separate tokenizer and denoiser weights
    stopgrad: bool = True           # Tab. 7a: False lets the flow loss reach the tokenizer via z0
    # recompute GE blocks in backward: off | flow (the denoising pass) | all (both passes) |
    # auto = flow when K > 4, as the released UNITE.__init__
    grad_checkpoint: str = "auto"
    latent_tokens: int = 0          # latent registers; 0 = one per image patch
    input_tokens: int = 0           # tokens the input embedding adds; 0 = one per image patch

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def num_tokens(self):  # latent registers (256 at 256 px, patch 16)
        return self.latent_tokens or self.grid ** 2


# -----------------------------------------------------------------------------
# the Generative Encoder

class PatchEmbed(nn.Conv2d):
    """The image input embedding: (B, 3, H, W) -> patch tokens (B, P, D) in raster order. Any module
    with this contract (input -> (B, P, D)) can replace it; molecules.py passes its atom-token
    embedding."""

    def __init__(self, dim, patch_size):
        super().__init__(3, dim, patch_size, patch_size)

    def forward(self, images):
        return super().forward(images).flatten(2).transpose(1, 2)                     # (B, P, D)


class GenerativeEncoder(nn.Module):
    """One transformer, two modes on the same weights:
      tokenize(images)   -> z0 (B, K, C): registers start as Gaussian noise, t ~ U[0, 0.01), null
                            class, image patch tokens appended after the registers (patches are
                            dropped at the end).
      denoise(z_t, t, y) -> x-prediction (B, K, C) of z0.
    Both outputs go through the same affine LayerNorm(C) (the paper's "final normalization",
    Tab. 7b). `input_embed` maps the tokenizer's input to (B, P, D) tokens (default: image patches;
    kept under the name patch_embed so image checkpoints keep their keys)."""

    def __init__(self, cfg: UniteConfig, with_patch_embed=True, input_embed=None):
        super().__init__()
        self.cfg = cfg
        D, K = cfg.enc_width, cfg.num_tokens
        self.patch_embed = (input_embed if input_embed is not None
                            else PatchEmbed(D, cfg.patch_size) if with_patch_embed else None)
        # no absolute position embedding for the patches (the released MAE pos-emb buffer stays
        # zero): their positions come only from RoPE, in raster order after the registers
        self.latent_in = nn.Linear(cfg.latent_dim, D)
        self.latent_pos = nn.Parameter(sincos_1d(D, torch.arange(K)).unsqueeze(0))  # learned
        self.t_embed = FourierTimeEmbed(D)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D)                # + null class
        self.in_context_pos = (nn.Parameter(torch.randn(1, cfg.in_context_len, D) * 0.02)
                               if cfg.in_context_len else None)
        self.blocks = nn.ModuleList(Block(D, cfg.enc_heads, cfg.qk_norm, cfg.block_norm)
                                    for _ in range(cfg.enc_depth))
        self.final_norm = nn.RMSNorm(D, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_linear = nn.Linear(D, cfg.latent_dim)
        self.out_norm = nn.LayerNorm(cfg.latent_dim)                       # affine, on every output
        max_tokens = K + (cfg.input_tokens or cfg.grid ** 2)                # registers + patches
        for name, n_id in (("rope", 0), ("rope_ic", cfg.in_context_len)):
            cos, sin = rope_tables(max_tokens, D // cfg.enc_heads, n_id)
            self.register_buffer(name + "_cos", cos, persistent=False)
            self.register_buffer(name + "_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        # as UNITE's Encoder.initialize_weights: xavier Linear, N(0, .02) tables, adaLN-Zero
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN[-1].weight)
            nn.init.zeros_(blk.adaLN[-1].bias)
        for m in (self.final_adaLN[-1], self.final_linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, z, t, y, images=None, checkpoint_blocks=False):
        """z (B, K, C) registers, t (B,) in [0,1], y (B,) labels, images (B, 3, H, W) or None
        -> LayerNorm-ed register outputs (B, K, C). checkpoint_blocks: recompute in backward."""
        cfg, K = self.cfg, z.shape[1]
        x = self.latent_in(z) + self.latent_pos                                 # (B, K, D)
        if images is not None:
            p = self.patch_embed(images)                                        # (B, P, D)
            x = torch.cat([x, p], dim=1)                                        # (B, K+P, D)
        y_emb = self.y_embed(y)                                                 # (B, D)
        c = self.t_embed(t) + y_emb                                   # (B, D) drives every adaLN
        T, L = x.shape[1], cfg.in_context_len
        rope = (self.rope_cos[:T], self.rope_sin[:T])
        for i, blk in enumerate(self.blocks):
            if L > 0 and i == cfg.in_context_start:
                # in-context class tokens: y_emb + learned positions, identity RoPE (cos 1, sin 0)
                x = torch.cat([y_emb.unsqueeze(1) + self.in_context_pos, x], dim=1)  # (B, L+T, D)
                rope = (self.rope_ic_cos[:L + T], self.rope_ic_sin[:L + T])
            recompute = checkpoint_blocks and torch.is_grad_enabled()
            x = checkpoint(blk, x, c, rope, use_reentrant=False) if recompute else blk(x, c, rope)
        if L > 0 and cfg.in_context_start < len(self.blocks):
            x = x[:, L:]                                                        # drop class tokens
        x = x[:, :K]                                                            # keep the registers
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))      # (B, K, C)
        return self.out_norm(x.float())                                         # LayerNorm in fp32

    def tokenize(self, images, noise=None, t=None):
        """Pass 1: image -> z0 (B, K, C). Registers = Gaussian noise (B, K, C),
        t ~ U[0, recon_t_max) (B,), class = null; pass noise / t to fix them."""
        B, cfg, dev = images.shape[0], self.cfg, images.device
        if noise is None:
            noise = torch.randn(B, cfg.num_tokens, cfg.latent_dim, device=dev)
        if t is None:
            t = torch.rand(B, device=dev) * cfg.recon_t_max
        null = torch.full((B,), cfg.num_classes, device=dev, dtype=torch.long)
        return self(noise, t, null, images, checkpoint_blocks=cfg.grad_checkpoint == "all")

    def denoise(self, z_t, t, y, checkpoint_blocks=False):
        """Pass 2 / sampling: noised latent -> LayerNorm-ed x-prediction of z0 (B, K, C)."""
        return self(z_t, t, y, checkpoint_blocks=checkpoint_blocks)


# -----------------------------------------------------------------------------
# ViT decoder (MAE style, as UNITE's modules/decoder.py)

class ViTBlock(nn.Module):
    """Plain pre-LN ViT block: LN -> MHSA (qkv bias) -> residual; LN -> GELU MLP x4 -> residual."""

    def __init__(self, dim, heads, mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, int(dim * mlp_ratio)),
                                      fc2=nn.Linear(int(dim * mlp_ratio), dim)))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (self.attn.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads)
                   .permute(2, 0, 3, 1, 4))
        a = attend(q, k, v).transpose(1, 2).reshape(B, T, D)
        x = x + self.attn.proj(a)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class Decoder(nn.Module):
    """Latent (B, K, C) -> image (B, 3, H, W) in [0, 1] (no output activation; clamp only at eval).
    The input is two Linears, C -> dec_in_width -> D, as released (`up_sample_decoder`, 768, then
    `decoder_embed`): one linear map, kept as two so the released weights load key for key and
    training starts from the same (PyTorch default) init."""

    def __init__(self, cfg: UniteConfig):
        super().__init__()
        D, p = cfg.dec_width, cfg.patch_size
        self.cfg = cfg
        self.embed = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.dec_in_width),
                                   nn.Linear(cfg.dec_in_width, D))
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        pos = torch.cat([torch.zeros(1, D), sincos_2d(D, cfg.grid)])             # CLS slot = 0
        self.register_buffer("pos", pos.unsqueeze(0), persistent=False)          # (1, 1+K, D) fixed
        self.blocks = nn.ModuleList(ViTBlock(D, cfg.dec_heads, eps=1e-12)
                                    for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(D, eps=1e-12)
        self.head = nn.Linear(D, p * p * 3)

    def forward(self, z):
        B, g, p = z.shape[0], self.cfg.grid, self.cfg.patch_size
        x = torch.cat([self.cls.expand(B, -1, -1), self.embed(z)], dim=1) + self.pos  # (B, 1+K, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.head(self.norm(x))[:, 1:]                                     # (B, K, p*p*3)
        x = x.reshape(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)               # (B, 3, g, p, g, p)
        return x.reshape(B, 3, g * p, g * p).float()


# -----------------------------------------------------------------------------
# UNITE: the two passes and their losses

def draw_noise(cfg: UniteConfig, B, device=None, generator=None):
    """All the randomness of one training step for B images, batch axis first."""
    K, T, C = cfg.flow_copies, cfg.num_tokens, cfg.latent_dim
    rand = lambda *s: torch.rand(*s, device=device, generator=generator)
    randn = lambda *s: torch.randn(*s, device=device, generator=generator)
    return dict(
        flip=rand(B) < 0.5,                              # horizontal flip (data augmentation)
        registers=randn(B, T, C),                        # tokenizer pass: registers start as noise
        recon_t=rand(B) * cfg.recon_t_max,               # tokenizer pass: t ~ U[0, 0.01)
        aug_mask=rand(B) < cfg.noise_aug_prob,           # decoder-input noise on half the batch ...
        aug_s=cfg.noise_aug_min + (1 - cfg.noise_aug_min) * rand(B),  # ... s ~ U[0.7, 1]
        aug_eps=randn(B, T, C),
        flow_t=sample_t(randn(B, K), cfg.time_shift),    # K noised copies per image
        flow_eps=randn(B, K, T, C),
        drop=rand(B, K) < cfg.class_dropout,             # label dropout for CFG
    )


def step_noise(cfg: UniteConfig, seed, step, rows, device=None):
    """draw_noise for the global samples `rows` of training step `step`, each from its own generator
    seeded by (seed, step, row). A rank draws only its own micro-batch (no global-batch buffer), and
    the run is the same on any number of GPUs, at any accumulation, and after --resume."""
    device = torch.device(device or "cpu")
    parts = [draw_noise(cfg, 1, device, torch.Generator(device).manual_seed(
        ((seed * 1_000_003 + step) * 1_000_003 + int(r)) % 2 ** 63)) for r in rows]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def sample_t(normal, shift):
    """Training t from standard normals: logit-normal(0, 1), then shifted t' = a t / (1 + (a-1) t);
    a = 0.5 pushes t toward noise (t=0), median 0.5 -> 0.33 (code's modules/denoiser.py; the paper
    text says U[0, 1])."""
    t = torch.sigmoid(normal)
    return shift * t / (1 + (shift - 1) * t)


def noise_augment(z, noise):
    """Decoder-input noise: z~ = s z + (1 - s) eps with s ~ U[0.7, 1] on a random half of the
    samples (code; the paper text writes z + 0.7 eps). Gradients flow through both branches."""
    s = noise["aug_s"][:, None, None]
    return torch.where(noise["aug_mask"][:, None, None], s * z + (1 - s) * noise["aug_eps"], z)


def checkpoint_flow(cfg: UniteConfig):
    """Recompute the denoising pass's blocks in backward? The released UNITE.__init__ turns it on
    when K > 4: the K copies then hold far more activations than the tokenizer pass."""
    return (cfg.grad_checkpoint in ("flow", "all")
            or (cfg.grad_checkpoint == "auto" and cfg.flow_copies > 4))


def flow_loss(denoiser, z0, y, noise, cfg: UniteConfig):
    """Pass 2 on K noised copies of z0 (B, T, C), cfg.flow_chunk copies per forward (B * chunk
    sequences, as the released forward_denoising). x-prediction trained with the velocity-space MSE:
    mean[((z0 - x_hat) / max(1 - t, 0.05))^2]. As in the code, the K per-copy batch means are SUMMED
    (never divided by K)."""
    B, K, rest = z0.shape[0], cfg.flow_copies, z0.shape[1:]
    total = 0.0
    for k0 in range(0, K, cfg.flow_chunk):
        c = min(K, k0 + cfg.flow_chunk) - k0                                  # copies in this chunk
        zd = z0.unsqueeze(1).expand(B, c, *rest).reshape(B * c, *rest)        # (B*c, T, C)
        t = noise["flow_t"][:, k0:k0 + c].reshape(B * c)
        yd = torch.where(noise["drop"][:, k0:k0 + c], cfg.num_classes, y[:, None]).reshape(B * c)
        eps = noise["flow_eps"][:, k0:k0 + c].reshape(zd.shape)
        z_t = t[:, None, None] * zd + (1 - t[:, None, None]) * eps
        x_hat = denoiser.denoise(z_t, t, yd, checkpoint_blocks=checkpoint_flow(cfg))
        w = (1 - t).clamp_min(cfg.t_eps)[:, None, None]
        per_sample = (((zd - x_hat) / w) ** 2).mean(dim=(1, 2))               # (B*c,)
        total = total + per_sample.view(B, c).mean(0).sum()                    # sum of copy means
    return total


def l1_loss(recon, images):
    return F.l1_loss(recon, images.float())  # L1 on [0, 1] images


class UNITE(nn.Module):
    """The whole model: Generative Encoder (+ a separate denoiser if cfg.separate) and the decoder.
    forward(images, labels, noise) runs one training step's two passes and returns (loss, stats):

    image ─> GE.tokenize ─> z0 ─> noise-aug ─> decoder ─> x_hat ─> L1 (+ LPIPS) ──────────┐
                            │                                                             ├─> loss
                            └─> stop-grad ─> K copies of z_t ─> GE ─> x-pred ─> flow MSE ─┘
                                             z_t = t z0 + (1 - t) eps

    The flow loss reaches the GE only through the denoising pass (the paper's stop-grad, Tab. 7a).
    Other modalities pass their own input embedding, decoder and recon_loss(decoder_output, input)
    -> scalar (molecules.py); the GE, the flow loss and the samplers are the same."""

    def __init__(self, cfg: UniteConfig, input_embed=None, decoder=None, recon_loss=l1_loss):
        super().__init__()
        self.cfg = cfg
        self.encoder = GenerativeEncoder(cfg, input_embed=input_embed)
        self.denoiser_ = GenerativeEncoder(cfg, with_patch_embed=False) if cfg.separate else None
        self.decoder = decoder if decoder is not None else Decoder(cfg)
        self.recon_loss = recon_loss

    @property
    def denoiser(self):
        return self.denoiser_ if self.denoiser_ is not None else self.encoder

    def forward(self, images, labels, noise=None):
        cfg = self.cfg
        if noise is None:
            noise = draw_noise(cfg, images.shape[0], images.device)
        z0 = self.encoder.tokenize(images, noise["registers"], noise["recon_t"])  # pass 1 (B, T, C)
        recon = self.decoder(noise_augment(z0, noise))
        rec = self.recon_loss(recon, images)
        zd = z0.detach() if cfg.stopgrad else z0                               # stop-grad (Tab. 7a)
        flow = flow_loss(self.denoiser, zd.float(), labels, noise, cfg)           # pass 2
        return cfg.recon_weight * rec + flow, {"recon": rec.detach(), "flow": flow.detach()}

    @torch.no_grad()
    def reconstruct(self, images, noise=None, t=None):
        """Tokenize (fresh register noise and t unless given), decode, clamp to [0, 1]."""
        return self.decoder(self.encoder.tokenize(images, noise, t)).clamp(0, 1)


# -----------------------------------------------------------------------------
# samplers: fixed-step Euler / Heun on the shifted grid, adaptive dopri5 (released), CFG on the
# LayerNorm-ed x-prediction

def time_grid(steps, shift, device=None):
    """steps+1 times from 0 (noise) to 1 (clean), warped by the same shift as training."""
    t = torch.linspace(0, 1, steps + 1, device=device, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def guided_x(denoiser, z, t, y, cfg_scale, cfg_min_t, null):
    """x-prediction with classifier-free guidance applied to all channels of the full latent, on the
    LayerNorm-ed cond/uncond predictions ("norm_first", as the code): u + w (c - u), only for
    cfg_min_t < t < 1. The interval is open at t = 1 as in the released encoder.forward_with_cfg
    (`t < high`), so a Heun step's last evaluation at t = 1 is unguided. t is a scalar or per sample
    (B,) (dopri5); the interval is checked per sample, in t's own precision. One batched forward:
    the cond pass for all samples plus the uncond pass for those inside the interval, same noise."""
    tt = t if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float64)
    tt = tt.to(z.device).expand(z.shape[0])                                  # (B,)
    tb, guide = tt.float(), (cfg_min_t < tt) & (tt < 1.0)                     # guide: (B,) bool
    if cfg_scale == 1.0 or not guide.any():                                   # .any() is a sync
        return denoiser.denoise(z, tb, y)
    g = guide.nonzero().squeeze(1)                                            # (G,) guided rows
    out = denoiser.denoise(torch.cat([z, z[g]]), torch.cat([tb, tb[g]]),
                           torch.cat([y, torch.full_like(y[g], null)]))      # (B+G, K, C)
    cond, uncond = out[:z.shape[0]], out[z.shape[0]:]
    return cond.index_copy(0, g, uncond + cfg_scale * (cond[g] - uncond))


@torch.no_grad()
def sample_latents(denoiser, noise, y, steps=50, method="heun", cfg_scale=1.0, cfg_min_t=0.1,
                   shift=0.5, t_eps=0.05, null=None, atol=1e-6, rtol=1e-3):
    """Integrate dz/dt = v(z, t) from t=0 (noise) to t=1 (clean). Returns (z1 (B, K, C), NFE).
    NFE counts denoiser calls per sample (a CFG call counts once; it evaluates 2 sequences).
    method: euler / heun (fixed steps on the shifted grid) or dopri5 (adaptive with atol / rtol,
    the released sampler; NFE = the mean over the batch). The model sees the integrator's own t in
    all cases; for dopri5, `steps` and `shift` only place the released code's output grid, whose
    last point is t=1, so they do not change the sample and are unused here."""
    null = denoiser.cfg.num_classes if null is None else null
    if method not in ("euler", "heun", "dopri5"):
        raise ValueError(f"unknown sampler {method!r}: use euler, heun or dopri5")
    if method == "dopri5":
        def f(i, z, t):                                               # rows i of the batch, t (n,)
            x_hat = guided_x(denoiser, z, t, y[i], cfg_scale, cfg_min_t, null).float()
            return (x_hat - z) / (1 - t).clamp_min(t_eps)[:, None, None]
        z1, nfe = dopri5(f, noise.float(), atol, rtol)
        return z1, nfe.double().mean().item()
    ts = time_grid(steps, shift, noise.device)
    z, nfe = noise.float(), 0

    def v(z, t):
        x_hat = guided_x(denoiser, z, t, y, cfg_scale, cfg_min_t, null).float()
        return (x_hat - z) / max(1 - float(t), t_eps)

    for t0, t1 in zip(ts[:-1], ts[1:]):
        h, d0 = (t1 - t0).item(), v(z, t0)
        if method == "euler":
            z, nfe = z + h * d0, nfe + 1
        else:  # heun, the trapezoid: average the slopes at both ends of an Euler step
            z, nfe = z + h * 0.5 * (d0 + v(z + h * d0, t1)), nfe + 2
    return z, nfe


def sample_noise(indices, seed, shape, device=None):
    """Starting noise by global sample index: sample i is the same on 1 or 8 GPUs, at any batch."""
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
        for i in indices]).to(device)


@torch.no_grad()
def generate(model, indices, num_classes, seed=0, labels=None, decoder=None, **sampler):
    """Images (N, 3, H, W) in [0, 1] for the given global sample indices; labels default to
    class-balanced i % num_classes. `decoder` defaults to model.decoder (sendvae.py passes its VAE
    decoder). Returns (x, nfe)."""
    cfg, dev = model.cfg, next(model.parameters()).device
    y = torch.as_tensor(labels if labels is not None else [i % num_classes for i in indices],
                        device=dev)
    z, nfe = sample_latents(model.denoiser,
                            sample_noise(indices, seed, (cfg.num_tokens, cfg.latent_dim), dev),
                            y, shift=cfg.time_shift, t_eps=cfg.t_eps, **sampler)
    return (decoder or model.decoder)(z).clamp(0, 1), nfe


# -----------------------------------------------------------------------------
# size presets: B = GE 12x768 (130.6M) + decoder 12x768 (86.2M); L and XL keep the B decoder

B_DECODER = dict(dec_depth=12, dec_width=768, dec_heads=12)
PRESETS = {
    # tiny: a CPU preset for 32 px. The GE is narrow (64) because at an equal CPU budget the shape
    # accuracy of the samples follows the compute spent, not the width, and a narrow GE takes more
    # steps in the same time; the decoder stays at 128 (decoder 64 vs 128, one run each at about the
    # same CPU time: FD-shapes 182 vs 161; docs/experiments.md).
    "tiny": dict(image_size=32, patch_size=8, latent_dim=16, enc_depth=6, enc_width=64, enc_heads=2,
                 dec_depth=4, dec_width=128, dec_heads=2, dec_in_width=128, in_context_len=4,
                 in_context_start=2, flow_copies=2, recon_weight=30.0),
    "micro": dict(image_size=32, patch_size=8, latent_dim=8, enc_depth=2, enc_width=64, enc_heads=2,
                  dec_depth=1, dec_width=64, dec_heads=2, dec_in_width=64, in_context_len=2,
                  in_context_start=1, flow_copies=2),  # tests
    "S": dict(enc_depth=12, enc_width=384, enc_heads=6, dec_depth=12, dec_width=384, dec_heads=6),
    "B": dict(enc_depth=12, enc_width=768, enc_heads=12, dec_depth=12, dec_width=768, dec_heads=12),
    "L": dict(enc_depth=24, enc_width=1024, enc_heads=16, **B_DECODER),
    "XL": dict(enc_depth=28, enc_width=1152, enc_heads=16, **B_DECODER),
}


def make_config(name, **overrides):
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return UniteConfig(**{**PRESETS[name], **overrides})


def count_params(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":  # parameter table of the presets (meta device: nothing is allocated)
    print(f"{'preset':<6} {'encoder':>10} {'decoder':>10} {'total':>10}   latent")
    for name in PRESETS:
        cfg = make_config(name)
        with torch.device("meta"):
            m = UNITE(cfg)
        e, d = count_params(m.encoder), count_params(m.decoder)
        print(f"{name:<6} {e / 1e6:>9.1f}M {d / 1e6:>9.1f}M {(e + d) / 1e6:>9.1f}M   "
              f"{cfg.num_tokens}x{cfg.latent_dim} at {cfg.image_size}px")
