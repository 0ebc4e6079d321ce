"""
UNITE: one transformer, the Generative Encoder (GE), is both the image tokenizer and the latent denoiser.
"End-to-End Training for Unified Tokenization and Latent Denoising", Duggal, Bai et al., arXiv 2603.22283.
Definitions only: blocks, the GE, the ViT decoder, the losses, the samplers, and the size presets.

Time convention, used everywhere in this repo (as in UNITE's code): t = 1 is clean data, t = 0 is pure noise,
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
    """Fixed 2-D sin-cos embedding (grid*grid, dim): half the channels for rows, half for columns."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, xs.flatten()), sincos_1d(dim // 2, ys.flatten())], dim=1)


def rope_tables(n_tokens, head_dim, n_identity=0, theta=10000.0):
    """1-D RoPE cos/sin tables (n_identity + n_tokens, head_dim) with interleaved pairs ("lang" frequencies,
    as UNITE's VisionRotaryEmbeddingFast). The first n_identity rows (in-context class tokens) get cos=1, sin=0."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)        # (hd/2,)
    ang = torch.arange(n_tokens).float()[:, None] * freqs[None]                     # (T, hd/2)
    ang = ang.repeat_interleave(2, dim=1)                                            # (T, hd)
    cos = torch.cat([torch.ones(n_identity, head_dim), ang.cos()])
    sin = torch.cat([torch.zeros(n_identity, head_dim), ang.sin()])
    return cos, sin


def attend(q, k, v):
    """F.scaled_dot_product_attention, q/k/v (B, H, T, hd). On CPU in bf16 the fused (flash) kernel measured ~4x
    slower than the plain math path at this repo's short sequences (fwd + bwd, T = 20..68), while in fp32 it is the
    faster one: pick the math path for exactly that case."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def apply_rope(x, cos, sin):
    """x (B, H, T, hd); rotate each interleaved pair (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


# -----------------------------------------------------------------------------
# Generative Encoder blocks (DiT / LightningDiT style, as UNITE's modules/encoder.py)

class Attention(nn.Module):
    """Multi-head self-attention with QK-RMSNorm and 1-D RoPE, through F.scaled_dot_product_attention."""

    def __init__(self, dim, heads, qk_norm=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3x (B,H,T,hd)
        q, k = self.q_norm(q.float()), self.k_norm(k.float())  # QK-RMSNorm in fp32 (under autocast q, k are bf16)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # attend in v's dtype: bf16 under autocast, as the code
        x = attend(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))                                        # (B, T, D)


class SwiGLU(nn.Module):
    """SwiGLU MLP with hidden = int(2/3 * 4 * dim) (2048 for dim 768), so it costs as much as a 4x GELU MLP."""

    def __init__(self, dim):
        super().__init__()
        hidden = int(2 / 3 * 4 * dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    """Pre-norm block: RMSNorm -> adaLN -> attn -> gated residual; same for the MLP; then a per-block RMSNorm of
    the residual stream ("block norm", kept by the paper for stability, Tab. 7b)."""

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
    """Gaussian-Fourier features of t in [0, 1] (not x1000): fixed W ~ N(0, 1), sin/cos(2 pi t W) -> MLP."""

    def __init__(self, dim, n_freq=256):
        super().__init__()
        self.register_buffer("W", torch.randn(n_freq))  # fixed at init, saved in the checkpoint
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        ang = 2 * math.pi * t.float()[:, None] * self.W[None]                           # (B, n_freq)
        return self.mlp(torch.cat([ang.sin(), ang.cos()], dim=1))                       # (B, D)


# -----------------------------------------------------------------------------
# configuration

@dataclass
class UniteConfig:
    image_size: int = 256
    patch_size: int = 16            # image patch for the tokenizer; the decoder uses the same patch
    latent_dim: int = 32            # C: channels per latent token
    enc_depth: int = 12
    enc_width: int = 768
    enc_heads: int = 12
    dec_depth: int = 12
    dec_width: int = 768
    dec_heads: int = 12
    dec_in_width: int = 768         # width between the decoder's two input Linears (released code: 768)
    num_classes: int = 1000         # null class = num_classes
    in_context_len: int = 32        # class tokens prepended from block in_context_start on (0 = off)
    in_context_start: int = 4
    qk_norm: bool = True
    block_norm: bool = True
    class_dropout: float = 0.1      # label dropout in the denoising pass, for CFG
    recon_t_max: float = 0.01       # tokenizer pass uses t ~ U[0, 0.01): the max-noise end (code's config)
    recon_weight: float = 1.0       # L = w * L_recon + L_flow; the code has w = 1 with L_recon = L1 + LPIPS. The tiny
                                    # preset has no LPIPS and its flow loss is ~10x its L1, so Muon's updates of the
                                    # shared GE favour denoising: it sets w = 30 (README: w = 10 / 30 / 100 measured)
    noise_aug_prob: float = 0.5     # decoder-input noise augmentation on half the batch ...
    noise_aug_min: float = 0.7      # ... with s ~ U[0.7, 1] (Tab. 7c)
    flow_copies: int = 14           # K noised copies per image (A1 Tab. 8; the code's config has 3)
    time_shift: float = 0.5         # alpha of t' = a t / (1 + (a - 1) t) (Tab. 7e)
    t_eps: float = 0.05             # (1 - t) clamp in the velocity
    separate: bool = False          # Tab. 7a: separate tokenizer and denoiser weights
    no_stopgrad: bool = False       # Tab. 7a: let the flow loss reach the tokenizer pass through z0
    grad_checkpoint: bool = False   # recompute GE blocks in the denoising pass (memory for large K)
    latent_tokens: int = 0          # latent registers; 0 = one per image patch (molecules.py sets its own)
    input_tokens: int = 0           # tokens the input embedding appends after the registers; 0 = image patches

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def num_tokens(self):           # latent registers = image patches (256 at 256 px, patch 16) unless set
        return self.latent_tokens or self.grid ** 2


# -----------------------------------------------------------------------------
# the Generative Encoder

class PatchEmbed(nn.Conv2d):
    """The image input embedding: (B, 3, H, W) -> patch tokens (B, P, D) in raster order. Any module with this
    contract (input -> (B, P, D)) can replace it; molecules.py passes its atom-token embedding."""

    def __init__(self, dim, patch_size):
        super().__init__(3, dim, patch_size, patch_size)

    def forward(self, images):
        return super().forward(images).flatten(2).transpose(1, 2)                     # (B, P, D)


class GenerativeEncoder(nn.Module):
    """One transformer, two modes on the same weights:
      tokenize(images)   -> z0 (B, K, C): registers start as Gaussian noise, t ~ U[0, 0.01), null class,
                            image patch tokens appended after the registers (patches are dropped at the end).
      denoise(z_t, t, y) -> x-prediction (B, K, C) of z0.
    Both outputs go through the same affine LayerNorm(C) (the paper's "final normalization", Tab. 7b).
    `input_embed` maps the tokenizer's input to (B, P, D) tokens (default: image patches; kept under the name
    patch_embed so image checkpoints keep their keys)."""

    def __init__(self, cfg: UniteConfig, with_patch_embed=True, input_embed=None):
        super().__init__()
        self.cfg = cfg
        D, K = cfg.enc_width, cfg.num_tokens
        self.patch_embed = (input_embed if input_embed is not None
                            else PatchEmbed(D, cfg.patch_size) if with_patch_embed else None)
        # In the released code the image patches get no absolute position embedding (its MAE pos-emb buffer
        # stays zero): patch positions come only from RoPE, in raster order after the registers.
        self.latent_in = nn.Linear(cfg.latent_dim, D)
        self.latent_pos = nn.Parameter(sincos_1d(D, torch.arange(K)).unsqueeze(0))   # learned, sin-cos init
        self.t_embed = FourierTimeEmbed(D)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D)                           # + null class
        self.in_context_pos = nn.Parameter(torch.randn(1, cfg.in_context_len, D) * 0.02) if cfg.in_context_len else None
        self.blocks = nn.ModuleList(Block(D, cfg.enc_heads, cfg.qk_norm, cfg.block_norm)
                                    for _ in range(cfg.enc_depth))
        self.final_norm = nn.RMSNorm(D, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_linear = nn.Linear(D, cfg.latent_dim)
        self.out_norm = nn.LayerNorm(cfg.latent_dim)                                  # affine, on every output
        hd = D // cfg.enc_heads
        max_tokens = K + (cfg.input_tokens or cfg.grid ** 2)  # registers + patches (or other input tokens)
        for name, n_id in (("rope", 0), ("rope_ic", cfg.in_context_len)):
            cos, sin = rope_tables(max_tokens, hd, n_id)
            self.register_buffer(name + "_cos", cos, persistent=False)
            self.register_buffer(name + "_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        # as UNITE's Encoder.initialize_weights: xavier Linear, zero bias, N(0, .02) tables, adaLN-Zero
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

    def forward(self, z, t, y, images=None):
        """z (B, K, C) registers, t (B,) in [0,1], y (B,) labels (num_classes = null), images (B, 3, H, W) (or
        whatever input_embed takes) or None. Returns the LayerNorm-ed register outputs (B, K, C)."""
        cfg, K = self.cfg, z.shape[1]
        x = self.latent_in(z) + self.latent_pos                                       # (B, K, D)
        if images is not None:
            p = self.patch_embed(images)                                              # (B, P, D)
            x = torch.cat([x, p], dim=1)                                              # (B, K+P, D)
        y_emb = self.y_embed(y)                                                       # (B, D)
        c = self.t_embed(t) + y_emb                                                   # (B, D) drives every adaLN
        T, L = x.shape[1], cfg.in_context_len
        rope = (self.rope_cos[:T], self.rope_sin[:T])
        for i, blk in enumerate(self.blocks):
            if L > 0 and i == cfg.in_context_start:
                # in-context class tokens: y_emb + learned positions, identity RoPE (cos 1, sin 0)
                x = torch.cat([y_emb.unsqueeze(1) + self.in_context_pos, x], dim=1)  # (B, L+T, D)
                rope = (self.rope_ic_cos[:L + T], self.rope_ic_sin[:L + T])
            if cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, c, rope, use_reentrant=False)
            else:
                x = blk(x, c, rope)
        if L > 0 and cfg.in_context_start < len(self.blocks):
            x = x[:, L:]                                                              # drop class tokens
        x = x[:, :K]                                                                  # keep the registers
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))            # (B, K, C)
        return self.out_norm(x.float())                                               # LayerNorm in fp32

    def tokenize(self, images, noise=None, t=None):
        """Pass 1: image -> z0 (B, K, C). Registers = Gaussian noise (B, K, C), t ~ U[0, recon_t_max) (B,),
        class = null. Pass noise / t to fix them (training draws them per sample; checks compare codes)."""
        B, cfg, dev = images.shape[0], self.cfg, images.device
        if noise is None:
            noise = torch.randn(B, cfg.num_tokens, cfg.latent_dim, device=dev)
        if t is None:
            t = torch.rand(B, device=dev) * cfg.recon_t_max
        null = torch.full((B,), cfg.num_classes, device=dev, dtype=torch.long)
        return self(noise, t, null, images)

    def denoise(self, z_t, t, y):
        """Pass 2 / sampling: noised latent -> LayerNorm-ed x-prediction of z0 (B, K, C)."""
        return self(z_t, t, y)


# -----------------------------------------------------------------------------
# ViT decoder (MAE style, as UNITE's modules/decoder.py)

class ViTBlock(nn.Module):
    """Plain pre-LN ViT block: LN -> MHSA (qkv bias) -> residual; LN -> GELU MLP x4 -> residual."""

    def __init__(self, dim, heads, mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, int(dim * mlp_ratio)), fc2=nn.Linear(int(dim * mlp_ratio), dim)))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v).transpose(1, 2).reshape(B, T, D)
        x = x + self.attn.proj(a)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class Decoder(nn.Module):
    """Latent (B, K, C) -> image (B, 3, H, W) in [0, 1] (no output activation; clamp only at eval).
    The input is two Linear layers, C -> dec_in_width -> D, as the released code (its `up_sample_decoder`,
    hard-coded to 768, then the decoder's `decoder_embed`): one linear map, but kept as two so the released
    weights load key for key and training starts from the same (PyTorch default) init."""

    def __init__(self, cfg: UniteConfig):
        super().__init__()
        D, p = cfg.dec_width, cfg.patch_size
        self.cfg = cfg
        self.embed = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.dec_in_width), nn.Linear(cfg.dec_in_width, D))
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        pos = torch.cat([torch.zeros(1, D), sincos_2d(D, cfg.grid)])                 # CLS slot = 0
        self.register_buffer("pos", pos.unsqueeze(0), persistent=False)              # (1, 1+K, D) fixed
        self.blocks = nn.ModuleList(ViTBlock(D, cfg.dec_heads, eps=1e-12) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(D, eps=1e-12)
        self.head = nn.Linear(D, p * p * 3)

    def forward(self, z):
        B, g, p = z.shape[0], self.cfg.grid, self.cfg.patch_size
        x = torch.cat([self.cls.expand(B, -1, -1), self.embed(z)], dim=1) + self.pos  # (B, 1+K, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.head(self.norm(x))[:, 1:]                                            # (B, K, p*p*3)
        x = x.reshape(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)                      # (B, 3, g, p, g, p)
        return x.reshape(B, 3, g * p, g * p).float()


# -----------------------------------------------------------------------------
# UNITE: the two passes and their losses

def draw_noise(cfg: UniteConfig, B, device=None, generator=None):
    """All the randomness of one training step for B images, batch axis first (so a DDP rank can take its slice
    of the global batch's draw, and the run does not depend on the number of GPUs)."""
    K, T, C = cfg.flow_copies, cfg.num_tokens, cfg.latent_dim
    rand = lambda *s: torch.rand(*s, device=device, generator=generator)
    randn = lambda *s: torch.randn(*s, device=device, generator=generator)
    return dict(
        flip=rand(B) < 0.5,                                      # horizontal flip (data augmentation)
        registers=randn(B, T, C),                                # tokenizer pass: registers start as noise
        recon_t=rand(B) * cfg.recon_t_max,                       # tokenizer pass: t ~ U[0, 0.01)
        aug_mask=rand(B) < cfg.noise_aug_prob,                   # decoder-input noise on half the batch ...
        aug_s=cfg.noise_aug_min + (1 - cfg.noise_aug_min) * rand(B),  # ... s ~ U[0.7, 1]
        aug_eps=randn(B, T, C),
        flow_t=sample_t(randn(B, K), cfg.time_shift),            # K noised copies per image
        flow_eps=randn(B, K, T, C),
        drop=rand(B, K) < cfg.class_dropout,                     # label dropout for CFG
    )


def sample_t(normal, shift):
    """Training t from standard normals: logit-normal(0, 1), then shifted t' = a t / (1 + (a-1) t); a = 0.5
    pushes t toward noise (t=0), median 0.5 -> 0.33 (code's modules/denoiser.py; the paper text says U[0, 1])."""
    t = torch.sigmoid(normal)
    return shift * t / (1 + (shift - 1) * t)


def noise_augment(z, noise):
    """Decoder-input noise: z~ = s z + (1 - s) eps with s ~ U[0.7, 1] on a random half of the samples (code;
    the paper text writes z + 0.7 eps). Gradients flow through both branches."""
    s = noise["aug_s"][:, None, None]
    return torch.where(noise["aug_mask"][:, None, None], s * z + (1 - s) * noise["aug_eps"], z)


def flow_loss(denoiser, z0, y, noise, cfg: UniteConfig):
    """Pass 2 on K noised copies of z0 (B, T, C), fused into one batch of B*K sequences.
    x-prediction trained with the velocity-space MSE: mean[((z0 - x_hat) / max(1 - t, 0.05))^2].
    As in the code, the K per-copy batch means are SUMMED (never divided by K)."""
    B, K = z0.shape[0], cfg.flow_copies
    zd = z0.unsqueeze(1).expand(B, K, *z0.shape[1:]).reshape(B * K, *z0.shape[1:])  # (B*K, T, C)
    t = noise["flow_t"].reshape(B * K)
    yd = torch.where(noise["drop"], cfg.num_classes, y.unsqueeze(1)).reshape(B * K)  # null = num_classes
    z_t = t[:, None, None] * zd + (1 - t[:, None, None]) * noise["flow_eps"].reshape(zd.shape)
    x_hat = denoiser.denoise(z_t, t, yd)
    w = (1 - t).clamp_min(cfg.t_eps)[:, None, None]
    per_sample = (((zd - x_hat) / w) ** 2).mean(dim=(1, 2))                          # (B*K,)
    return per_sample.mean() * K                                                      # = sum over copies


def l1_loss(recon, images):
    return F.l1_loss(recon, images.float())                                           # L1 on [0, 1] images


class UNITE(nn.Module):
    """The whole model: Generative Encoder (+ a separate denoiser if cfg.separate) and the decoder.
    forward(images, labels, noise) runs one training step's two passes and returns (loss, stats).
    Other modalities pass their own input embedding, decoder and recon_loss(decoder_output, input) -> scalar
    (molecules.py); the GE, the flow loss and the samplers are the same."""

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
        z0 = self.encoder.tokenize(images, noise["registers"], noise["recon_t"])     # pass 1: (B, T, C)
        recon = self.decoder(noise_augment(z0, noise))
        rec = self.recon_loss(recon, images)
        zd = z0 if cfg.no_stopgrad else z0.detach()                                   # stop-grad (Tab. 7a)
        flow = flow_loss(self.denoiser, zd.float(), labels, noise, cfg)               # pass 2
        return cfg.recon_weight * rec + flow, {"recon": rec.detach(), "flow": flow.detach()}

    @torch.no_grad()
    def reconstruct(self, images):
        return self.decoder(self.encoder.tokenize(images)).clamp(0, 1)


# -----------------------------------------------------------------------------
# samplers: fixed-step Euler / Heun on the shifted grid, CFG on the LayerNorm-ed x-prediction

def time_grid(steps, shift, device=None):
    """steps+1 times from 0 (noise) to 1 (clean), warped by the same shift as training."""
    t = torch.linspace(0, 1, steps + 1, device=device, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def guided_x(denoiser, z, t, y, cfg_scale, cfg_min_t, null):
    """x-prediction with classifier-free guidance applied to all channels of the full latent, on the
    LayerNorm-ed cond/uncond predictions ("norm_first", as the code): u + w (c - u), only for
    cfg_min_t < t < 1. The interval is open at t = 1 as in the released encoder.forward_with_cfg
    (`t < high`), so a Heun step's last evaluation at t = 1 is unguided. One batched forward for both
    halves, same noise."""
    tb = torch.full((z.shape[0],), float(t), device=z.device)
    if cfg_scale == 1.0 or not cfg_min_t < float(t) < 1.0:
        return denoiser.denoise(z, tb, y)
    out = denoiser.denoise(torch.cat([z, z]), torch.cat([tb, tb]), torch.cat([y, torch.full_like(y, null)]))
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample_latents(denoiser, noise, y, steps=50, method="heun", cfg_scale=1.0, cfg_min_t=0.1,
                   shift=0.5, t_eps=0.05, null=None):
    """Integrate dz/dt = v(z, t) from t=0 (noise) to t=1 (clean). Returns (z1 (B, K, C), NFE).
    NFE counts denoiser calls per sample (a CFG call counts once; it evaluates 2 sequences)."""
    null = denoiser.cfg.num_classes if null is None else null
    ts = time_grid(steps, shift, noise.device)
    z, nfe = noise.float(), 0

    def v(z, t):
        x_hat = guided_x(denoiser, z, t, y, cfg_scale, cfg_min_t, null).float()
        return (x_hat - z) / max(1 - float(t), t_eps)

    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        d0 = v(z, t0)
        nfe += 1
        if method == "euler":
            z = z + (t1 - t0).item() * d0
        elif method == "heun":  # trapezoid: average the slopes at both ends
            z1 = z + (t1 - t0).item() * d0
            z = z + (t1 - t0).item() * 0.5 * (d0 + v(z1, t1))
            nfe += 1
        else:
            raise ValueError(f"unknown sampler {method!r}: use euler or heun")
    return z, nfe


def sample_noise(indices, seed, shape, device=None):
    """Starting noise for samples by global index: sample i is the same on 1 or 8 GPUs and at any batch size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices]).to(device)


@torch.no_grad()
def generate(model, indices, num_classes, seed=0, labels=None, decoder=None, **sampler):
    """Images (N, 3, H, W) in [0, 1] for the given global sample indices; labels default to class-balanced
    i % num_classes. `decoder` defaults to model.decoder (sendvae.py passes its VAE decoder). Returns (x, nfe)."""
    cfg, dev = model.cfg, next(model.parameters()).device
    y = torch.as_tensor(labels if labels is not None else [i % num_classes for i in indices], device=dev)
    z, nfe = sample_latents(model.denoiser, sample_noise(indices, seed, (cfg.num_tokens, cfg.latent_dim), dev),
                            y, shift=cfg.time_shift, t_eps=cfg.t_eps, **sampler)
    return (decoder or model.decoder)(z).clamp(0, 1), nfe


# -----------------------------------------------------------------------------
# optimization: lr schedule, optimizers (Muon + AdamW as the released code), EMA

def get_lr(step, args, steps_per_epoch, total_steps):
    """Released config: linear warmup -> hold -> cosine down to min_lr_frac * lr by decay_end -> constant."""
    warm = args.warmup_epochs * steps_per_epoch
    hold = max(warm, args.hold_epochs * steps_per_epoch)
    end = total_steps if args.decay_epochs is None else args.decay_epochs * steps_per_epoch
    if step < warm:
        return args.lr * (step + 1) / warm
    if step < hold or end <= hold:
        return args.lr
    frac = min(1.0, (step - hold) / (end - hold))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def newton_schulz(G, coefficients, steps, eps, dtype):
    """Batched quintic Newton-Schulz orthogonalisation of G (N, A, B), the same iteration as torch.optim.Muon's
    (which runs it one matrix at a time, always in bf16)."""
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)                # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT                                                          # (N, a, a), a = min(A, B)
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.mT if tall else X


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same arguments, state and update) with two speed-ups: the Newton-Schulz iteration is
    batched over matrices of the same shape, and runs in `ns_dtype`. torch's runs it per matrix in bf16, which
    on CPUs without bf16 units (AVX512-BF16 / AMX) is ~3.5x slower than fp32: there it took ~45% of the tiny
    preset's training step. ns_dtype=None: bf16 on CUDA (as torch and the released code), fp32 elsewhere;
    train.py passes bf16 exactly when the run is bf16."""

    def __init__(self, params, ns_dtype=None, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            by_shape = {}
            for p in g["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - g["momentum"])
                u = p.grad.lerp(buf, g["momentum"]) if g["nesterov"] else buf
                by_shape.setdefault(tuple(p.shape), []).append((p, u))
            for (A, B), items in by_shape.items():
                U = torch.stack([u for _, u in items])                            # (N, A, B)
                dtype = self.ns_dtype or (torch.bfloat16 if U.is_cuda else torch.float32)
                U = newton_schulz(U, g["ns_coefficients"], g["ns_steps"], g["eps"], dtype)
                match = g["adjust_lr_fn"] == "match_rms_adamw"                     # else torch's "original"
                ratio = 0.2 * math.sqrt(max(A, B)) if match else math.sqrt(max(1, A / B))
                for (p, _), u in zip(items, U):
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                    p.add_(u, alpha=-g["lr"] * ratio)
        return loss


def make_optimizers(model, args, ns_dtype=None):
    """Muon for the 2-D weight matrices (as the code: not the patch embed, final layer, in-context or register
    position embeddings), AdamW (betas 0.9/0.999, eps 1e-6, wd 0) for everything else."""
    excluded = ("patch_embed", "final_", "in_context_pos", "latent_pos")
    muon, rest = [], []
    for name, p in model.named_parameters():
        use_muon = args.optimizer == "muon" and p.ndim == 2 and not any(k in name for k in excluded)
        (muon if use_muon else rest).append(p)
    opts = [torch.optim.AdamW(rest, lr=args.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)]
    if muon:
        opts.append(Muon(muon, lr=args.lr, momentum=0.95, weight_decay=0.0, adjust_lr_fn="match_rms_adamw",
                         ns_dtype=ns_dtype))
    return opts


@torch.no_grad()
def update_ema(ema, model, decay, step):
    d = min(decay, (1 + step) / (10 + step))  # warm-up: an early EMA is not poisoned by the random init
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1 - d)


# -----------------------------------------------------------------------------
# AutoencoderKL (Send-VAE's tokenizer): the LDM convolutional VAE (REPA-E models/autoencoder.py, same module
# names as the LDM code), trained by sendvae.py; and TwoStage, the SiT-style baseline train.py --tokenizer builds:
# the GE in denoise-only mode on the frozen VAE's normalised latents. Images are in [0, 1] as everywhere in this
# repo; the VAE sees 2x - 1 as the LDM VAEs do.

@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)      # f16d32 (VA-VAE / IN-VAE); f8d4 (SD-VAE) is (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)       # feature-map sizes with a self-attention block (the mid block has one)
    resolution: int = 256
    z_channels: int = 32
    norm_groups: int = 32                 # GroupNorm groups (LDM: 32; the tiny preset has 16-channel maps)

    @property
    def factor(self):                     # spatial down-sampling: 2 ** (levels - 1)
        return 2 ** (len(self.ch_mult) - 1)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
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
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        a = attend(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(a)


def _level(blocks, attns, resample):
    """One resolution level, with LDM's module names (down.i.block.j, down.i.downsample.conv, ...)."""
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
            blocks = [ResnetBlock(cin if j == 0 else c.ch * m, c.ch * m, g) for j in range(c.num_res_blocks)]
            cin = c.ch * m
            attns = [AttnBlock(cin, g) for _ in blocks] if res in c.attn_resolutions else []
            last = i == len(c.ch_mult) - 1
            # stride-2 conv with LDM's asymmetric (0, 1, 0, 1) padding
            self.down.append(_level(blocks, attns, None if last else ("downsample", nn.Conv2d(cin, cin, 3, 2))))
            res //= 1 if last else 2
        self.mid = _mid(cin, g)
        self.norm_out, self.conv_out = nn.GroupNorm(g, cin, eps=1e-6), nn.Conv2d(cin, 2 * c.z_channels, 3, padding=1)

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
    """(B, z, h, w) -> (B, 3, h f, w f) in [-1, 1] (unclamped). `up` is indexed by level as in LDM (up[0] is the
    full-resolution level, run last)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        g, res, cin = c.norm_groups, c.resolution // c.factor, c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, g)
        up = []
        for i in reversed(range(len(c.ch_mult))):
            cout = c.ch * c.ch_mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(c.num_res_blocks + 1)]
            cin = cout
            attns = [AttnBlock(cout, g) for _ in blocks] if res in c.attn_resolutions else []
            up.insert(0, _level(blocks, attns, ("upsample", nn.Conv2d(cout, cout, 3, padding=1)) if i else None))
            res *= 2 if i else 1
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = nn.GroupNorm(g, cin, eps=1e-6), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(self.up):
            for j, blk in enumerate(lvl.block):
                h = lvl.attn[j](blk(h)) if len(lvl.attn) else blk(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """encode(x in [0, 1]) -> (mean, logvar) each (B, C, h, w); decode(z) -> (B, 3, H, W) in [0, 1] (unclamped).
    logvar is clamped to [-30, 20] as in LDM's DiagonalGaussianDistribution."""

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


class LatentVAE(nn.Module):
    """A frozen AutoencoderKL in GE-token units, with the per-channel latent mean/std (buffers, saved in the
    checkpoint): tokens(x) -> (B, h*w, C) = ((z - mean) / std) flattened in raster order; forward(tokens) -> images."""

    def __init__(self, vae_cfg: VAEConfig):
        super().__init__()
        self.vae = AutoencoderKL(vae_cfg).requires_grad_(False)
        self.register_buffer("latent_mean", torch.zeros(vae_cfg.z_channels))
        self.register_buffer("latent_std", torch.ones(vae_cfg.z_channels))

    @torch.no_grad()
    def fit_latent_stats(self, batches):
        """Per-channel mean/std of the posterior means over an iterable of image batches (B, 3, H, W), once."""
        z = torch.cat([self.vae.encode(x)[0] for x in batches])                       # (N, C, h, w)
        self.latent_mean.copy_(z.mean(dim=(0, 2, 3)))
        self.latent_std.copy_(z.std(dim=(0, 2, 3)))

    @torch.no_grad()
    def tokens(self, x, eps=None):
        """Images -> (B, h*w, C); eps (B, h*w, C) draws a posterior sample (REPA-E's train_ldm_only samples the
        posterior every step), None gives the posterior mean."""
        mean, logvar = self.vae.encode(x)                                             # (B, C, h, w)
        z = mean.flatten(2).transpose(1, 2)                                           # (B, h*w, C)
        if eps is not None:
            z = z + (0.5 * logvar).exp().flatten(2).transpose(1, 2) * eps
        return (z - self.latent_mean) / self.latent_std

    def forward(self, tokens):
        B, T, C = tokens.shape
        h = int(math.isqrt(T))
        z = (tokens.float() * self.latent_std + self.latent_mean).transpose(1, 2).reshape(B, C, h, h)
        return self.vae.decode(z)                                                     # (B, 3, H, W)


class TwoStage(nn.Module):
    """The two-stage baseline (Send-VAE Fig. 3, stage 2): the GE in denoise-only mode (a SiT: flow loss only)
    on the latents of a frozen VAE. Same interface as UNITE: forward -> (loss, stats), .denoiser, .decoder,
    reconstruct. cfg must give the VAE's latent grid: patch_size = vae_cfg.factor, latent_dim = z_channels."""

    def __init__(self, cfg: UniteConfig, vae_cfg: VAEConfig):
        super().__init__()
        assert cfg.grid * vae_cfg.factor == cfg.image_size and cfg.latent_dim == vae_cfg.z_channels
        self.cfg = cfg
        self.encoder = GenerativeEncoder(cfg, with_patch_embed=False)
        # no output LayerNorm (as SiT): UNITE's latents are LayerNorm-ed per token by construction, a VAE's are
        # not, and an affine LayerNorm could not reach per-token means and scales of the normalised VAE latent
        self.encoder.out_norm = nn.Identity()
        self.decoder = LatentVAE(vae_cfg)                                             # frozen

    @property
    def denoiser(self):
        return self.encoder

    def forward(self, images, labels, noise=None):
        if noise is None:
            noise = draw_noise(self.cfg, images.shape[0], images.device)
        # the step's register noise has the latent's shape (B, h*w, C): reused as the posterior-sample eps,
        # so the run stays independent of the number of processes (see draw_noise)
        z0 = self.decoder.tokens(images, noise["registers"])                          # (B, h*w, C), no grad
        flow = flow_loss(self.encoder, z0.float(), labels, noise, self.cfg)
        return flow, {"recon": torch.zeros_like(flow.detach()), "flow": flow.detach()}

    @torch.no_grad()
    def reconstruct(self, images):                                                    # the VAE's, not the GE's
        return self.decoder(self.decoder.tokens(images)).clamp(0, 1)


VAE_PRESETS = {  # the paper's two tokenizers at 256 px (REPA-E registry) and a CPU one for 32x32 data
    "f16d32": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=32),
    "f8d4": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), z_channels=4),
    "tiny": dict(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, attn_resolutions=(), z_channels=16, resolution=32,
                 norm_groups=8),
}


# -----------------------------------------------------------------------------
# size presets: GE / decoder shapes. B = GE 12x768 (130.6M) + decoder 12x768 (86.2M); L and XL keep the B decoder.

PRESETS = {
    # tiny: a CPU preset for 32 px. The GE is narrow (64) because at an equal CPU budget the shape accuracy of the
    # samples follows the compute spent, not the width, and a narrow GE takes more steps in the same time; the
    # decoder stays at 128 (decoder 64 vs 128, one run each at about the same CPU time: FD-shapes 182 vs 161).
    # README, session 11.
    "tiny": dict(image_size=32, patch_size=8, latent_dim=16, enc_depth=6, enc_width=64, enc_heads=2,
                 dec_depth=4, dec_width=128, dec_heads=2, dec_in_width=128, in_context_len=4, in_context_start=2, flow_copies=2,
                 recon_weight=30.0),
    "micro": dict(image_size=32, patch_size=8, latent_dim=8, enc_depth=2, enc_width=64, enc_heads=2, dec_depth=1,
                  dec_width=64, dec_heads=2, dec_in_width=64, in_context_len=2, in_context_start=1, flow_copies=2),  # tests
    "S": dict(enc_depth=12, enc_width=384, enc_heads=6, dec_depth=12, dec_width=384, dec_heads=6),
    "B": dict(enc_depth=12, enc_width=768, enc_heads=12, dec_depth=12, dec_width=768, dec_heads=12),
    "L": dict(enc_depth=24, enc_width=1024, enc_heads=16, dec_depth=12, dec_width=768, dec_heads=12),
    "XL": dict(enc_depth=28, enc_width=1152, enc_heads=16, dec_depth=12, dec_width=768, dec_heads=12),
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
