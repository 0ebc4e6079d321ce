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
import re
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
    """Fixed 2-D sin-cos embedding (grid*grid, dim): half the channels for rows, half for
    columns."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, xs.flatten()), sincos_1d(dim // 2, ys.flatten())], dim=1)


def rope_tables(n_tokens, head_dim, n_identity=0, theta=10000.0):
    """1-D RoPE cos/sin tables (n_identity + n_tokens, head_dim) with interleaved pairs ("lang"
    frequencies, as UNITE's VisionRotaryEmbeddingFast). The first n_identity rows
    (in-context class tokens) get cos=1, sin=0."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)        # (hd/2,)
    ang = torch.arange(n_tokens).float()[:, None] * freqs[None]                     # (T, hd/2)
    ang = ang.repeat_interleave(2, dim=1)                                            # (T, hd)
    cos = torch.cat([torch.ones(n_identity, head_dim), ang.cos()])
    sin = torch.cat([torch.zeros(n_identity, head_dim), ang.sin()])
    return cos, sin


CPU_BF16_MATH_ATTENTION = True  # train.py --plan sets False: count what a GPU's fused kernel saves


def attend(q, k, v):
    """F.scaled_dot_product_attention, q/k/v (B, H, T, hd). On CPU in bf16 the fused (flash) kernel
    measured ~4x slower than the plain math path at this repo's short sequences
    (fwd + bwd, T = 20..68), while in fp32 it is the faster one: pick the math path for exactly that
    case."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and CPU_BF16_MATH_ATTENTION:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def apply_rope(x, cos, sin):
    """x (B, H, T, hd); rotate each interleaved pair
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


# -----------------------------------------------------------------------------
# Generative Encoder blocks (DiT / LightningDiT style, as UNITE's modules/encoder.py)

class Attention(nn.Module):
    """Multi-head self-attention with QK-RMSNorm and 1-D RoPE, through
    F.scaled_dot_product_attention."""

    def __init__(self, dim, heads, qk_norm=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, T, D = x.shape
        # 3x (B,H,T,hd)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # QK-RMSNorm in fp32 (under autocast q, k are bf16)
        q, k = self.q_norm(q.float()), self.k_norm(k.float())
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # attend in v's dtype: bf16 under autocast, as the code
        x = attend(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class SwiGLU(nn.Module):
    """SwiGLU MLP with hidden = int(2/3 * 4 * dim) (2048 for dim 768), so it costs as much as
    a 4x GELU MLP."""

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
    """Gaussian-Fourier features of t in [0, 1] (not x1000): fixed W ~ N(0, 1),
    sin/cos(2 pi t W) -> MLP."""

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
    patch_size: int = 16            # image patch for the tokenizer; the decoder uses the same patch
    latent_dim: int = 32            # C: channels per latent token
    enc_depth: int = 12
    enc_width: int = 768
    enc_heads: int = 12
    dec_depth: int = 12
    dec_width: int = 768
    dec_heads: int = 12
    dec_in_width: int = 768         # width between the decoder's two input Linears
                                    # (released code: 768)
    num_classes: int = 1000         # null class = num_classes
    in_context_len: int = 32        # class tokens prepended from block in_context_start on
                                    # (0 = off)
    in_context_start: int = 4
    qk_norm: bool = True
    block_norm: bool = True
    class_dropout: float = 0.1      # label dropout in the denoising pass, for CFG
    recon_t_max: float = 0.01       # tokenizer pass uses t ~ U[0, 0.01): the max-noise end
                                    # (code's config)
    recon_weight: float = 1.0       # L = w * L_recon + L_flow; the code has w = 1 with
                                    # L_recon = L1 + LPIPS. The tiny preset has no LPIPS and its
                                    # flow loss is ~10x its L1, so Muon's updates of the shared GE
                                    # favour denoising: it sets w = 30
                                    # (w = 10 / 30 / 100: docs/experiments.md)
    noise_aug_prob: float = 0.5     # decoder-input noise augmentation on half the batch ...
    noise_aug_min: float = 0.7      # ... with s ~ U[0.7, 1] (Tab. 7c)
    flow_copies: int = 14           # K noised copies per image (A1 Tab. 8; the code's config has 3)
    flow_chunk: int = 3             # copies per denoiser forward (released flow_mini_batch): bounds
                                    # the recompute transient of checkpointed blocks, not the saved
                                    # activations
    time_shift: float = 0.5         # alpha of t' = a t / (1 + (a - 1) t) (Tab. 7e)
    t_eps: float = 0.05             # (1 - t) clamp in the velocity
    separate: bool = False          # Tab. 7a: separate tokenizer and denoiser weights
    stopgrad: bool = True           # Tab. 7a: False lets the flow loss reach the tokenizer
                                    # through z0
    grad_checkpoint: str = "auto"   # recompute GE blocks in backward: off | flow (denoising pass) |
                                    # all (both passes) | auto = flow when K > 4, as the released
                                    # UNITE.__init__
    latent_tokens: int = 0          # latent registers; 0 = one per image patch (molecules.py sets
                                    # its own)
    input_tokens: int = 0           # tokens the input embedding appends after the registers;
                                    # 0 = image patches

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def num_tokens(self):           # latent registers = image patches (256 at 256 px, patch 16)
                                    # unless set
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
        # In the released code the image patches get no absolute position embedding (its MAE pos-emb
        # buffer stays zero): patch positions come only from RoPE, in raster order after the
        # registers.
        self.latent_in = nn.Linear(cfg.latent_dim, D)
        # learned, sin-cos init
        self.latent_pos = nn.Parameter(sincos_1d(D, torch.arange(K)).unsqueeze(0))
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
        hd = D // cfg.enc_heads
        # registers + patches (or other input tokens)
        max_tokens = K + (cfg.input_tokens or cfg.grid ** 2)
        for name, n_id in (("rope", 0), ("rope_ic", cfg.in_context_len)):
            cos, sin = rope_tables(max_tokens, hd, n_id)
            self.register_buffer(name + "_cos", cos, persistent=False)
            self.register_buffer(name + "_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        # as UNITE's Encoder.initialize_weights: xavier Linear, zero bias, N(0, .02) tables,
        # adaLN-Zero
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
        """z (B, K, C) registers, t (B,) in [0,1], y (B,) labels (num_classes = null),
        images (B, 3, H, W) (or whatever input_embed takes) or None. Returns the LayerNorm-ed
        register outputs (B, K, C).
        checkpoint_blocks: keep only each block's input for backward and recompute the rest
        there."""
        cfg, K = self.cfg, z.shape[1]
        x = self.latent_in(z) + self.latent_pos                                 # (B, K, D)
        if images is not None:
            p = self.patch_embed(images)                                        # (B, P, D)
            x = torch.cat([x, p], dim=1)                                        # (B, K+P, D)
        y_emb = self.y_embed(y)                                                 # (B, D)
        # (B, D) drives every adaLN
        c = self.t_embed(t) + y_emb
        T, L = x.shape[1], cfg.in_context_len
        rope = (self.rope_cos[:T], self.rope_sin[:T])
        for i, blk in enumerate(self.blocks):
            if L > 0 and i == cfg.in_context_start:
                # in-context class tokens: y_emb + learned positions, identity RoPE (cos 1, sin 0)
                x = torch.cat([y_emb.unsqueeze(1) + self.in_context_pos, x], dim=1)  # (B, L+T, D)
                rope = (self.rope_ic_cos[:L + T], self.rope_ic_sin[:L + T])
            if checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(blk, x, c, rope, use_reentrant=False)
            else:
                x = blk(x, c, rope)
        if L > 0 and cfg.in_context_start < len(self.blocks):
            x = x[:, L:]                                                        # drop class tokens
        x = x[:, :K]                                                            # keep the registers
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))      # (B, K, C)
        return self.out_norm(x.float())                                         # LayerNorm in fp32

    def tokenize(self, images, noise=None, t=None):
        """Pass 1: image -> z0 (B, K, C). Registers = Gaussian noise (B, K, C),
        t ~ U[0, recon_t_max) (B,), class = null. Pass noise / t to fix them (training draws them
        per sample; checks compare codes)."""
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
    The input is two Linear layers, C -> dec_in_width -> D, as the released code (its
    `up_sample_decoder`, hard-coded to 768, then the decoder's `decoder_embed`): one linear map, but
    kept as two so the released weights load key for key and training starts from the same
    (PyTorch default) init."""

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
# LPIPS (Zhang et al. 2018, v0.1, VGG16 trunk): the perceptual half of the released
# reconstruction loss, L_recon = L1 + 1.0 * LPIPS (configs/imagenet.yaml perceptual_weight).
# Same maths as the `lpips` package and UNITE's modules/autoencoding_utils/lpips.py. Module
# names follow torchvision (features.N), so its vgg16 file loads key for key; the heads load
# from the published file (linK.model.1.weight).

# the two weight files: (url, sha256, file name in data.cache_dir())
LPIPS_FILES = {
    # torchvision's ImageNet VGG16 (VGG16_Weights.IMAGENET1K_V1, 553,433,881 bytes). torchvision
    # checks only the 8-digit prefix in the name; the full sha256 is the one projects pin for it
    "vgg": ("https://download.pytorch.org/models/vgg16-397923af.pth",
            "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
            "vgg16-397923af.pth"),
    # the v0.1 VGG heads (7,289 bytes, md5 d507d7349b931f0638a25a48a722f98a), from the URL the
    # released UNITE code downloads (lpips.py URL_MAP); the same bytes ship in the `lpips` wheel
    # and in richzhang/PerceptualSimilarity as lpips/weights/v0.1/vgg.pth
    "lin": ("https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1",
            "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
            "lpips_vgg_v0.1.pth"),
}
assert LPIPS_FILES["vgg"][1].startswith(LPIPS_FILES["vgg"][0].rsplit("-", 1)[1][:8])


def _load_weights(path, keys):
    """{key: tensor} from a torch.save'd state dict; `keys` maps each key we need to its shape.
    Other keys are ignored (torchvision's file also holds the classifier). Problems: UserError."""
    import data  # lazy: model.py needs nothing else from data.py (and its imports)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise data.UserError(f"{path}: no such file") from None
    except Exception as e:
        raise data.UserError(f"{path}: not a torch state dict ({type(e).__name__})") from None
    for k, shape in keys.items():
        if k not in sd:
            raise data.UserError(f"{path}: missing key {k!r}")
        if tuple(sd[k].shape) != tuple(shape):
            raise data.UserError(f"{path}: {k!r} has shape {tuple(sd[k].shape)}, "
                                 f"expected {tuple(shape)}")
    return {k: sd[k] for k in keys}


class LPIPS(nn.Module):
    """LPIPS v0.1, VGG16 trunk: forward(a, b), images (B, 3, H, W) in [-1, 1] -> distances (B,).
    d = sum over relu1_2 .. relu5_3 of mean_hw(w_l . (f_a - f_b)^2), f = the features of the
    scaled input, unit-normalised over channels. Frozen and always in eval mode. None paths give
    random weights (tests, memory counts)."""

    CHANNELS = (64, 128, 256, 512, 512)
    TAPS = (3, 8, 15, 22, 29)      # indices of relu1_2 .. relu5_3 in torchvision's vgg16.features
    VGG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

    def __init__(self, vgg_path=None, lin_path=None):
        super().__init__()
        layers, cin = [], 3
        for v in self.VGG:          # torchvision's vgg16 ("D") layout up to relu5_3: 30 layers
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        # v0.1 scaling layer, [-1, 1] -> ~ImageNet-normalised; constants, kept out of state_dict
        shift, scale = torch.tensor([-.030, -.088, -.188]), torch.tensor([.458, .448, .450])
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        if vgg_path is not None:
            own = self.features.state_dict()
            sd = _load_weights(vgg_path, {"features." + k: v.shape for k, v in own.items()})
            self.features.load_state_dict({k: sd["features." + k] for k in own})
        if lin_path is not None:
            keys = {f"lin{i}.model.1.weight": h.weight.shape for i, h in enumerate(self.heads)}
            sd = _load_weights(lin_path, keys)
            for h, k in zip(self.heads, keys):
                h.weight.data.copy_(sd[k])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # a fixed metric: never in training mode (see head_dropout)

    def taps(self, x):
        """x (B, 3, H, W) in [-1, 1] -> the five relu outputs (B, C_l, H / 2^l, W / 2^l)."""
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x)
        return out

    def forward(self, a, b, head_dropout=False):
        """a, b (B, 3, H, W) in [-1, 1] -> (B,). head_dropout=True: dropout p = 0.5 on the
        squared feature differences before each head, as in the released training steps."""
        d = 0
        for fa, fb, head in zip(self.taps(a), self.taps(b), self.heads):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)     # unit norm over C
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            diff = F.dropout((fa - fb) ** 2, 0.5, training=head_dropout)   # (B, C_l, h, w)
            d = d + head(diff).mean(dim=(1, 2, 3))                         # (B,) spatial mean
        return d


def lpips_loss(lpips, recon, images, released=True, training=True):
    """The LPIPS term of the reconstruction loss: batch mean of lpips(images, recon); recon and
    images (B, 3, H, W) in [0, 1] (this repo's range). released=True does what the released UNITE
    code does (modules/autoencoding_utils/lpips.py, models/unite.py):
      - it feeds the [0, 1] images unchanged to a net that expects [-1, 1] (unite.py:289);
      - its heads have nn.Dropout(0.5) (use_dropout=True, lpips.py:238, 186); UNITE calls
        lpips_loss.eval() once (unite.py:52), but train_one_epoch's model.train()
        (engines/train.py:37) recurses into it, so dropout is on in every training step:
        pass training=model.training;
      - reduction "mean" over the (B, 1, 1, 1) distances, i.e. over the batch (lpips.py:280).
    released=False is LPIPS as defined: inputs 2x - 1, no dropout."""
    if released:
        return lpips(images, recon, head_dropout=training).mean()
    return lpips(2 * images - 1, 2 * recon - 1).mean()


def load_lpips(device="cpu"):
    """LPIPS with the published weights, downloaded once into data.cache_dir() (sha256-checked).
    A missing file offline: one UserError line saying where to put each missing file."""
    import os
    import data  # lazy, as in _load_weights
    paths, errors = [], []
    for url, sha256, name in LPIPS_FILES.values():
        try:
            paths.append(data.download(url, os.path.join(data.cache_dir(), name), "sha256", sha256))
        except data.UserError as e:
            errors.append(str(e))
    if errors:
        raise data.UserError("LPIPS weights: " + "; ".join(errors))
    return LPIPS(*paths).to(device)


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
        # pass 1: (B, T, C)
        z0 = self.encoder.tokenize(images, noise["registers"], noise["recon_t"])
        recon = self.decoder(noise_augment(z0, noise))
        rec = self.recon_loss(recon, images)
        zd = z0.detach() if cfg.stopgrad else z0                               # stop-grad (Tab. 7a)
        flow = flow_loss(self.denoiser, zd.float(), labels, noise, cfg)           # pass 2
        return cfg.recon_weight * rec + flow, {"recon": rec.detach(), "flow": flow.detach()}

    @torch.no_grad()
    def reconstruct(self, images, noise=None, t=None):
        """EMA-style inference: tokenize (fresh register noise and t unless given), decode,
        clamp."""
        return self.decoder(self.encoder.tokenize(images, noise, t)).clamp(0, 1)


# The released checkpoints (ShivamDuggal4/UNITE-tokenization-generation, models/unite.py): our
# modules are theirs tensor for tensor, under other names. First matching rule wins; others equal.
_TO_OFFICIAL = [  # (our state-dict name, released name)
    (r"^encoder\.latent_pos$", "latent_tokens"),
    (r"^encoder\.patch_embed\.", "patch_embed.patch_embeddings.projection."),
    (r"^encoder\.out_norm\.", "encoder_layer_norm."),
    (r"^encoder\.latent_in\.", "encoder.up_sample."),
    (r"^encoder\.t_embed\.", "encoder.t_embedder."),             # incl. the fixed frequencies W
    (r"^encoder\.y_embed\.", "encoder.y_embedder.embedding_table."),
    (r"^encoder\.in_context_pos$", "encoder.in_context_posemb"),
    (r"^encoder\.final_norm\.", "encoder.final_layer.norm_final."),
    (r"^encoder\.final_adaLN\.", "encoder.final_layer.adaLN_modulation."),
    (r"^encoder\.final_linear\.", "encoder.final_layer.linear."),
    (r"^(encoder\.blocks\.\d+)\.adaLN\.", r"\1.adaLN_modulation."),
    (r"^decoder\.embed\.0\.", "up_sample_decoder."),
    (r"^decoder\.embed\.1\.", "decoder.decoder_embed."),
    (r"^decoder\.cls$", "decoder.trainable_cls_token"),
    (r"^decoder\.norm\.", "decoder.decoder_norm."),
    (r"^decoder\.head\.", "decoder.decoder_pred."),
    (r"^decoder\.blocks\.(\d+)\.norm1\.", r"decoder.decoder_layers.\1.layernorm_before."),
    (r"^decoder\.blocks\.(\d+)\.norm2\.", r"decoder.decoder_layers.\1.layernorm_after."),
    (r"^decoder\.blocks\.(\d+)\.attn\.qkv\.", r"decoder.decoder_layers.\1.qkv."),
    (r"^decoder\.blocks\.(\d+)\.attn\.proj\.", r"decoder.decoder_layers.\1.attn_proj."),
    (r"^decoder\.blocks\.(\d+)\.mlp\.fc1\.", r"decoder.decoder_layers.\1.ffn_up."),
    (r"^decoder\.blocks\.(\d+)\.mlp\.fc2\.", r"decoder.decoder_layers.\1.ffn_down."),
]
# released tensors with no trained content, skipped by name: the frozen LPIPS net, two tables their
# forward never reads, and fixed tables that from_official checks against ours
_OFFICIAL_SKIP = (r"^lpips_loss\.", r"^encoder\.pos_embed$",
                  r"^encoder\.t_embedder\.special_time_emb$", r"^patch_embed\.position_embeddings$",
                  r"^decoder\.decoder_pos_embed$",
                  r"^encoder\.feat_rope(_incontext)?\.freqs_(cos|sin)$")


def _official_name(key):
    for pattern, repl in _TO_OFFICIAL:
        name, n = re.subn(pattern, repl, key)
        if n:
            return name
    return key


def from_official(state_dict, cfg: UniteConfig, preset=None):
    """UNITE(cfg) carrying the weights of the released code's `UNITE` (its models/unite.py).

    state_dict: a plain state dict of theirs, or their checkpoint file's dict (utils/checkpoint.py:
    step, epoch, model, ema, current_best_cfg_scale, optimizer(_muon), scheduler(_muon); no config),
    of which "ema" is used (else "model"). The `_orig_mod.` of torch.compile (their decoder is
    compiled, so its keys carry it) and a leading `module.` are stripped. Names, theirs -> ours
    (rules in _TO_OFFICIAL):
      latent_tokens -> encoder.latent_pos
      patch_embed.patch_embeddings.projection -> encoder.patch_embed
      encoder.{up_sample, t_embedder, y_embedder.embedding_table, in_context_posemb}
          -> encoder.{latent_in, t_embed, y_embed, in_context_pos}
      encoder.final_layer.{norm_final, adaLN_modulation, linear}
          -> encoder.final_{norm, adaLN, linear}
      encoder.blocks.i.adaLN_modulation -> encoder.blocks.i.adaLN (the rest of a block: same names)
      encoder_layer_norm -> encoder.out_norm
      up_sample_decoder, decoder.decoder_embed -> decoder.embed.0, decoder.embed.1 (C -> 768 -> D)
      decoder.trainable_cls_token (D,) -> decoder.cls (1, 1, D)
      decoder.decoder_layers.i.{layernorm_before, qkv, attn_proj, layernorm_after, ffn_up, ffn_down}
          -> decoder.blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}
      decoder.decoder_norm, decoder.decoder_pred -> decoder.norm, decoder.head
    Their label table has num_classes + 2 rows (LabelEmbedder: the classes, null = num_classes, and
    a last row its comment calls "not required", which no label reaches): the last row is dropped.
    Skipped by name (_OFFICIAL_SKIP): lpips_loss.*, encoder.pos_embed and special_time_emb (never
    read); patch_embed.position_embeddings must be zero (its init is never called); the RoPE tables
    and decoder_pos_embed must equal the ones we compute. Any other leftover or missing tensor, or a
    shape that does not fit cfg, is a one-line UserError naming the tensor (and `preset`, e.g. "B").
    The file cannot tell the decoder's head count or in_context_start: those come from cfg."""
    from data import UserError  # imported here: nothing else in model.py needs data.py
    sd = state_dict
    for entry in ("ema", "model"):  # their file: the EMA weights, which all their evaluations use
        if isinstance(state_dict.get(entry), dict):
            sd = state_dict[entry]
            break
    sd = {re.sub(r"^module\.", "", k).replace("_orig_mod.", ""): v for k, v in sd.items()}
    what = f"--model {preset}" if preset else "the model config"
    if cfg.separate:
        raise UserError("the released UNITE shares one GE for both passes: cfg.separate is set")
    depths = (("encoder.blocks.", cfg.enc_depth), ("decoder.decoder_layers.", cfg.dec_depth))
    for prefix, n_ours in depths:  # a wrong preset usually shows here first
        idx = [int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)]
        n = 1 + max(idx, default=-1)
        if n != n_ours:
            raise UserError(f"{what} has {n_ours} {prefix}* layers but the file has {n}")
    model = UNITE(cfg)
    ours, weights = model.state_dict(), {}
    names = {_official_name(k): k for k in ours}                                 # released -> ours
    for name, v in sd.items():
        if any(re.search(p, name) for p in _OFFICIAL_SKIP):
            continue
        if name not in names:
            raise UserError(f"the file has a tensor {name} that {what} has no place for")
        k = names[name]
        want = tuple(ours[k].shape)
        if k == "encoder.y_embed.weight":
            want = (want[0] + 1, want[1])                                  # + their unused last row
        elif k == "decoder.cls":
            want = want[-1:]                                               # (D,) in theirs
        if tuple(v.shape) != want:
            raise UserError(f"{name} is {tuple(v.shape)} in the file but {want} for {what}")
        weights[k] = v[:-1] if k == "encoder.y_embed.weight" else v.reshape(ours[k].shape)
    missing = [name for name, k in names.items() if k not in weights]
    if missing:
        raise UserError(f"the file has no tensor {missing[0]} (needed by {what})")
    pe = sd.get("patch_embed.position_embeddings")
    if pe is not None and pe.abs().max() > 0:
        raise UserError("patch_embed.position_embeddings is not zero in the file (ours has none)")
    enc = model.encoder
    fixed = {"encoder.feat_rope.freqs_cos": enc.rope_cos,
             "encoder.feat_rope.freqs_sin": enc.rope_sin,
             "encoder.feat_rope_incontext.freqs_cos": enc.rope_ic_cos,
             "encoder.feat_rope_incontext.freqs_sin": enc.rope_ic_sin,
             "decoder.decoder_pos_embed": model.decoder.pos}
    # tolerance 1e-4: their EMA also averages the frozen decoder_pos_embed (a requires_grad=False
    # parameter), which moves it by ~3e-6 in float32; a table of another shape or grid is off
    # by O(1)
    for name, table in fixed.items():
        v = sd.get(name)
        if v is not None and (v.shape != table.shape or (v.float() - table).abs().max() > 1e-4):
            raise UserError(f"{name} in the file differs from the table we compute for {what}")
    model.load_state_dict(weights)
    return model


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


# Dormand-Prince 5(4) with torchdiffeq's coefficients (dopri5, the released sampler's solver). Stage
# s+1 runs at t + C[s] h on y + h sum_j A[s][j] k_j. A's last row is the 5th-order solution y1, so
# the 7th slope is f(t + h, y1), reused as the next step's first (FSAL): 6 evaluations a step.
# E = 5th minus embedded 4th-order weights (the error estimate; torchdiffeq's 4th-order pair gives
# 2/3 of scipy's RK45 estimate); MID = the weights of y(t + h/2), for the dense output.
DOPRI_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI_A = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
           (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
           (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
           (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DOPRI_E = (35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
           -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)
DOPRI_MID = tuple(w / 2 for w in (6025192743 / 30085553152, 0, 51252292925 / 65400821598,
                                  -2691868925 / 45128329728, 187940372067 / 1594534317056,
                                  -1776094331 / 19743644256, 11237099 / 235043384))


def rk_sum(k, w, h):
    """h sum_j w_j k_j over the stage axis (last) of k, in torchdiffeq's float32 order: in the error
    estimate the terms cancel to ~1e-5 of their size, so the order of the sum shows there."""
    w = torch.tensor(w, dtype=k.dtype, device=k.device)
    return (k[..., :len(w)] * (h[..., None] * w)).sum(-1)


def dopri5_dense(y0, y1, k, h, x):
    """y(t0 + x h) inside one step: torchdiffeq's quartic through y0, y(t0 + h/2), y1 and the end
    slopes k[..., 0], k[..., -1]. h and x broadcast against y (float32)."""
    ymid = y0 + rk_sum(k, DOPRI_MID, h)
    f0, f1 = k[..., 0], k[..., -1]
    a = 2 * h * (f1 - f0) - 8 * (y1 + y0) + 16 * ymid
    b = h * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * ymid
    c = h * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * ymid
    x2 = x * x
    return y0 + x * (h * f0) + x2 * c + x2 * x * b + x2 * x * x * a


def dopri5(f, y0, atol=1e-6, rtol=1e-3, t_end=1.0):
    """Adaptive Dormand-Prince 5(4) for dy/dt = f(idx, y, t) from t=0 to t_end, by torchdiffeq's
    dopri5 rules: error ratio = RMS of err / (atol + rtol max(|y0|, |y1|)), accept if <= 1; first
    step as Hairer-Norsett-Wanner II.4; next h = h clip(0.9 ratio^(-1/5), 1 if accepted else 0.2,
    10). Steps are not cut at t_end: the last one may overshoot it (f is then called at t > t_end)
    and y(t_end) is read off the dense output. torchdiffeq takes one norm and one step over the
    whole batch; here each sample keeps its own t, h and accept/reject, so its path does not depend
    on its batch (at batch size 1 the two are the same). f gets the batch rows idx still stepping,
    their states and their float32 times. Returns (y(t_end), NFE per sample (B,))."""
    B, dev = y0.shape[0], y0.device
    col = lambda s: s.view(-1, *[1] * (y0.dim() - 1))                # (n,) -> (n, 1, ..)
    rms = lambda x: x.double().pow(2).flatten(1).mean(1).sqrt()       # per-sample RMS norm (n,)
    idx, t = torch.arange(B, device=dev), torch.zeros(B, dtype=torch.float64, device=dev)
    # first step (torchdiffeq's _select_initial_step): h0 from |y0| / |f0|; |f'| from an Euler step
    f0 = f(idx, y0, t.float())
    scale = atol + rtol * y0.double().abs()
    d0, d1 = rms(y0 / scale), rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    d2 = rms((f(idx, y0 + col(h0).float() * f0, (t + h0).float()) - f0) / scale) / h0
    h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), (1e-3 * h0).clamp_min(1e-6),
                     (0.01 / torch.maximum(d1, d2)) ** (1 / 5))
    h = torch.minimum(100 * h0, h1)                                   # (B,) float64, as all times
    y, out, nfe = y0.clone(), torch.empty_like(y0), torch.full((B,), 2, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)                # not yet past t_end
    while live.any():
        i = live.nonzero().squeeze(1)                                 # only live samples step
        ti, hi, yi = t[i], h[i], y[i]
        assert (ti + hi > ti).all(), "dopri5: step size underflow (non-finite state?)"
        hf, k = col(hi.float()), yi.new_empty((*yi.shape, 7))          # k: the 7 stage slopes
        k[..., 0] = f0[i]
        te = (ti + hi).float()
        te = te.nextafter(te - 1)  # stages at the step's end see t 1 ulp below it, as torchdiffeq
        for s, (c, a) in enumerate(zip(DOPRI_C, DOPRI_A)):
            ys = yi + rk_sum(k, a, hf)
            k[..., s + 1] = f(i, ys, te if c == 1 else ti.float() + c * hi.float())
        y1 = ys                                                       # the last stage's input
        err = rk_sum(k, DOPRI_E, hf)
        ratio = rms(err / (atol + rtol * torch.maximum(yi.abs(), y1.abs()).double()))
        ok, t1 = ratio <= 1, ti + hi
        lo = torch.full_like(ratio, 0.2).masked_fill(ratio < 1, 1.0) # never shrink on success
        h[i] = hi * (0.9 / ratio ** (1 / 5)).maximum(lo).clamp(max=10.0)
        nfe[i] += 6
        fin = (ok & (t1 >= t_end)).nonzero().squeeze(1)               # past t_end: interpolate
        if len(fin):
            x = ((t_end - ti[fin]) / (t1[fin] - ti[fin])).float()
            out[i[fin]] = dopri5_dense(yi[fin], y1[fin], k[fin], hf[fin], col(x))
            live[i[fin]] = False
        acc = ok.nonzero().squeeze(1)
        y[i[acc]], f0[i[acc]], t[i[acc]] = y1[acc], k[acc][..., -1], t1[acc]
    return out, nfe


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
            raise ValueError(f"unknown sampler {method!r}: use euler, heun or dopri5")
    return z, nfe


def sample_noise(indices, seed, shape, device=None):
    """Starting noise for samples by global index: sample i is the same on 1 or 8 GPUs and at any
    batch size."""
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
# size presets: GE / decoder shapes. B = GE 12x768 (130.6M) + decoder 12x768 (86.2M); L and XL keep
# the B decoder.

PRESETS = {
    # tiny: a CPU preset for 32 px. The GE is narrow (64) because at an equal CPU budget the shape
    # accuracy of the samples follows the compute spent, not the width, and a narrow GE takes more
    # steps in the same time; the decoder stays at 128 (decoder 64 vs 128, one run each at about the
    # same CPU time: FD-shapes 182 vs 161; docs/experiments.md).
    "tiny": dict(image_size=32, patch_size=8, latent_dim=16, enc_depth=6, enc_width=64, enc_heads=2,
                 dec_depth=4, dec_width=128, dec_heads=2, dec_in_width=128, in_context_len=4,
                 in_context_start=2, flow_copies=2,
                 recon_weight=30.0),
    "micro": dict(image_size=32, patch_size=8, latent_dim=8, enc_depth=2, enc_width=64, enc_heads=2,
                  dec_depth=1, dec_width=64, dec_heads=2, dec_in_width=64, in_context_len=2,
                  in_context_start=1, flow_copies=2),  # tests
    "S": dict(enc_depth=12, enc_width=384, enc_heads=6, dec_depth=12, dec_width=384, dec_heads=6),
    "B": dict(enc_depth=12, enc_width=768, enc_heads=12, dec_depth=12, dec_width=768, dec_heads=12),
    "L": dict(enc_depth=24, enc_width=1024, enc_heads=16,
              dec_depth=12, dec_width=768, dec_heads=12),
    "XL": dict(enc_depth=28, enc_width=1152, enc_heads=16,
               dec_depth=12, dec_width=768, dec_heads=12),
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
