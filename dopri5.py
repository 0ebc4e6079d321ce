"""
Adaptive Dormand-Prince 5(4), the solver of the released UNITE sampler (torchdiffeq's dopri5), with
one step size per sample: `dopri5(f, y0, atol, rtol)`, used by model.sample_latents("dopri5").
At batch size 1 it equals torchdiffeq 0.2.5 to 0.0 with the same velocity function (checked
outside this repo on three nonlinear ODEs); tests/test_sampling.py checks it against scipy's RK45.
"""
import torch

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

