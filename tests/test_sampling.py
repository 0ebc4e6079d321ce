"""Sampler tests: adaptive dopri5 against scipy's RK45 and closed forms, its batch independence
and NFE, the fixed-step Euler / Heun samplers, and guided_x's guidance interval (per-sample and
scalar t). Run: python -m pytest tests/test_sampling.py -q
(test_dopri5_equals_torchdiffeq compares with the released solver if torchdiffeq is installed)"""
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from dopri5 import dopri5
from model import UNITE, guided_x, make_config, sample_latents, time_grid

ATOL, RTOL, T_EPS = 1e-6, 1e-3, 0.05


class GaussianOracle(torch.nn.Module):
    """Exact x-prediction when class y's data is N(mu_y, s_y^2 I) under z_t = t z0 + (1 - t) eps:
    the sampler's v = (x_hat - z) / max(1 - t, t_eps) is then the exact flow velocity, which
    carries eps to mu_y + s_y eps at t = 1 (and goes on smoothly past t = 1, where dopri5's last
    step may land)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = torch.tensor(mu).double(), torch.tensor(s).double()
        self.cfg = make_config("micro", num_classes=len(mu))
        self.calls = 0

    def velocity(self, z, t, y):                                  # float64 (B, ...), t (B,)
        t, mu, s = t.double()[:, None, None], self.mu[y][:, None, None], self.s[y][:, None, None]
        sig = torch.sqrt(t ** 2 * s ** 2 + (1 - t) ** 2)
        return mu + (t * s ** 2 - (1 - t)) / sig * (z.double() - t * mu) / sig

    def denoise(self, z, t, y):
        self.calls += 1
        w = (1 - t.double()).clamp_min(T_EPS)[:, None, None]
        return (z.double() + w * self.velocity(z, t, y)).float()

    def exact(self, noise, y):
        return (self.mu[y][:, None, None] + self.s[y][:, None, None] * noise.double()).float()


def scipy_rk45(fun, y0, **kw):
    """solve_ivp RK45 of dy/dt = fun(t, y) from 0 to 1 in float64, fun taking a 0-d t and y shaped
    as y0; returns (y(1), nfev)."""
    f = lambda t, y: fun(torch.tensor(t).double(), torch.from_numpy(y).view(y0.shape)).flatten()
    sol = solve_ivp(lambda t, y: f(t, y).numpy(), (0.0, 1.0), y0.double().flatten().numpy(),
                    method="RK45", **kw)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1]).view(y0.shape), sol.nfev


def test_dopri5_gaussian_flow_matches_scipy_and_exact():
    torch.manual_seed(0)
    oracle, noise, y = GaussianOracle([0.7], [0.3]), torch.randn(1, 16, 8), torch.zeros(1).long()
    z1, nfe = sample_latents(oracle, noise, y, method="dopri5", t_eps=T_EPS)
    v = lambda t, z: oracle.velocity(z, t.view(1), y)
    ref, nfev = scipy_rk45(v, noise, atol=ATOL, rtol=RTOL)
    exact = oracle.exact(noise, y)
    scale = ATOL + RTOL * exact.abs().max()                   # the tolerance scale at t = 1
    assert (z1 - ref).abs().max() < 3 * scale                  # same method, same tolerances
    assert (z1 - exact).abs().max() < 3 * scale
    # NFE of the same order, not equal: torchdiffeq's embedded 4th-order pair (kept here) gives
    # 2/3 of scipy's error estimate, and its steps are not cut at t = 1 (trials past it can fail)
    assert nfe == oracle.calls and nfev / 2 <= nfe <= 3 * nfev


def nonlinear_ode():
    """dy/dt = g(t, y): a batch-1 test ODE with a state the shape of a micro latent (1, 16, 8)."""
    torch.manual_seed(0)
    y0, W = torch.randn(1, 16, 8), torch.randn(8, 8) * 0.5

    def g(t, y):                                               # t broadcasts against y
        return torch.tanh(y @ W.to(y)) * (1 + 2 * t) - 0.5 * y * torch.cos(6 * t) + torch.sin(4 * t)
    return y0, g


def test_dopri5_nonlinear_ode_matches_scipy():
    y0, g = nonlinear_ode()
    ours, nfe = dopri5(lambda i, y, t: g(t[:, None, None], y), y0, ATOL, RTOL)
    ref, nfev = scipy_rk45(g, y0, atol=ATOL, rtol=RTOL)
    exact, _ = scipy_rk45(g, y0, atol=1e-12, rtol=1e-10)
    scale = ATOL + RTOL * exact.abs().max()
    assert (ours - ref).abs().max() < 3 * scale and (ours - exact).abs().max() < 3 * scale
    assert nfev / 2 <= nfe.item() <= 3 * nfev


def test_dopri5_equals_torchdiffeq():
    """At batch size 1 our dopri5 is the released call odeint(f, x, grid, method="dopri5",
    atol=[1e-6], rtol=[1e-3]) on the 50-point shifted grid, read at its last point (t = 1):
    same steps, same floats."""
    odeint = pytest.importorskip("torchdiffeq").odeint
    y0, g = nonlinear_ode()
    calls = []
    grid = torch.tensor([0.5 * s / (1 - 0.5 * s) for s in torch.linspace(0, 1, 50)])
    ref = odeint(lambda t, y: calls.append(t) or g(t, y), y0, grid, method="dopri5",
                 atol=[ATOL], rtol=[RTOL])
    ours, nfe = dopri5(lambda i, y, t: g(t[:, None, None], y), y0, ATOL, RTOL)
    assert torch.equal(ours, ref[-1]) and nfe.item() == len(calls)


def test_dopri5_batch_independent():
    """Each sample keeps its own step size: alone or in a batch it takes the same steps and lands
    on the same floats (torchdiffeq shares one step size, set by the batch's hardest sample)."""
    torch.manual_seed(0)
    oracle = GaussianOracle([0.7, 3.0, -2.0], [0.3, 0.02, 1.5])
    noise = torch.randn(5, 16, 8) * torch.tensor([1, 3, 1, 0.5, 2]).view(-1, 1, 1)
    y, kw = torch.tensor([0, 1, 2, 1, 0]), dict(method="dopri5", t_eps=T_EPS)
    alone = [sample_latents(oracle, noise[n:n + 1], y[n:n + 1], **kw) for n in range(5)]
    z1, nfe = sample_latents(oracle, noise, y, **kw)
    nfes = [a[1] for a in alone]
    assert len(set(nfes)) > 1                                  # the samples really step differently
    assert all(torch.equal(z1[n:n + 1], alone[n][0]) for n in range(5))
    assert nfe == pytest.approx(np.mean(nfes))                 # NFE: the mean per sample
    # global error ~1e-2 of the scale for the sharp class (s = 0.02); scipy's RK45 does the same
    exact = oracle.exact(noise, y)
    assert (z1 - exact).abs().max() < 0.05 * exact.abs().max()


class RowByRow(torch.nn.Module):
    """A denoiser run one sequence at a time: its outputs do not depend on the batch at all."""

    def __init__(self, den):
        super().__init__()
        self.den, self.cfg = den, den.cfg

    def denoise(self, z, t, y):
        rows = [self.den.denoise(z[r:r + 1], t[r:r + 1], y[r:r + 1]) for r in range(len(z))]
        return torch.cat(rows)


def test_dopri5_batch_independent_unite_cfg():
    """The same with a random micro UNITE denoiser under CFG 3 (per-sample guidance interval). Run
    row by row the denoiser is batch invariant, and so is the sample, to the bit. With batched
    forwards the denoiser's float32 round-off changes with the batch size (~1e-7) and dopri5
    amplifies it: the first steps' error estimates are round-off (err ~1e-9), so the next step
    sizes move by a few percent and the sample by up to the solver's own error (~1e-2 here)."""
    torch.manual_seed(0)
    m = UNITE(make_config("micro", num_classes=5)).eval()
    with torch.no_grad():
        for p in m.encoder.parameters():
            if not p.abs().any():                              # adaLN-Zero, final layer, biases
                p.normal_(0, 0.1)
    noise, y = torch.randn(2, 16, 8), torch.tensor([3, 5])     # 5 = null: an unconditional sample
    kw = dict(method="dopri5", cfg_scale=3.0, cfg_min_t=0.1, t_eps=T_EPS)
    den = RowByRow(m.denoiser)
    alone = [sample_latents(den, noise[n:n + 1], y[n:n + 1], **kw) for n in range(2)]
    z1, nfe = sample_latents(den, noise, y, **kw)
    assert torch.equal(z1, torch.cat([a[0] for a in alone]))
    assert nfe == pytest.approx(np.mean([a[1] for a in alone])) and 20 <= nfe <= 400
    z1b, _ = sample_latents(m.denoiser, noise, y, **kw)       # batched forwards: solver-error level
    assert (z1b - z1).abs().max() < 0.05 * z1.abs().max()


def test_dopri5_nfe_counts_denoiser_calls():
    torch.manual_seed(0)
    oracle = GaussianOracle([0.7], [0.3])
    noise, y, kw = torch.randn(1, 16, 8), torch.zeros(1).long(), dict(method="dopri5", t_eps=T_EPS)
    _, nfe = sample_latents(oracle, noise, y, **kw)
    assert nfe == oracle.calls and (nfe - 2) % 6 == 0          # f0, the first-step probe, 6 a step
    assert 8 <= nfe <= 200
    oracle.calls = 0
    _, nfe_tight = sample_latents(oracle, noise, y, atol=1e-9, rtol=1e-7, **kw)
    assert nfe_tight == oracle.calls and nfe_tight > 2 * nfe   # tighter tolerances -> more steps


def reference_fixed_step(denoiser, noise, y, steps, method, cfg_scale, cfg_min_t, null):
    """The Euler / Heun loop as written before dopri5 (scalar t, one CFG forward of 2B rows)."""
    ts, z = time_grid(steps, 0.5), noise.float()

    def v(z, t):
        tb = torch.full((z.shape[0],), float(t))
        if cfg_scale != 1.0 and cfg_min_t < float(t) < 1.0:
            c, u = denoiser.denoise(torch.cat([z, z]), torch.cat([tb, tb]),
                                    torch.cat([y, torch.full_like(y, null)])).chunk(2)
            x = u + cfg_scale * (c - u)
        else:
            x = denoiser.denoise(z, tb, y)
        return (x.float() - z) / max(1 - float(t), T_EPS)

    for t0, t1 in zip(ts[:-1], ts[1:]):
        d0 = v(z, t0)
        z1 = z + (t1 - t0).item() * d0
        z = z1 if method == "euler" else z + (t1 - t0).item() * 0.5 * (d0 + v(z1, t1))
    return z


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_fixed_step_samplers_unchanged(method):
    torch.manual_seed(0)
    oracle = GaussianOracle([0.7, -1.0, 0.0], [0.3, 0.5, 1.0])  # class 2 doubles as the null class
    noise, y = torch.randn(3, 16, 8), torch.tensor([0, 1, 0])
    z1, nfe = sample_latents(oracle, noise, y, steps=20, method=method, cfg_scale=2.0, t_eps=T_EPS,
                             null=2)
    assert torch.equal(z1, reference_fixed_step(oracle, noise, y, 20, method, 2.0, 0.1, 2))
    assert nfe == (20 if method == "euler" else 40)


class FakeDenoiser:
    """x-prediction 1 for a class label, 0 for the null class (guided = w, unguided = 1); records
    each call's rows, times and labels."""

    def __init__(self, null=7):
        self.null, self.calls = null, []

    def denoise(self, z, t, y):
        self.calls.append((len(z), t.clone(), y.clone()))
        return (y != self.null).float()[:, None, None].expand_as(z).clone()


def test_guided_x_interval_per_sample():
    """Guidance only for cfg_min_t < t < 1: unguided at t <= cfg_min_t, at t = 1 and past it
    (dopri5's last step may overshoot t = 1); one forward, uncond rows for guided samples only."""
    den, w = FakeDenoiser(), 3.0
    t = torch.tensor([0.05, 0.1, 0.1001, 0.5, 0.999, 1.0, 1.3])
    z, y = torch.zeros(7, 4, 2), torch.arange(7)
    out = guided_x(den, z, t, y, w, 0.1, den.null)
    guided = torch.tensor([0, 0, 1, 1, 1, 0, 0]).bool()
    assert torch.equal(out[:, 0, 0], torch.where(guided, w, 1.0))
    assert len(den.calls) == 1
    rows, tb, yb = den.calls[0]
    assert rows == 7 + 3 and torch.equal(tb, torch.cat([t, t[guided]]))
    assert torch.equal(yb, torch.cat([y, torch.full((3,), den.null)]))


@pytest.mark.parametrize("t,is_guided", [
    (0.05, False), (0.1, False), (0.5, True), (1.0, False),                  # python floats
    (torch.tensor(0.6), True), (torch.tensor(1.0, dtype=torch.float64), False)])  # 0-d tensors
def test_guided_x_interval_scalar_t(t, is_guided):
    den, z, y = FakeDenoiser(), torch.zeros(3, 4, 2), torch.tensor([0, 1, 2])
    out = guided_x(den, z, t, y, 3.0, 0.1, den.null)
    assert torch.equal(out, torch.full_like(z, 3.0 if is_guided else 1.0))
    assert [c[0] for c in den.calls] == [6 if is_guided else 3]   # one forward: 2B or B rows
    assert torch.equal(den.calls[0][1][:3], torch.full((3,), float(t)))
    den.calls.clear()
    guided_x(den, z, t, y, 1.0, 0.1, den.null)                 # cfg_scale 1: never an uncond pass
    assert [c[0] for c in den.calls] == [3]
