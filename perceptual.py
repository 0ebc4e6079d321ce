"""
LPIPS (Zhang et al. 2018, v0.1, VGG16 trunk): the perceptual half of the released UNITE
reconstruction loss, L_recon = L1 + 1.0 * LPIPS (configs/imagenet.yaml perceptual_weight), and of
Send-VAE's L_VAE. Same maths as the `lpips` package and UNITE's
modules/autoencoding_utils/lpips.py. Module names follow torchvision (features.N), so its vgg16
file loads key for key; the heads load from the published file (linK.model.1.weight).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UserError, cache_dir, download

# the two weight files: (url, sha256, file name in cache_dir())
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
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:
        raise UserError(f"{path}: not a torch state dict ({type(e).__name__})") from None
    for k, shape in keys.items():
        if k not in sd:
            raise UserError(f"{path}: missing key {k!r}")
        if tuple(sd[k].shape) != tuple(shape):
            raise UserError(f"{path}: {k!r} has shape {tuple(sd[k].shape)}, "
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
    """LPIPS with the published weights, downloaded once into cache_dir() (sha256-checked).
    A missing file offline: one UserError line saying where to put each missing file."""
    paths, errors = [], []
    for url, sha256, name in LPIPS_FILES.values():
        try:
            paths.append(download(url, os.path.join(cache_dir(), name), "sha256", sha256))
        except UserError as e:
            errors.append(str(e))
    if errors:
        raise UserError("LPIPS weights: " + "; ".join(errors))
    return LPIPS(*paths).to(device)
