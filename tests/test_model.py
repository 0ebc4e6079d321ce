"""Model tests: shapes, parameter counts, the two GE modes, stop-grad, separate weights,
overfitting, samplers.
Run: python -m pytest tests/test_model.py -q"""
import math

import pytest
import torch

from model import (PRESETS, UNITE, count_params, draw_noise, flow_loss, guided_x, make_config,
                   sample_latents, time_grid)


def tiny_model(**kw):
    torch.manual_seed(0)
    return UNITE(make_config("micro", num_classes=5, **kw))


def test_preset_parameter_counts():
    # paper: GE-B 130.6M + decoder-B 86.2M; L 458.2M; XL 675.3M
    # (code-computed, unite-paper.md 2.2/2.4)
    expected = {"B": (130.6, 86.2), "L": (458.2, 86.2), "XL": (675.3, 86.2)}
    for name, (enc, dec) in expected.items():
        with torch.device("meta"):
            m = UNITE(make_config(name))
        assert abs(count_params(m.encoder) / 1e6 / enc - 1) < 0.02, name
        assert abs(count_params(m.decoder) / 1e6 / dec - 1) < 0.02, name


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown model preset"):
        make_config("XXL")


@pytest.mark.parametrize("name", ["micro", "tiny"])
def test_two_modes_shapes_and_output_norm(name):
    cfg = make_config(name, num_classes=5)
    m = UNITE(cfg).eval()
    x = torch.rand(3, 3, cfg.image_size, cfg.image_size)
    z0 = m.encoder.tokenize(x)
    assert z0.shape == (3, cfg.num_tokens, cfg.latent_dim)
    xp = m.encoder.denoise(torch.randn_like(z0), torch.rand(3), torch.tensor([0, 1, 5]))
    assert xp.shape == z0.shape
    # both outputs go through LayerNorm(C) with its init affine (1, 0): every token has mean 0,
    # var 1
    with torch.no_grad():
        m.encoder.final_linear.weight.normal_()
        for out in (m.encoder.tokenize(x),
                    m.encoder.denoise(torch.randn_like(z0), torch.rand(3), torch.zeros(3).long())):
            assert torch.allclose(out.mean(-1), torch.zeros(()), atol=1e-5)
            assert torch.allclose(out.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
    assert m.decoder(z0).shape == x.shape


def _grads_of_flow(m, x, y):
    """Gradients of the flow loss alone (pass 2 fed with pass 1's z0, as in UNITE.forward)."""
    m.zero_grad()
    cfg = m.cfg
    noise = draw_noise(cfg, len(x))
    z0 = m.encoder(noise["registers"], noise["recon_t"], torch.full_like(y, cfg.num_classes), x)
    zd = z0.detach() if cfg.stopgrad else z0
    flow_loss(m.denoiser, zd, y, noise, cfg).backward()
    return m.encoder.patch_embed.weight.grad


def test_stopgrad_blocks_flow_loss_from_tokenizer():
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for stopgrad in (True, False):
        m = tiny_model(stopgrad=stopgrad)
        with torch.no_grad():  # leave adaLN-Zero init so that z0 depends on the image
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        g = _grads_of_flow(m, x, y)
        # the patch embedding is used only by the tokenizer pass: any gradient there came through z0
        if not stopgrad:
            assert g is not None and g.abs().sum() > 0
        else:
            assert g is None or g.abs().sum() == 0
        # shared weights do learn from it
        assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_separate_has_two_weight_sets():
    m = tiny_model(separate=True)
    shared = tiny_model()
    enc, den = set(map(id, m.encoder.parameters())), set(map(id, m.denoiser.parameters()))
    assert not enc & den
    assert m.denoiser.patch_embed is None  # the denoiser never sees images
    assert count_params(m) > count_params(shared)
    # the flow loss trains only the denoiser, the reconstruction loss only the tokenizer (+ decoder)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _grads_of_flow(m, x, y)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.denoiser.parameters())


def test_recon_weight_scales_only_the_reconstruction_term():
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    m1, m3 = tiny_model(), tiny_model(recon_weight=3.0)
    m3.load_state_dict(m1.state_dict())
    noise = draw_noise(m1.cfg, 4, generator=torch.Generator().manual_seed(0))
    l1, s1 = m1(x, y, noise)
    l3, s3 = m3(x, y, noise)
    assert torch.equal(s1["recon"], s3["recon"]) and torch.equal(s1["flow"], s3["flow"])
    assert (torch.allclose(l3, 3 * s1["recon"] + s1["flow"])
            and torch.allclose(l1, s1["recon"] + s1["flow"]))


def test_loss_falls_when_overfitting():
    m = tiny_model()
    torch.manual_seed(1)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 5
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    recs = []
    for _ in range(60):
        loss, st = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recs.append(st["recon"].item())
    assert sum(recs[-5:]) / 5 < 0.5 * sum(recs[:5]) / 5


class GaussianOracle(torch.nn.Module):
    """Exact x-prediction for data z0 ~ N(mu, s^2 I) under z_t = t z0 + (1-t) eps, written so that
    the sampler's v = (x_hat - z) / max(1 - t, eps) is the exact probability-flow velocity of
    z_t = t mu + sigma_t e, sigma_t = sqrt(t^2 s^2 + (1-t)^2)."""

    def __init__(self, mu, s, t_eps):
        super().__init__()
        self.mu, self.s, self.t_eps = mu, s, t_eps
        self.cfg = make_config("micro", num_classes=3)
        self.calls = 0

    def denoise(self, z, t, y):
        self.calls += 1
        t = t.double()[:, None, None]
        sig = torch.sqrt(t ** 2 * self.s ** 2 + (1 - t) ** 2)
        dsig = (t * self.s ** 2 - (1 - t)) / sig
        v = self.mu + dsig * (z.double() - t * self.mu) / sig
        return (z.double() + (1 - t).clamp_min(self.t_eps) * v).float()


def test_heun_integrates_gaussian_flow_exactly():
    mu, s = 0.7, 0.3
    oracle = GaussianOracle(mu, s, 0.05)
    noise = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(0))
    z1, nfe = sample_latents(oracle, noise, torch.zeros(4).long(), steps=50, method="heun",
                             shift=0.5)
    exact = mu + s * noise  # the flow map sends eps to mu + s eps
    # the Heun map is affine in eps: error <= 3e-4 per unit of the largest |eps| (1e-3 at 3.3; this
    # seed draws 4.1 and errs 1.1e-3)
    assert (z1 - exact).abs().max() < 3e-4 * noise.abs().max()
    assert nfe == 100 and oracle.calls == 100
    z1e, nfe = sample_latents(oracle, noise, torch.zeros(4).long(), steps=50, method="euler",
                              shift=0.5)
    # Heun is the more accurate
    assert nfe == 50 and (z1e - exact).abs().max() > (z1 - exact).abs().max()


def test_time_grid_is_shifted_toward_noise():
    ts = time_grid(10, 0.5)
    assert ts[0] == 0 and ts[-1] == 1 and (ts.diff() > 0).all()
    assert math.isclose(ts[5].item(), 1 / 3, rel_tol=1e-9)  # a t / (1 + (a-1) t) at t=0.5, a=0.5


def test_batched_cfg_equals_two_passes():
    m = tiny_model().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, y, w = torch.randn(3, 16, 8), torch.tensor([0, 2, 4]), 3.0
    with torch.no_grad():
        got = guided_x(m.encoder, z, torch.tensor(0.6), y, w, 0.1, 5)
        tb = torch.full((3,), 0.6)
        c, u = m.encoder.denoise(z, tb, y), m.encoder.denoise(z, tb, torch.full_like(y, 5))
        assert torch.allclose(got, u + w * (c - u), atol=1e-5)
        # guidance interval: no guidance at t <= 0.1
        assert torch.allclose(guided_x(m.encoder, z, torch.tensor(0.05), y, w, 0.1, 5),
                              m.encoder.denoise(z, torch.full((3,), 0.05), y), atol=1e-6)


def test_presets_dict_has_paper_sizes():
    assert {"tiny", "S", "B", "L", "XL"} <= set(PRESETS)
    assert (PRESETS["B"]["enc_depth"], PRESETS["B"]["enc_width"]) == (12, 768)
    assert make_config("B").num_tokens == 256 and make_config("B").latent_dim == 32


def test_bf16_autocast_step_is_finite():
    m = tiny_model()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, st = m(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # losses are computed in fp32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_attend_equals_softmax_attention_in_both_precisions():
    """model.attend picks SDPA's math path on CPU in bf16 (the fused kernel is ~4x slower there):
    both paths must give softmax(q k^T / sqrt(d)) v, with gradients, and no dtype-mismatch fallback
    in the QK-RMSNorm under autocast."""
    import warnings
    from model import Attention, attend
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 20, 16) for _ in range(3))
    ref = torch.softmax(q @ k.mT / 4.0, dim=-1) @ v
    assert torch.allclose(attend(q, k, v), ref, atol=1e-5)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = attend(qb, kb, vb)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=3e-2)
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (qb, kb, vb))
    att = Attention(32, 2)
    with warnings.catch_warnings():
        # torch warns when rms_norm gets a bf16 input with an fp32 weight
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert att(torch.randn(2, 5, 32)).dtype == torch.bfloat16


def test_batched_muon_equals_torch_muon():
    """optim.Muon batches Newton-Schulz over same-shape matrices: in bf16 it must give
    torch.optim.Muon's weights bit for bit; in fp32 (the CPU default without bf16 units) it must
    stay within bf16 rounding of them."""
    from optim import Muon
    torch.manual_seed(0)
    shapes = [(64, 32), (64, 32), (32, 96), (48, 48)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    init = [p.detach().clone() for p in ref]
    ours = {dt: [torch.nn.Parameter(p.detach().clone()) for p in ref]
            for dt in (torch.bfloat16, torch.float32)}
    kw = dict(lr=0.02, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    opts = [torch.optim.Muon(ref, **kw)] + [Muon(ps, ns_dtype=dt, **kw) for dt, ps in ours.items()]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for ps in [ref, *ours.values()]:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        for o in opts:
            o.step()
    for r, b, f, w0 in zip(ref, ours[torch.bfloat16], ours[torch.float32], init):
        assert torch.equal(r, b)
        moved = (r - w0).norm()                     # what 3 steps changed
        # fp32 NS: the same update up to bf16 rounding (~0.4%)
        assert 0 < (r - f).norm() < 0.02 * moved
    # the state is torch's: a checkpoint of one loads into the other
    opts[2].load_state_dict(opts[0].state_dict())


def test_latent_patch_round_trip_and_token_count():
    """Stage 2 on an f8 VAE: patch 2 gives 256 tokens of 4 x 4 channels at 256 px (SiT-XL/2 on
    SD-VAE);
    tokens -> images decodes exactly what the VAE decodes from the same latent."""
    from vae import (VAE_PRESETS, LatentVAE, VAEConfig, latent_tokens_config, patchify,
                     unpatchify)
    f8 = VAEConfig(**VAE_PRESETS["f8d4"])
    assert latent_tokens_config(f8, 256) == dict(patch_size=16, latent_dim=16)
    f16 = VAEConfig(**VAE_PRESETS["f16d32"])
    assert latent_tokens_config(f16, 256) == dict(patch_size=16, latent_dim=32)
    # the tiny VAE's 4 x 4 grid keeps p = 1
    assert latent_tokens_config(VAEConfig(**VAE_PRESETS["tiny"]), 32)["patch_size"] == 8
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert patchify(z, 2).shape == (2, 16, 16) and torch.equal(unpatchify(patchify(z, 2), 2, 4), z)
    torch.manual_seed(0)
    lat = LatentVAE(VAEConfig(**VAE_PRESETS["tiny"]), patch=2).eval()
    lat.latent_mean.uniform_(-1, 1)
    lat.latent_std.uniform_(0.5, 2)
    x = torch.rand(2, 3, 32, 32)
    tok = lat.tokens(x)                                                      # (2, 4, 16 * 4)
    assert tok.shape == (2, 4, 64)
    with torch.no_grad():
        ref = lat.vae.decode(lat.vae.encode(x)[0])
        assert torch.allclose(lat(tok), ref, atol=1e-5)
