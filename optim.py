"""
Optimization, shared by train.py, molecules.py and bench.py: the released UNITE code's optimizers
(Muon on the 2-D weight matrices, AdamW on the rest), its lr schedule, the EMA, and the one training
step every script runs.
"""
import contextlib
import math

import torch

from data import UserError, autocast


def lr_at(step, lr, warmup, hold=0, decay_end=None, min_frac=1.0):
    """The released schedule, in optimizer steps: linear warmup to `lr` over `warmup` steps,
    constant until `hold`, cosine down to min_frac * lr by `decay_end`, constant after
    (decay_end None: no decay)."""
    if step < warmup:
        return lr * (step + 1) / warmup  # the released LambdaLR starts at 0: one step of difference
    hold = max(warmup, hold)
    if decay_end is None or step < hold or decay_end <= hold:
        return lr
    frac = min(1.0, (step - hold) / (decay_end - hold))
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def newton_schulz(G, coefficients, steps, eps, dtype):
    """Batched quintic Newton-Schulz orthogonalisation of G (N, A, B), the same iteration as
    torch.optim.Muon's (which runs it one matrix at a time, always in bf16)."""
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)                # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT                                                      # (N, a, a), a = min(A, B)
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.mT if tall else X


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same arguments, state and update) with two speed-ups: the Newton-Schulz
    iteration is batched over matrices of the same shape, and runs in `ns_dtype`. torch's runs it
    per matrix in bf16, which on CPUs without bf16 units is ~3.5x slower than fp32 (there ~45% of
    the tiny preset's step).
    ns_dtype=None: bf16 on CUDA (as torch and the released code), fp32 elsewhere."""

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
                match = g["adjust_lr_fn"] == "match_rms_adamw"             # else torch's "original"
                ratio = 0.2 * math.sqrt(max(A, B)) if match else math.sqrt(max(1, A / B))
                for (p, _), u in zip(items, U):
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                    p.add_(u, alpha=-g["lr"] * ratio)
        return loss


def make_optimizers(model, lr, muon=True, ns_dtype=None):
    """Muon for the 2-D weight matrices except the patch embed, final layer, in-context and register
    position embeddings (the released get_learnable_params); AdamW (betas 0.9/0.999, eps 1e-6, wd 0)
    for everything else, or for everything with muon=False."""
    excluded = ("patch_embed", "final_", "in_context_pos", "latent_pos")
    matrices, rest = [], []
    for name, p in model.named_parameters():
        use_muon = muon and p.ndim == 2 and not any(k in name for k in excluded)
        (matrices if use_muon else rest).append(p)
    opts = [torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)]
    if matrices:
        opts.append(Muon(matrices, lr=lr, momentum=0.95, weight_decay=0.0,
                         adjust_lr_fn="match_rms_adamw", ns_dtype=ns_dtype))
    return opts


@torch.no_grad()
def update_ema(ema, model, decay, step, warmup=False):
    """ema <- decay ema + (1 - decay) model, once per optimizer step, parameters only (released
    utils/ema.py: fixed decay, no warm-up). warmup=True caps the decay at (1 + step) / (10 + step),
    so a short run's EMA is not dominated by the random init (the tiny preset)."""
    d = min(decay, (1 + step) / (10 + step)) if warmup else decay
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1 - d)


def train_step(model, opts, ema, micro_batches, *, lr, step, grad_clip, ema_decay, ema_warmup=False,
               precision="fp32", bad=0):
    """One optimizer step, the same in every script. micro_batches: a list of this process's
    (x, y, noise); each is a forward under autocast and a backward of loss / n (DDP all-reduces
    gradients on the last one only). Then clip; with a finite gradient norm the optimizers and the
    EMA step, otherwise the step is skipped, and after 5 non-finite steps in a row the run stops
    with the likely causes.
    Returns (grad norm, [loss, recon, flow] averaged over the micro-batches,
    non-finite steps in a row)."""
    raw = getattr(model, "module", model)                                     # under DDP
    for o in opts:
        for g in o.param_groups:
            g["lr"] = lr
    stats, n = None, len(micro_batches)
    for m, (x, y, noise) in enumerate(micro_batches):
        last = m == n - 1
        sync = (contextlib.nullcontext() if last or not hasattr(model, "no_sync")
                else model.no_sync())
        with sync, autocast(x.device, precision):
            loss, st = model(x, y, noise)
        (loss / n).backward()
        s = torch.stack([loss.detach(), st["recon"], st["flow"]]) / n
        stats = s if stats is None else stats + s
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip)
    if torch.isfinite(norm):  # a sync point; the same on every rank (gradients are all-reduced)
        for o in opts:
            o.step()
        update_ema(ema, raw, ema_decay, step, ema_warmup)
        bad = 0
    else:
        bad += 1
        if bad >= 5:
            raise UserError("5 non-finite steps in a row: lower --lr, use --precision fp32, or "
                            "check the data (NaN/Inf values)")
    for o in opts:
        o.zero_grad(set_to_none=True)
    return norm, stats, bad
