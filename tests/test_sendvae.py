"""sendvae.py tests: the mapper and alignment loss (section 3.3), the DINOv2 loader, the probe, the offline error,
the two-stage path (train.py --tokenizer, sample.py). Fast tests use a tiny image folder instead of the built-in
shapes data (generating 30k shapes images takes ~25 s). Run: python -m pytest tests/test_sendvae.py -q"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
import sendvae
import train
from conftest import ROOT
from data import DataError
from model import VAE_PRESETS, AutoencoderKL, VAEConfig, generate, sample_latents, sample_noise

torch.set_num_threads(1)


def run(*args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=e)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """64 random 32x32 images with a CelebA-style attribute file: 'Bright' (mean brightness above the median,
    a linear function of the pixels) and 'Noise' (random)."""
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


@pytest.fixture(scope="module")
def vae_ckpt(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sendvae"))
    sendvae.main(["--data", folder, "--vfm", "random-vit", "--max-steps", "3", "--batch-size", "8", "--out-dir", out, "--num-workers", "0",
                  "--eval-images", "16", "--probe-data", folder, "--probe-train", "40", "--probe-test", "24"])
    return os.path.join(out, "ckpt.pt")


# ----------------------------------------------------------------------------- mapper and alignment

def test_mapper_output_is_the_vfm_token_grid():
    # tiny: 4x4 latent -> 4x4 VFM grid; f8-like: 32x32 latent -> 16x16 grid (patch 2); coarser latent: upsampled
    for c, lat, dim, g, depth in [(16, 4, 64, 4, 1), (4, 32, 64, 16, 2), (16, 4, 64, 16, 0)]:
        m = sendvae.Mapper(c, lat, dim, g, depth, proj_dim=32)
        assert m(torch.randn(2, c, lat, lat)).shape == (2, g * g, dim)
        assert len(m.blocks) == depth and all(b.heads == 1 for b in m.blocks)  # 64-d: 64 per head
    m = sendvae.Mapper(32, 16, 768, 16, 1, proj_dim=2048)  # f16d32 + DINOv2-B: 12 heads, as the paper
    assert m.blocks[0].heads == 12 and m.patch_embed.kernel_size == (1, 1)


def test_noise_mix_endpoints():
    z, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(sendvae.noise_mix(z, torch.ones(3), eps), z)
    assert torch.equal(sendvae.noise_mix(z, torch.zeros(3), eps), eps)
    mixed = sendvae.noise_mix(z, torch.tensor([1.0, 0.0, 0.25]), eps)  # alpha is per sample
    assert torch.equal(mixed[0], z[0]) and torch.equal(mixed[1], eps[1])
    assert torch.allclose(mixed[2], 0.25 * z[2] + 0.75 * eps[2])


def test_alignment_loss_zero_for_equal_two_for_opposite():
    f = torch.randn(2, 16, 8)
    assert sendvae.align_loss(f, f).abs() < 1e-6
    assert sendvae.align_loss(3 * f, f).abs() < 1e-6  # cosine: scale-free
    assert (sendvae.align_loss(-f, f) - 2).abs() < 1e-6


def test_gradients_reach_the_vae_encoder_not_the_vfm_nor_the_decoder():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(**VAE_PRESETS["tiny"]))
    vfm = sendvae.load_vfm("random-vit", 32)
    mapper = sendvae.Mapper(16, 4, vfm.dim, vfm.grid, 1, proj_dim=32)
    x = torch.rand(4, 3, 32, 32)
    mean, logvar = vae.encode(x)
    z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
    loss, _ = sendvae.alignment(mapper, z, vfm(x), torch.rand(4), torch.randn_like(z))
    loss.backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.decoder.parameters())  # the decoder only learns from L1 + KL
    assert all(p.grad is None and not p.requires_grad for p in vfm.parameters())
    assert all(p.grad is not None for p in mapper.parameters())
    # alpha = 0: z_t is pure noise, nothing reaches the encoder (the gradient is scaled by alpha)
    vae.zero_grad()
    mean, _ = vae.encode(x)
    sendvae.alignment(mapper, mean, vfm(x), torch.zeros(4), torch.randn_like(mean))[0].backward()
    assert vae.encoder.conv_in.weight.grad.abs().max() < 1e-6


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
        sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                   b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "ls1.gamma": r(D), b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
                   b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D), b + "mlp.fc2.weight": r(D, 4 * D),
                   b + "mlp.fc2.bias": r(D), b + "ls2.gamma": r(D)})
    return sd


def official_interpolate_pos_encoding(pos_embed, w, h, patch_size=14):
    """Transcribed from facebookresearch/dinov2 vision_transformer.py (interpolate_offset 0.1, no antialias)."""
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
    assert torch.equal(net.blocks[1].ls2.gamma, sd["blocks.1.ls2.gamma"]) and net.blocks[0].heads == 1
    assert not any(p.requires_grad for p in net.parameters())
    x = sendvae.dinov2_input(torch.rand(2, 3, 32, 32))
    assert x.shape == (2, 3, 224, 224)
    out = net(x)
    assert out.shape == (2, 256, 32) and torch.isfinite(out).all()
    # last-layer LayerNorm-ed tokens: per token, (out - bias) / weight has zero mean and unit variance
    u = (out - sd["norm.bias"]) / sd["norm.weight"]
    assert u.mean(-1).abs().max() < 1e-4 and (u.std(-1, unbiased=False) - 1).abs().max() < 1e-2
    assert torch.allclose(net.interpolate_pos_encoding(16, 16), official_interpolate_pos_encoding(sd["pos_embed"], 224, 224))
    assert torch.equal(net.interpolate_pos_encoding(37, 37), net.pos_embed)  # 518 px: the table as is
    del sd["blocks.0.ls1.gamma"]
    torch.save(sd, path)
    with pytest.raises(DataError, match="ls1.gamma"):
        sendvae.DINOv2("vitb14", weights_path=path)


def test_default_vfm_offline_is_one_line_error(tmp_path):
    env = {"MINUNITE_CACHE": str(tmp_path)}
    for args in (["--vfm", "dinov2_vitb14"], ["--preset", "f16d32", "--data", str(tmp_path)]):
        r = run("sendvae.py", *args, env=env)
        assert r.returncode != 0 and r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: DINOv2 weights not found"), r.stderr
        assert "dinov2_vitb14_pretrain.pth" in lines[0] and "https://dl.fbaipublicfiles.com/dinov2/" in lines[0]


# ----------------------------------------------------------------------------- probe

def test_probe_recovers_a_planted_linear_attribute():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 64, generator=g)
    w, W3 = torch.randn(64, generator=g), torch.randn(64, 3, generator=g)
    labels = {"planted": (x @ w > 0).long(), "three": (x @ W3).argmax(1),
              "random": torch.randint(0, 2, (3000,), generator=g)}
    f1 = sendvae.linear_probe(x[:2000], {k: v[:2000] for k, v in labels.items()},
                              x[2000:], {k: v[2000:] for k, v in labels.items()})
    assert f1["planted"] > 0.95 and f1["three"] > 0.9
    assert 0.3 < f1["random"] < 0.65  # chance: the positive-class F1 of a coin flip is ~0.5


def test_f1_score_definitions():
    pred, true = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0])
    assert sendvae.f1_score(pred, true, 2) == pytest.approx(2 / 3)           # binary: positive class
    assert sendvae.f1_score(pred, true, 3) == pytest.approx((0.8 + 2 / 3) / 2)  # macro over the values present


# ----------------------------------------------------------------------------- CLI, checkpoint, two-stage

def test_cli_run_checkpoint_and_probe(vae_ckpt, folder):
    ck = torch.load(vae_ckpt, map_location="cpu", weights_only=True)
    assert ck["vfm_stand_in"] is True and ck["vfm"].startswith("STAND-IN random-vit")
    assert ck["vae_config"]["z_channels"] == 16 and ck["step"] == 3
    res = ck["results"]
    assert 0 < res["psnr"] < 60 and -1 <= res["align_cos"] <= 1 and set(res["probe_f1"]) == {"Bright", "Noise"}
    # the command line: --probe on the checkpoint, last stdout line = JSON
    r = run("sendvae.py", "--probe", vae_ckpt, "--probe-data", folder, "--probe-train", "40", "--probe-test", "24")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["probe_f1"] == res["probe_f1"]  # deterministic: posterior means, closed-form probe
    r = run("sendvae.py", "--probe", os.path.join(folder, "000000.png"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "not a checkpoint" in r.stderr


def test_probe_reads_a_unite_checkpoint(folder, tmp_path, capsys):
    """--probe also scores a one-stage UNITE checkpoint's tokenizer latents (bench.py's ablation probes both)."""
    from dataclasses import asdict
    from model import UNITE, make_config
    torch.manual_seed(0)
    m = UNITE(make_config("micro", num_classes=3))
    for p in m.parameters():  # a "trained" GE: adaLN-Zero init would make every latent the same constant
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    torch.save({"config": asdict(m.cfg), "ema": m.state_dict()}, tmp_path / "u.pt")
    sendvae.main(["--probe", str(tmp_path / "u.pt"), "--probe-data", folder, "--probe-train", "40", "--probe-test", "24"])
    out = capsys.readouterr().out
    assert "UNITE Generative Encoder" in out
    f1 = json.loads(out.strip().splitlines()[-1])["probe_f1"]
    assert f1["Bright"] > 0.75  # brightness is linear in the pixels: random GE features keep it


def test_cli_end_to_end_subprocess(folder, tmp_path):
    r = run("sendvae.py", "--data", folder, "--vfm", "random-vit", "--max-steps", "100000", "--time-budget", "1",
            "--batch-size", "8",
            "--num-workers", "0", "--mapper-depth", "0", "--no-align-noise", "--align-weight", "0", "--out-dir", str(tmp_path),
            "--eval-images", "16", "--probe-data", folder, "--probe-train", "40", "--probe-test", "24")
    assert r.returncode == 0, r.stderr
    assert "STAND-IN" in r.stdout and "PSNR" in r.stdout
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["align_weight"] == 0 and res["mapper_depth"] == 0 and res["align_noise"] is False
    assert 0 < res["steps"] < 100000 and res["cpu_s"] >= 1  # --time-budget ended the loop
    assert os.path.isfile(tmp_path / "recon.png")


def test_two_stage_stores_latent_stats_and_samples_through_the_vae(vae_ckpt, folder, tmp_path):
    out = str(tmp_path / "sit")
    train.main(["--tokenizer", vae_ckpt, "--model", "micro", "--data", folder, "--batch-size", "8", "--max-steps",
                "2", "--eval-samples", "0", "--sample-every", "-1", "--log-every", "1", "--latent-stats-images", "32",
                "--precision", "fp32", "--num-workers", "0", "--out-dir", out])
    ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ck["config"]["latent_dim"] == 16 and ck["config"]["patch_size"] == 8  # 4x4x16 latent -> 16 tokens
    assert ck["vae_config"]["z_channels"] == 16 and ck["tokenizer"] == vae_ckpt
    # the stats: per channel over the first 32 images' posterior means, stored once in the checkpoint
    vae, _ = sendvae.load_vae(vae_ckpt)
    imgs = torch.stack([train.get_dataset(folder, 32)[i][0] for i in range(32)])
    with torch.no_grad():
        z = vae.encode(imgs)[0]
    assert torch.allclose(ck["ema"]["decoder.latent_mean"], z.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(ck["ema"]["decoder.latent_std"], z.std((0, 2, 3)), atol=1e-5)
    assert not any(k.startswith("encoder.patch_embed") for k in ck["ema"])  # denoise-only: no tokenizer input
    for k, v in vae.state_dict().items():  # the VAE is frozen: unchanged by training
        assert torch.equal(ck["model"]["decoder.vae." + k], v), k
    # sample.py rebuilds the two-stage model from this one file and decodes with the stored stats
    model, _ = sample.load_model(os.path.join(out, "ckpt.pt"), "cpu")
    x, nfe = generate(model, [0, 1], 1, seed=0, steps=2, method="euler")
    zs, _ = sample_latents(model.denoiser, sample_noise([0, 1], 0, (16, 16)), torch.tensor([0, 0]), steps=2,
                           method="euler", shift=model.cfg.time_shift)
    lat = (zs * ck["ema"]["decoder.latent_std"] + ck["ema"]["decoder.latent_mean"]).transpose(1, 2).reshape(2, 16, 4, 4)
    with torch.no_grad():
        assert torch.allclose(x, vae.decode(lat).clamp(0, 1), atol=1e-5)
    r = run("sample.py", os.path.join(out, "ckpt.pt"), "--steps", "2", "--num-samples", "4")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "ckpt_samples.png"))


@pytest.mark.slow
def test_default_cli_on_shapes_with_shapesnet_standin(tmp_path):
    """The default command's path (built-in shapes, ShapesNet stand-in VFM, shapes probe), 20 steps (~1.5 min)."""
    r = run("sendvae.py", "--max-steps", "20", "--out-dir", str(tmp_path), "--eval-images", "200",
            "--probe-train", "500", "--probe-test", "300")
    assert r.returncode == 0, r.stderr
    assert "STAND-IN shapesnet" in r.stdout
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["vfm"] == "shapesnet" and set(res["probe_f1"]) == {"shape", "color", "background", "size", "x", "y",
                                                                 "rotation"}
