"""sendvae.py tests: the mapper and alignment loss (section 3.3), L_VAE (REPA-E's L1 + LPIPS + KL +
hinge PatchGAN), DDP == one process, exact resume, SIGTERM, --init / --disc-init file layouts, the
DINOv2 loader, the logistic probe, the offline errors, the two-stage path (train.py --tokenizer,
sample.py). Fast tests use a tiny image folder instead of the built-in shapes data.
Run: python -m pytest tests/test_sendvae.py -q"""
import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import perceptual
import sample
import sendvae
import train
from conftest import ROOT
from data import UserError
from model import generate, sample_latents, sample_noise
from vae import VAE_PRESETS, AutoencoderKL, VAEConfig

torch.set_num_threads(1)
TINY = VAEConfig(**VAE_PRESETS["tiny"])


def run(*args, env=None, timeout=300):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """64 random 32x32 images with a CelebA-style attribute file: 'Bright' (mean brightness above
    the median, a linear function of the pixels) and 'Noise' (random)."""
    d = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    imgs = (rng.random((64, 32, 32, 3)) * rng.random((64, 1, 1, 1)) * 255).astype(np.uint8)
    bright = imgs.mean((1, 2, 3)) > np.median(imgs.mean((1, 2, 3)))
    noise = rng.random(64) > 0.5
    lines = ["64", "Bright Noise"]
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(d / f"{i:06d}.png")
        lines.append(f"{i:06d}.png {1 if bright[i] else -1} {1 if noise[i] else -1}")
    (d / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return str(d)


def fast(folder, out, *extra):
    """A few steps of the tiny VAE on the folder, fp32, a random-ViT VFM, small evaluation."""
    return ["--data", folder, "--vfm", "random-vit", "--batch-size", "8", "--num-workers", "0",
            "--eval-images", "16", "--probe-data", folder, "--probe-train", "40",
            "--probe-test", "24", "--precision", "fp32", "--log-every", "1", "--out-dir", str(out),
            *extra]


@pytest.fixture(scope="module")
def vae_ckpt(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("sendvae")
    sendvae.main(fast(folder, out, "--max-steps", "3"))
    return os.path.join(out, "ckpt.pt")


def logged(out):
    """Every number of every 'step' line of log.txt except the img/s (timing)."""
    rows = [l for l in open(os.path.join(out, "log.txt")) if l.startswith("step ")]
    return [[float(v) for v in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", l.rsplit(" | ", 1)[0])]
            for l in rows]


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)


def same_run(a, b, atol=1e-5):
    la, lb = logged(a), logged(b)
    # other splits of the batch sum floats in another order: a printed figure may differ in its
    # last digit; a wrong averaging (sum instead of mean, a rank that did not learn) is far outside
    assert len(la) >= 2 and np.allclose(la, lb, rtol=1e-4, atol=2e-4), (la, lb)
    ca, cb = ckpt(a), ckpt(b)
    for part in ("vae", "mapper", "disc"):
        for k, v in (ca[part] or {}).items():
            if part == "disc" and k.endswith(("running_mean", "running_var", "batches_tracked")):
                continue  # D's BN running stats: unused (always in train mode), rank 0's under DDP
            assert torch.allclose(v.float(), cb[part][k].float(), atol=atol), (part, k)


# ----------------------------------------------------------------------------- mapper and alignment

def test_mapper_output_is_the_vfm_token_grid():
    # tiny: 4x4 latent -> 4x4 VFM grid; f8-like: 32x32 latent -> 16x16 (patch 2); coarser: upsampled
    for c, lat, dim, g, depth in [(16, 4, 64, 4, 1), (4, 32, 64, 16, 2), (16, 4, 64, 16, 0)]:
        m = sendvae.Mapper(c, lat, dim, g, depth, proj_dim=32)
        assert m(torch.randn(2, c, lat, lat)).shape == (2, g * g, dim)
        assert len(m.blocks) == depth and all(b.heads == 1 for b in m.blocks)  # 64-d: 64 per head
    m = sendvae.Mapper(32, 16, 768, 16, 1, proj_dim=2048)  # f16d32 + DINOv2-B: 12 heads
    assert m.blocks[0].heads == 12 and m.patch_embed.kernel_size == (1, 1)


def test_mapper_bn_uses_running_stats_updated_from_the_global_batch():
    """update_bn from summed moments == nn.BatchNorm2d's own training-mode update on the same batch,
    whatever the split; the forward always normalises with the running statistics."""
    m = sendvae.Mapper(4, 4, 64, 4, 0, proj_dim=8).train()
    assert not m.bn.training
    ref = torch.nn.BatchNorm2d(4, affine=False, eps=1e-4, momentum=0.1).train()
    z = torch.randn(12, 4, 4, 4) * 3 + 1
    ref(z)
    parts = [sendvae.latent_moments(z[i:i + 4]) for i in range(0, 12, 4)]  # 3 micro-batches
    m.update_bn(sum(p[0] for p in parts), sum(p[1] for p in parts))
    assert torch.allclose(m.bn.running_mean, ref.running_mean, atol=1e-5)
    assert torch.allclose(m.bn.running_var, ref.running_var, atol=1e-4)
    x = torch.randn(2, 4, 4, 4)
    mu, var = m.bn.running_mean[:, None, None], m.bn.running_var[:, None, None]
    expect = (x - mu) / (var + 1e-4).sqrt()
    assert torch.allclose(m.bn(x), expect, atol=1e-5)
    m.update_bn(*sendvae.latent_moments(z), first=True)  # step 0: the batch's statistics as is
    assert torch.allclose(m.bn.running_mean, z.mean((0, 2, 3)), atol=1e-5)
    mb = sendvae.Mapper(4, 4, 64, 4, 0, proj_dim=8, batch_stats=True).train()  # --bn-stats batch
    assert mb.bn.training and mb.bn(z).mean((0, 2, 3)).abs().max() < 1e-4
    assert not mb.eval().bn.training


def test_noise_mix_endpoints():
    z, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(sendvae.noise_mix(z, torch.ones(3), eps), z)
    assert torch.equal(sendvae.noise_mix(z, torch.zeros(3), eps), eps)
    mixed = sendvae.noise_mix(z, torch.tensor([1.0, 0.0, 0.25]), eps)  # alpha is per sample
    assert torch.equal(mixed[0], z[0]) and torch.equal(mixed[1], eps[1])
    assert torch.allclose(mixed[2], 0.25 * z[2] + 0.75 * eps[2])


def test_step_noise_is_keyed_per_global_row():
    a = sendvae.step_noise((4, 2, 2), 0, 5, range(0, 8), "cpu")
    b = sendvae.step_noise((4, 2, 2), 0, 5, range(4, 8), "cpu")
    for k in a:
        assert torch.equal(a[k][4:], b[k])  # a rank drawing rows 4..7 gets what one process does
    c = sendvae.step_noise((4, 2, 2), 0, 6, range(0, 8), "cpu", align_noise=False)
    assert not torch.equal(a["post"], c["post"]) and torch.equal(c["alpha"], torch.ones(8))


def test_alignment_loss_zero_for_equal_two_for_opposite():
    f = torch.randn(2, 16, 8)
    assert sendvae.align_loss(f, f).abs() < 1e-6
    assert sendvae.align_loss(3 * f, f).abs() < 1e-6  # cosine: scale-free
    assert (sendvae.align_loss(-f, f) - 2).abs() < 1e-6


def test_gradients_reach_the_vae_encoder_not_the_vfm_nor_the_decoder():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY)
    vfm = sendvae.load_vfm("random-vit", 32)
    mapper = sendvae.Mapper(16, 4, vfm.dim, vfm.grid, 1, proj_dim=32)
    x = torch.rand(4, 3, 32, 32)
    mean, logvar = vae.encode(x)
    z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
    loss, _ = sendvae.alignment(mapper, z, vfm(x), torch.rand(4), torch.randn_like(z))
    loss.backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.decoder.parameters())  # decoder: L_VAE only
    assert all(p.grad is None and not p.requires_grad for p in vfm.parameters())
    assert all(p.grad is not None for p in mapper.parameters())
    # alpha = 0: z_t is pure noise, nothing reaches the encoder (the gradient is scaled by alpha)
    vae.zero_grad()
    mean, _ = vae.encode(x)
    sendvae.alignment(mapper, mean, vfm(x), torch.zeros(4), torch.randn_like(mean))[0].backward()
    assert vae.encoder.conv_in.weight.grad.abs().max() < 1e-6


# ----------------------------------------------------------------------------- L_VAE: LPIPS, GAN

def test_hinge_loss_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # 0.5 (mean relu(1 - real) + mean relu(1 + fake)) = 0.5 ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    assert sendvae.hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    assert sendvae.hinge_d_loss(torch.full((5,), 3.0), torch.full((5,), -3.0)).item() == 0.0


def test_discriminator_is_repa_e_patchgan():
    d = sendvae.NLayerDiscriminator()
    names = [k for k in d.state_dict() if k.endswith("weight")]
    # taming's indices: conv 0, conv 2 + BN 3, conv 5 + BN 6, conv 8 + BN 9, conv 11
    assert names == [f"main.{i}.weight" for i in (0, 2, 3, 5, 6, 8, 9, 11)]
    # conv 3->64 (+bias), 64->128, 128->256, 256->512 (no bias, BN after), 512->1 (+bias); 4x4
    n = 16 * (3 * 64 + 64 * 128 + 128 * 256 + 256 * 512 + 512) + 64 + 1 + 2 * (128 + 256 + 512)
    assert sum(p.numel() for p in d.parameters()) == n == 2_765_633
    assert d(torch.rand(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert "main.2.bias" not in d.state_dict()


def test_vae_loss_terms_and_where_gan_and_lpips_gradients_go():
    torch.manual_seed(0)
    vae, lp, disc = AutoencoderKL(TINY), perceptual.LPIPS(), sendvae.NLayerDiscriminator()
    x = torch.rand(4, 3, 32, 32)
    mean, logvar = vae.encode(x)
    recon = vae.decode(mean + (0.5 * logvar).exp() * torch.randn_like(mean))
    args = argparse.Namespace(lpips_weight=1.0, kl_weight=1e-6, gan_weight=0.1)
    loss, st = sendvae.vae_loss(x, recon, mean, logvar, args, lp, disc)
    assert loss.item() == pytest.approx((st["l1"] + st["lpips"] + 1e-6 * st["kl"]
                                         + 0.1 * st["gan"]).item(), rel=1e-6)
    assert st["l1"].item() == pytest.approx((2 * recon - 2 * x).abs().mean().item(), rel=1e-6)
    with torch.no_grad():  # LPIPS on the [-1, 1] images, as REPA-E after its PR #17
        ref = lp(2 * x - 1, 2 * recon - 1).mean().item()
        assert st["lpips"].item() == pytest.approx(ref, rel=1e-5)
        assert st["gan"].item() == pytest.approx(-disc(2 * recon - 1).mean().item(), rel=1e-5)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
    assert st["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    # each term alone reaches the decoder; the generator's GAN term leaves D without gradient
    dec = vae.decoder.conv_out.weight
    for w in (dict(lpips_weight=1.0, gan_weight=0.0), dict(lpips_weight=0.0, gan_weight=0.1)):
        a = argparse.Namespace(kl_weight=0.0, **w)
        l_on, _ = sendvae.vae_loss(x, recon, mean, logvar, a, lp, disc)
        l_off, _ = sendvae.vae_loss(x, recon, mean, logvar, argparse.Namespace(
            kl_weight=0.0, lpips_weight=0.0, gan_weight=0.0), lp, disc)
        g, = torch.autograd.grad(l_on - l_off, dec, retain_graph=True)
        assert g.abs().sum() > 0, w
    loss.backward(retain_graph=True)
    assert all(p.grad is None and p.requires_grad for p in disc.parameters())
    assert all(p.grad is None for p in lp.parameters())
    # D's own step: gradient to D only (x_hat detached)
    vae.zero_grad()
    d_loss, real, fake = sendvae.disc_loss(disc, x, recon)
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters()) and dec.grad is None


def test_lpips_and_gan_flags_switch_terms_in_a_run(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(sendvae, "load_lpips", lambda dev: perceptual.LPIPS().to(dev))  # random VGG
    sendvae.main(fast(folder, tmp_path, "--max-steps", "2", "--lpips-weight", "1", "--gan-weight",
                      "0.1", "--kl-weight", "0", "--probe-data", "", "--eval-images", "8"))
    text = open(tmp_path / "log.txt").read()
    assert "loss: L1 + LPIPS + GAN + align" in text and "| d " in text
    row = logged(tmp_path)[-1]
    assert row[3] > 0  # lpips column
    assert ckpt(tmp_path)["disc"] is not None and ckpt(tmp_path)["disc_optimizer"] is not None


# ----------------------------------------------------------------------------- DDP, resume, SIGTERM

def test_ddp_two_processes_equal_one_with_the_gan(folder, tmp_path):
    """torchrun 2 x micro-batch 4 (gloo) == 1 process, micro-batch 4 x accum 2, GAN on (its BN uses
    per-micro-batch statistics, as REPA-E per GPU)."""
    a, b = tmp_path / "one", tmp_path / "ddp"
    flags = ["--max-steps", "3", "--micro-batch", "4", "--gan-weight", "0.1", "--warmup-steps", "1"]
    sendvae.main(fast(folder, a, *flags))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=29533", "sendvae.py", *fast(folder, b, *flags),
                        "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "world 2" in r.stdout and "batch 8 = 4 x 1 accum x 2" in r.stdout
    assert "batch 8 = 4 x 2 accum x 1" in open(a / "log.txt").read()
    same_run(a, b)
    assert ckpt(b)["results"]["world"] == 2


def test_ddp_default_split_equals_one_process(folder, tmp_path):
    """The default split: torchrun 2 x 4 (micro-batch = batch / processes) == one process with the
    whole batch of 8 at once (no GAN: nothing depends on how the batch is split)."""
    a, b = tmp_path / "one", tmp_path / "ddp"
    sendvae.main(fast(folder, a, "--max-steps", "3", "--warmup-steps", "1"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=29534", "sendvae.py",
                        *fast(folder, b, "--max-steps", "3", "--warmup-steps", "1"),
                        "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batch 8 = 4 x 1 accum x 2" in r.stdout
    assert "batch 8 = 8 x 1 accum x 1" in open(a / "log.txt").read()
    same_run(a, b)


def test_accumulation_equals_one_batch(folder, tmp_path):
    """Without the GAN the split does not matter at all: micro-batch 8 == 4 x accum 2 (the mapper's
    BN statistics come from the whole global batch)."""
    a, b = tmp_path / "a", tmp_path / "b"
    sendvae.main(fast(folder, a, "--max-steps", "3", "--warmup-steps", "1"))
    sendvae.main(fast(folder, b, "--max-steps", "3", "--warmup-steps", "1", "--micro-batch", "2"))
    same_run(a, b)


def test_resume_is_exact(folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--gan-weight", "0.1", "--probe-data", "", "--eval-images", "8"]
    sendvae.main(fast(folder, a, "--max-steps", "4", *flags))
    sendvae.main(fast(folder, b, "--max-steps", "2", *flags))
    sendvae.main(fast(folder, b, "--max-steps", "4", "--resume", "auto", *flags))
    ca, cb = ckpt(a), ckpt(b)
    assert ca["step"] == cb["step"] == 4 and "resumed from" in open(b / "log.txt").read()
    for part in ("vae", "mapper", "disc"):
        for k, v in ca[part].items():
            assert torch.equal(v, cb[part][k]), (part, k)  # 2 + resume + 2 == 4, bit for bit
    with pytest.raises(UserError, match="file not found"):
        sendvae.main(fast(folder, b, "--resume", str(tmp_path / "nope.pt")))


def test_sigterm_saves_and_exits_cleanly(folder, tmp_path):
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "sendvae.py",
                          *fast(folder, out, "--max-steps", "100000")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.txt").exists()
                                          and "step 2 " in open(out / "log.txt").read()):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "SIGTERM: saved" in stdout and ckpt(out)["step"] >= 2


# ----------------------------------------------------------------------------- starting points

def vae_and_disc_weights(seed=1):
    torch.manual_seed(seed)
    return AutoencoderKL(TINY).state_dict(), sendvae.NLayerDiscriminator().state_dict()


@pytest.mark.parametrize("layout", ["ldm", "vavae", "repae_file", "repae_ckpt"])
def test_init_reads_ldm_vavae_and_repae_files(tmp_path, layout):
    sd, dsd = vae_and_disc_weights()
    t = torch.ones(3)
    ck = {"ldm": {"state_dict": {**sd, **{"loss.discriminator." + k: v for k, v in dsd.items()},
                                 "loss.logvar": t}, "epoch": 7, "global_step": 9},
          "vavae": {"state_dict": {**sd, **{"loss.discriminator." + k: v for k, v in dsd.items()},
                                   "foundation_model.model.w": t, "linear_proj.weight": t}},
          "repae_file": sd,
          "repae_ckpt": {"vae": sd, "discriminator": dsd, "ema": {"bn.running_mean": t},
                         "args": argparse.Namespace(vae="f16d32"), "steps": 5}}[layout]
    torch.save(ck, tmp_path / "f.pt")
    vae, cfg, what = sendvae.load_init(str(tmp_path / "f.pt"), TINY)
    assert cfg == TINY and what != "sendvae.py"
    for k, v in vae.state_dict().items():
        assert torch.equal(v, sd[k]), k
    if layout != "repae_file":  # the discriminator from the same file
        disc = sendvae.NLayerDiscriminator()
        sendvae.load_disc(str(tmp_path / "f.pt"), disc)
        assert all(torch.equal(v, dsd[k]) for k, v in disc.state_dict().items())


def test_init_and_disc_init_in_a_run_and_our_own_checkpoint(folder, tmp_path, vae_ckpt):
    sd, dsd = vae_and_disc_weights()
    torch.save(sd, tmp_path / "vae.pt")
    torch.save(dsd, tmp_path / "vae-discriminator-ckpt.pt")
    out = tmp_path / "run"
    sendvae.main(fast(folder, out, "--max-steps", "1", "--init", str(tmp_path / "vae.pt"),
                      "--disc-init", str(tmp_path / "vae-discriminator-ckpt.pt"),
                      "--gan-weight", "0.1", "--lr", "1e-9"))
    assert "bare state dict" in open(out / "log.txt").read()
    assert all(torch.allclose(v, sd[k], atol=1e-6) for k, v in ckpt(out)["vae"].items())
    sendvae.main(fast(folder, tmp_path / "own", "--max-steps", "1", "--init", vae_ckpt))  # ours


def test_wrong_init_file_is_one_line(folder, tmp_path):
    sd, _ = vae_and_disc_weights()
    torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(1)}}, tmp_path / "unet.pt")
    torch.save(sd, tmp_path / "tiny.pt")
    torch.save({"main.0.weight": torch.ones(1)}, tmp_path / "d.pt")
    for flags, msg in [(["--init", str(tmp_path / "unet.pt")],
                        "no AutoencoderKL weight 'encoder.conv_in.weight'"),
                       (["--preset", "f8d4", "--init", str(tmp_path / "tiny.pt")],
                        "the file matches --preset tiny"),
                       (["--init", str(tmp_path / "nope.pt")], "file not found"),
                       (["--gan-weight", "0.1", "--disc-init", str(tmp_path / "d.pt")],
                        "not a 3-layer ndf-64 PatchGAN")]:
        r = run("sendvae.py", "--data", folder, "--vfm", "random-vit", "--max-steps", "1", *flags)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and msg in lines[0], r.stderr


# ----------------------------------------------------------------------------- DINOv2

def official_state_dict(D=32, depth=2, patch=14, grid=37):
    """Random tensors under the official dinov2_vit*14_pretrain.pth key names and shapes."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + grid * grid, D), "mask_token": r(1, D),
          "patch_embed.proj.weight": r(D, 3, patch, patch), "patch_embed.proj.bias": r(D),
          "norm.weight": 1 + r(D), "norm.bias": r(D)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
                   b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
                   b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "ls1.gamma": r(D), b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
                   b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
                   b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D),
                   b + "ls2.gamma": r(D)})
    return sd


def official_interpolate_pos_encoding(pos_embed, w, h, patch_size=14):
    """Transcribed from facebookresearch/dinov2 vision_transformer.py (interpolate_offset 0.1)."""
    N = pos_embed.shape[1] - 1
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size + 0.1, h // patch_size + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(float(w0 / math.sqrt(N)), float(h0 / math.sqrt(N))), mode="bicubic")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def test_dinov2_loads_the_official_state_dict_and_gives_256_tokens(tmp_path):
    sd = official_state_dict()
    path = str(tmp_path / "dinov2_vitb14_pretrain.pth")
    torch.save(sd, path)
    net = sendvae.DINOv2("vitb14", weights_path=path)
    assert torch.equal(net.blocks[1].ls2.gamma, sd["blocks.1.ls2.gamma"])
    assert net.blocks[0].heads == 1
    assert not any(p.requires_grad for p in net.parameters())
    x = sendvae.dinov2_input(torch.rand(2, 3, 32, 32))
    assert x.shape == (2, 3, 224, 224)
    out = net(x)
    assert out.shape == (2, 256, 32) and torch.isfinite(out).all()
    # last-layer LayerNorm-ed tokens: per token, (out - bias) / weight has zero mean, unit variance
    u = (out - sd["norm.bias"]) / sd["norm.weight"]
    assert u.mean(-1).abs().max() < 1e-4 and (u.std(-1, unbiased=False) - 1).abs().max() < 1e-2
    assert torch.allclose(net.interpolate_pos_encoding(16, 16),
                          official_interpolate_pos_encoding(sd["pos_embed"], 224, 224))
    assert torch.equal(net.interpolate_pos_encoding(37, 37), net.pos_embed)  # 518 px: as is
    del sd["blocks.0.ls1.gamma"]
    torch.save(sd, path)
    with pytest.raises(UserError, match="ls1.gamma"):
        sendvae.DINOv2("vitb14", weights_path=path)


def test_default_vfm_offline_is_one_line_error(tmp_path):
    env = {"MINUNITE_CACHE": str(tmp_path)}
    for args in (["--vfm", "dinov2_vitb14"], ["--preset", "f16d32", "--data", str(tmp_path)]):
        r = run("sendvae.py", *args, env=env)
        assert r.returncode != 0 and r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: DINOv2 weights not found"), r.stderr
        assert "dinov2_vitb14_pretrain.pth" in lines[0]
        assert "https://dl.fbaipublicfiles.com/dinov2/" in lines[0]


def test_help_shows_the_defaults():
    r = run("sendvae.py", "--help")
    assert r.returncode == 0
    for s in ("tiny: 32; f16d32 / f8d4: 1024", "f16d32 / f8d4: 0.0003", "f16d32 / f8d4: 80.0",
              "f16d32 / f8d4: 32", "tiny: shapesvit", "default 1e-06", "default 0.0001"):
        assert s in r.stdout, s


# ----------------------------------------------------------------------------- probe

def test_logistic_probe_separates_a_separable_set_perfectly():
    g = torch.Generator().manual_seed(0)
    y2, y3 = torch.randint(0, 2, (600,), generator=g), torch.randint(0, 3, (600,), generator=g)
    x = torch.randn(600, 20, generator=g)
    x[:, 0] += 8 * y2 - 4                      # two well-separated blobs along feature 0
    x[:, 1] += 8 * (y3 == 1) - 8 * (y3 == 2)   # three along feature 1
    labels = {"two": y2, "three": y3}
    f1, lams, held = sendvae.linear_probe(x[:400], {k: v[:400] for k, v in labels.items()},
                                          x[400:], {k: v[400:] for k, v in labels.items()})
    assert f1 == {"two": 1.0, "three": 1.0}
    assert set(lams) == {"two", "three"} and all(lam in sendvae.PROBE_L2 for lam in lams.values())


def test_probe_chooses_l2_on_held_out_training_rows(monkeypatch):
    """Every candidate L2 is fit on 80% of the training split and scored on the other 20%; the best
    held-out F1 per attribute wins (ties: the stronger L2); the final fit uses all training rows."""
    fits, fit = [], sendvae.fit_logistic
    monkeypatch.setattr(sendvae, "fit_logistic", lambda X, Y, s, lam, **k: fits.append(
        (len(X), list(lam))) or fit(X, Y, s, lam, **k))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 40, generator=g)
    labels = {"a": (x[:, 0] + torch.randn(100, generator=g) > 0).long(),
              "b": torch.randint(0, 3, (100,), generator=g)}
    xt = torch.randn(50, 40, generator=g)
    lt = {"a": torch.randint(0, 2, (50,)), "b": torch.randint(0, 3, (50,))}
    f1, lams, held = sendvae.linear_probe(x, labels, xt, lt)
    assert [n for n, _ in fits] == [80] * len(sendvae.PROBE_L2) + [100]
    assert [lam[0] for _, lam in fits[:-1]] == list(sendvae.PROBE_L2)
    for j, k in enumerate(labels):
        assert lams[k] == max(sendvae.PROBE_L2, key=lambda lam: (held[lam][j], lam))
    assert fits[-1][1] == [lams["a"], lams["b"]]


def test_probe_recovers_a_planted_linear_attribute():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 64, generator=g)
    w, W3 = torch.randn(64, generator=g), torch.randn(64, 3, generator=g)
    labels = {"planted": (x @ w > 0).long(), "three": (x @ W3).argmax(1),
              "random": torch.randint(0, 2, (3000,), generator=g)}
    f1, _, _ = sendvae.linear_probe(x[:2000], {k: v[:2000] for k, v in labels.items()},
                                    x[2000:], {k: v[2000:] for k, v in labels.items()})
    assert f1["planted"] > 0.95 and f1["three"] > 0.9
    assert 0.3 < f1["random"] < 0.65  # chance: the positive-class F1 of a coin flip is ~0.5


def test_f1_score_definitions():
    pred, true = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0])
    assert sendvae.f1_score(pred, true, 2) == pytest.approx(2 / 3)  # binary: positive class
    assert sendvae.f1_score(pred, true, 3) == pytest.approx((0.8 + 2 / 3) / 2)  # macro over values


def test_celeba_official_partition_is_used(folder, tmp_path):
    import shutil
    d = tmp_path / "celeba"
    shutil.copytree(folder, d)
    (d / "list_eval_partition.txt").write_text(
        "".join(f"{i:06d}.png {0 if i % 2 else 2}\n" for i in range(64)))  # odd: train, even: test
    (tr, _), (te, _), how = sendvae.celeba_probe_data(str(d), 32, 10, 5)
    assert "official" in how and len(tr) == 10 and len(te) == 5
    first_train = np.array(Image.open(d / "000001.png"))
    assert torch.equal(tr[0], torch.from_numpy(first_train).permute(2, 0, 1))


# ----------------------------------------------------------------------------- CLI, two-stage

def test_cli_run_checkpoint_and_probe(vae_ckpt, folder):
    ck = torch.load(vae_ckpt, map_location="cpu", weights_only=True)
    assert ck["vfm_stand_in"] is True and ck["vfm"].startswith("STAND-IN random-vit")
    assert ck["vae_config"]["z_channels"] == 16 and ck["step"] == 3 and ck["disc"] is None
    res = ck["results"]
    assert 0 < res["psnr"] < 60 and -1 <= res["align_cos"] <= 1
    assert set(res["probe_f1"]) == {"Bright", "Noise"} and "held-out 20%" in res["probe_split"]
    # the command line: --probe on the checkpoint, last stdout line = JSON
    r = run("sendvae.py", "--probe", vae_ckpt, "--probe-data", folder, "--probe-train", "40",
            "--probe-test", "24")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["probe_f1"] == res["probe_f1"]  # deterministic: posterior means, L-BFGS from zero
    assert "F1 on 24 other images" in r.stdout
    r = run("sendvae.py", "--probe", os.path.join(folder, "000000.png"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "not a checkpoint" in r.stderr


def test_probe_reads_a_unite_checkpoint(folder, tmp_path, capsys):
    """--probe also scores a one-stage UNITE checkpoint's tokenizer latents (bench.py probes
    both)."""
    from dataclasses import asdict
    from model import UNITE, make_config
    torch.manual_seed(0)
    m = UNITE(make_config("micro", num_classes=3))
    for p in m.parameters():  # a "trained" GE: adaLN-Zero init would make every latent the same
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    torch.save({"config": asdict(m.cfg), "ema": m.state_dict()}, tmp_path / "u.pt")
    sendvae.main(["--probe", str(tmp_path / "u.pt"), "--probe-data", folder, "--probe-train", "40",
                  "--probe-test", "24", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "UNITE Generative Encoder" in out
    f1 = json.loads(out.strip().splitlines()[-1])["probe_f1"]
    assert f1["Bright"] > 0.75  # brightness is linear in the pixels: random GE features keep it


def test_cli_end_to_end_subprocess(folder, tmp_path):
    r = run("sendvae.py", *fast(folder, tmp_path, "--max-steps", "100000", "--time-budget", "1",
                                "--mapper-depth", "0", "--no-align-noise", "--align-weight", "0",
                                "--bn-stats", "batch"))
    assert r.returncode == 0, r.stderr
    assert "STAND-IN" in r.stdout and "PSNR" in r.stdout and "loss: L1 + KL |" in r.stdout
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["align_weight"] == 0 and res["mapper_depth"] == 0 and res["align_noise"] is False
    assert 0 < res["steps"] < 100000 and res["cpu_s"] >= 1  # --time-budget ended the loop
    assert os.path.isfile(tmp_path / "recon.png")


def test_two_stage_stores_latent_stats_and_samples_through_the_vae(vae_ckpt, folder, tmp_path):
    out = str(tmp_path / "sit")
    train.main(["--tokenizer", vae_ckpt, "--model", "micro", "--data", folder, "--batch-size", "8",
                "--max-steps", "2", "--eval-samples", "0", "--sample-every", "-1",
                "--log-every", "1",
                "--latent-stats-images", "32", "--precision", "fp32", "--num-workers", "0",
                "--out-dir", out])
    ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ck["config"]["latent_dim"] == 16 and ck["config"]["patch_size"] == 8  # 4x4x16 latent
    assert ck["vae_config"]["z_channels"] == 16 and ck["tokenizer"] == vae_ckpt
    # the stats: per channel over the posterior means of 32 images drawn with the seed (train.py),
    # stored in the checkpoint
    vae, _ = sendvae.load_vae(vae_ckpt)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:32].tolist()
    imgs = torch.stack([train.get_dataset(folder, 32)[i][0] for i in idx])
    with torch.no_grad():
        z = vae.encode(imgs)[0]
    assert torch.allclose(ck["ema"]["decoder.latent_mean"], z.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(ck["ema"]["decoder.latent_std"], z.std((0, 2, 3)), atol=1e-5)
    assert not any(k.startswith("encoder.patch_embed") for k in ck["ema"])  # denoise-only
    for k, v in vae.state_dict().items():  # the VAE is frozen: unchanged by training
        assert torch.equal(ck["model"]["decoder.vae." + k], v), k
    # sample.py rebuilds the two-stage model from this one file and decodes with the stored stats
    m, _ = sample.load_model(os.path.join(out, "ckpt.pt"), "cpu")
    x, nfe = generate(m, [0, 1], 1, seed=0, steps=2, method="euler")
    zs, _ = sample_latents(m.denoiser, sample_noise([0, 1], 0, (16, 16)), torch.tensor([0, 0]),
                           steps=2, method="euler", shift=m.cfg.time_shift)
    lat = (zs * ck["ema"]["decoder.latent_std"] + ck["ema"]["decoder.latent_mean"]) \
        .transpose(1, 2).reshape(2, 16, 4, 4)
    with torch.no_grad():
        assert torch.allclose(x, vae.decode(lat).clamp(0, 1), atol=1e-5)
    r = run("sample.py", os.path.join(out, "ckpt.pt"), "--steps", "2", "--num-samples", "4")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "ckpt_samples.png"))


@pytest.mark.slow
def test_default_cli_on_shapes_with_the_vit_standin(tmp_path):
    """The default command's path (built-in shapes, the ShapesViT stand-in, shapes probe), 20 steps
    (~1.5 min; ~2.5 min more the first time, to train and cache the stand-in)."""
    r = run("sendvae.py", "--max-steps", "20", "--out-dir", str(tmp_path), "--eval-images", "200",
            "--probe-train", "500", "--probe-test", "300", timeout=900)
    assert r.returncode == 0, r.stderr
    assert "STAND-IN shapesvit" in r.stdout and "not fid.py's ShapesNet" in r.stdout
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["vfm"] == "shapesvit" and res["loss_terms"] == ["L1", "KL", "align"]
    assert set(res["probe_f1"]) == {"shape", "color", "background", "size", "x", "y", "rotation"}
    ck = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["vfm_stand_in"] is True and ck["vfm"].startswith("STAND-IN shapesvit")
