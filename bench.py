"""
Benchmark (as nanoGPT's bench.py): the hot paths stripped of everything else, timed where it runs,
in one run.

    python bench.py              # ~3-4 min on 2 CPU cores; the last stdout line is one JSON object
                                 # of the figures
    python bench.py --quick      # a smaller run (tests, CI)

It prints:
- the measured matmul peak (GFLOP/s) of this device, fp32 and bf16: the yardstick for the rest;
- the training step (forward + backward + clip + Muon/AdamW + EMA, exactly train.py's) of the tiny
  and S presets, img/s and achieved model GFLOP/s, in fp32 and (where --precision auto picks it)
  bf16 autocast. FLOPs are counted analytically (train_flops: every matmul, conv and attention
  product of the three passes, backward = 2x forward; the optimizer's Newton-Schulz matmuls are not
  model FLOPs and are not counted, like MFU in nanoGPT);
- sampler img/s and NFE (Heun with CFG), FID-Inception feature img/s, and Fréchet distance time:
  fid.py's eigenvalue path vs the scipy.linalg.sqrtm path of pytorch-fid.
`tiny_train_peak_fraction` = achieved FLOP/s of the tiny training step (best precision) / the
device's best measured matmul peak (bf16 where it has fast bf16 units, else fp32).
Weights are random: speed does not depend on them.

    python bench.py --ablation images --budget 240 --seeds 0,1   # the paper's Tab. 7a ablation,
                                                                 # small scale
    python bench.py --ablation qm9 --budget 180

--ablation trains each variant for the same CPU-time budget (seconds of its own process's CPU time,
one thread, so the comparison stays fair on a shared machine) with the scripts' own defaults, and
tabulates their JSON lines:
images: (1) UNITE shared + stop-grad, (2) separate tokenizer / denoiser,
(3) shared without stop-grad,
(4) plain VAE -> SiT, (5) Send-VAE -> SiT (the two stages split the budget in half);
qm9: (1)-(3) on QM9 graphs.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import fid
from data import pick_precision, write_atomic
from model import UNITE, draw_noise, generate, make_config
from optim import make_optimizers, train_step


# -----------------------------------------------------------------------------
# analytic FLOP count (forward; matmul/conv/attention products, 2 FLOPs per multiply-add)

def ge_flops(cfg, n_tokens, n_patches):
    """One Generative Encoder pass over one sequence of n_tokens registers
    (+ n_patches image patches)."""
    D, C, H = cfg.enc_width, cfg.latent_dim, int(2 / 3 * 4 * cfg.enc_width)     # H: SwiGLU hidden
    f = 2 * n_tokens * C * D + 2 * n_patches * 3 * cfg.patch_size ** 2 * D  # latent_in, patch embed
    # t-embed MLP, final adaLN, final linear
    f += 2 * (2 * 256 * D + D * D) + 2 * D * 2 * D + 2 * n_tokens * D * C
    for i in range(cfg.enc_depth):
        T = n_tokens + n_patches + (cfg.in_context_len if i >= cfg.in_context_start else 0)
        # qkv+proj, SwiGLU, QK^T + AV, adaLN
        f += 2 * T * (4 * D * D + 3 * D * H) + 4 * T * T * D + 2 * D * 6 * D
    return f


def decoder_flops(cfg):
    D, K, T = cfg.dec_width, cfg.num_tokens, cfg.num_tokens + 1                   # + CLS
    # embed, head (on all T tokens)
    f = 2 * K * cfg.latent_dim * D + 2 * T * D * 3 * cfg.patch_size ** 2
    return f + cfg.dec_depth * (2 * T * 12 * D * D + 4 * T * T * D)    # qkv+proj+MLP(4x), attention


def train_flops(cfg, batch):
    """FLOPs of one training step on `batch` images: tokenizer pass + decoder + K fused flow copies,
    x3 for forward + backward."""
    K = cfg.num_tokens
    fwd = ge_flops(cfg, K, K) + decoder_flops(cfg) + cfg.flow_copies * ge_flops(cfg, K, 0)
    return 3 * batch * fwd


# -----------------------------------------------------------------------------
# timers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters


def matmul_peak(dtype, device, n, seconds):
    """GFLOP/s of n x n matmuls in `dtype` (the best a dense op gets here)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype),
            torch.randn(n, n, device=device, dtype=dtype))
    iters = max(1, int(seconds / max(timed(lambda: a @ b, device, 1, 1), 1e-6)))
    return 2 * n ** 3 / timed(lambda: a @ b, device, 1, iters) / 1e9


def train_step_speed(preset, batch, flow_copies, precision, device, steps):
    """train.py's step on random images: img/s and achieved model GFLOP/s."""
    torch.manual_seed(0)
    cfg = make_config(preset, num_classes=10, flow_copies=flow_copies)
    model = UNITE(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opts = make_optimizers(model, 1e-4,
                           ns_dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():  # train.py's optimizer step (noise drawn for the batch at once: the same work)
        train_step(model, opts, ema, [(x, y, draw_noise(cfg, batch, device))], lr=1e-4, step=100,
                   grad_clip=3.0, ema_decay=0.99, precision=precision)

    dt = timed(step, device, 1, steps)
    return {"img_per_s": batch / dt, "gflops": train_flops(cfg, batch) / dt / 1e9,
            "step_ms": dt * 1e3, "gflop_per_img": train_flops(cfg, 1) / 1e9}


def sampler_speed(device, n, steps, cfg_scale):
    torch.manual_seed(0)
    model = UNITE(make_config("tiny", num_classes=10)).to(device).eval()
    out = {}

    def run():
        out["nfe"] = generate(model, list(range(n)), 10, steps=steps, method="heun",
                              cfg_scale=cfg_scale)[1]

    return n / timed(run, device, 0, 1), out["nfe"]


def frechet_times(dim, n_feat):
    """fid.frechet_distance vs pytorch-fid's sqrtm path, on the statistics of random correlated
    features."""
    import scipy.linalg
    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((n_feat, dim)) @ rng.standard_normal((dim, dim)) / dim ** 0.5
    f2 = f1 + 0.3 * rng.standard_normal((n_feat, dim))
    (m1, s1), (m2, s2) = fid.feature_stats(f1), fid.feature_stats(f2)
    t = time.perf_counter()
    ours = fid.frechet_distance(m1, s1, m2, s2)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    covmean = scipy.linalg.sqrtm(s1 @ s2)                                       # pytorch-fid's path
    ref = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))
    t_ref = time.perf_counter() - t
    return t_ours, t_ref, abs(ours - ref) / max(abs(ref), 1e-12)


# -----------------------------------------------------------------------------
# the ablation: every variant for the same CPU-time budget, through the scripts' command lines

def run_script(*argv, out=None):
    """Run one of our scripts on one thread and return its last stdout line (a JSON object). With
    `out`, the line is kept in out/result.json and a later call reuses it: an interrupted ablation
    continues where it stopped."""
    done = os.path.join(out, "result.json") if out else None
    if done and os.path.exists(done):
        return json.load(open(done))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(argv)} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if done:
        write_atomic(done, json.dumps(res))  # a half-written file would pass for a finished run
    return res


def image_variant(name, budget, seed, out):
    """One variant of the image ablation -> {psnr, fd, probe_f1, steps}."""
    common = ["--seed", str(seed), "--max-steps", "1000000"]
    if name in ("shared", "separate", "no-stopgrad"):
        flags = {"shared": [], "separate": ["--separate"], "no-stopgrad": ["--no-stopgrad"]}[name]
        r = run_script("train.py", *common, *flags, "--time-budget", str(budget),
                       "--budget-clock", "cpu", "--out-dir", out, out=out)
        probe = run_script("sendvae.py", "--probe", os.path.join(out, "ckpt.pt"))
        return dict(psnr=r["psnr"], fd=r["fd_shapes_500"], probe_f1=probe["probe_f1_mean"],
                    steps=r["steps"])
    align = "1" if name == "sendvae-sit" else "0"                      # (5) Send-VAE, (4) plain VAE
    v = run_script("sendvae.py", *common, "--align-weight", align, "--time-budget", str(budget / 2),
                   "--out-dir", out + "_vae", out=out + "_vae")
    r = run_script("train.py", *common, "--tokenizer", os.path.join(out + "_vae", "ckpt.pt"),
                   "--time-budget", str(budget / 2), "--budget-clock", "cpu", "--out-dir", out,
                   out=out)
    return dict(psnr=v["psnr"], fd=r["fd_shapes_500"], probe_f1=v["probe_f1_mean"],
                steps=f"{v['steps']}+{r['steps']}")


def qm9_variant(name, budget, seed, out):
    flags = {"shared": [], "separate": ["--separate"], "no-stopgrad": ["--no-stopgrad"]}[name]
    r = run_script("molecules.py", "--seed", str(seed), *flags, "--time-budget", str(budget),
                   "--budget-clock", "cpu",
                   "--num-samples", "2000",
                   "--out-dir", out,
                   out=out)
    return dict(validity=r["validity"], uniqueness=r["uniqueness"], fcd=r["fcd"],
                recon=r.get("recon_match"), steps=r.get("steps"))


def ablation(args):
    variants = {"images": ["shared", "separate", "no-stopgrad", "vae-sit", "sendvae-sit"],
                "qm9": ["shared", "separate", "no-stopgrad"]}[args.ablation]
    run = image_variant if args.ablation == "images" else qm9_variant
    rows = {}
    for name in variants:
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = os.path.join(args.out_dir, f"{args.ablation}_{name}_s{seed}")
            rows.setdefault(name, []).append(run(name, args.budget, seed, out))
            print(f"{args.ablation} {name} seed {seed}: {json.dumps(rows[name][-1])}", flush=True)
    keys = [k for k in rows[variants[0]][0] if k != "steps"]
    print(f"\n{args.ablation}, {args.budget:.0f} CPU-s per variant, seeds {args.seeds} "
          f"(mean, and each seed):")
    print("| variant | " + " | ".join(keys) + " | steps |")
    print("|---" * (len(keys) + 2) + "|")
    summary = {}
    for name, rs in rows.items():
        means = {k: float(np.mean([r[k] for r in rs])) for k in keys}
        summary[name] = {**means, "runs": rs}
        cells = [f"{means[k]:.3f} ({', '.join(f'{r[k]:.3f}' for r in rs)})" if len(rs) > 1
                 else f"{means[k]:.3f}" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + f" | {', '.join(str(r['steps']) for r in rs)} |")
    print(json.dumps({"ablation": args.ablation, "budget_cpu_s": args.budget, "seeds": args.seeds,
                      **summary}))


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (tests, CI): the figures are rougher")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per setting (tiny)")
    p.add_argument("--s-steps", type=int, default=2,
                   help="timed steps for S (10-30 s each on a 2-core CPU)")
    p.add_argument("--tiny-batch", type=int, default=32, help="as train.py's tiny run")
    p.add_argument("--s-batch", type=int, default=2, help="S at 256 px: a CPU-sized batch")
    p.add_argument("--flow-copies", type=int, default=2,
                   help="K for both presets (the paper's 14 is 7x the flow pass)")
    p.add_argument("--precisions", default=None,
                   help="training-step precisions to time (default: fp32, plus bf16 where "
                   "--precision auto picks it: a CPU without bf16 units runs bf16 10-100x slower)")
    p.add_argument("--ablation", default="", choices=["", "images", "qm9"],
                   help="run the equal-budget ablation")
    p.add_argument("--budget", type=float, default=240,
                   help="ablation: CPU seconds of training per variant")
    p.add_argument("--seeds", default="0", help="ablation: comma-separated seeds")
    p.add_argument("--out-dir", default="out_ablation")
    args = p.parse_args(argv)
    if args.ablation:
        return ablation(args)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    q = args.quick
    steps = 2 if q else args.steps
    res = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "auto_precision": pick_precision("auto", device)}
    print(f"device {device}, {res['threads']} threads, torch {torch.__version__}, "
          f"--precision auto -> {res['auto_precision']}", flush=True)

    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        res[f"matmul_peak_{name}_gflops"] = round(matmul_peak(dt, device, 512 if q else 2048,
                                                              0.5 if q else 3), 1)
        print(f"matmul peak {name}: {res[f'matmul_peak_{name}_gflops']} GFLOP/s", flush=True)
    peak = {"fp32": res["matmul_peak_fp32_gflops"], "bf16": res["matmul_peak_bf16_gflops"]}
    best_peak = max(peak.values())  # the yardstick: the faster of the two on this device
    precisions = (args.precisions
                  or ("fp32,bf16" if res["auto_precision"] == "bf16" else "fp32")).split(",")
    if "bf16" not in precisions:
        print(f"bf16 training step not timed (its matmul peak here is {peak['bf16']} GFLOP/s; "
              f"--precisions fp32,bf16 times it anyway)", flush=True)

    presets = [("tiny", 4 if q else args.tiny_batch)] + ([] if q else [("S", args.s_batch)])
    for preset, batch in presets:
        for prec in precisions:
            r = train_step_speed(preset, batch, args.flow_copies, prec, device,
                                 steps if preset == "tiny" else min(steps, args.s_steps))
            key = f"{preset}_train_{prec}"
            res[key + "_img_per_s"], res[key + "_gflops"] = (round(r["img_per_s"], 2),
                                                             round(r["gflops"], 1))
            res[key + "_frac_of_best_peak"] = float(f"{r['gflops'] / best_peak:.3g}")  # AMX: ~0.01
            print(f"train step {preset:>4} {prec}: batch {batch}, K={args.flow_copies}, "
                  f"{r['step_ms']:.0f} ms, {r['img_per_s']:.2f} img/s, "
                  f"{r['gflop_per_img']:.2f} GFLOP/img -> {r['gflops']:.1f} GFLOP/s = "
                  f"{r['gflops'] / peak[prec]:.0%} of the {prec} matmul peak, "
                  f"{r['gflops'] / best_peak:.0%} of the best peak", flush=True)
    best = max(res[f"tiny_train_{p}_gflops"] for p in precisions)
    res["tiny_train_peak_fraction"] = float(f"{best / best_peak:.3g}")  # 3 significant digits

    n = 16 if q else 64
    res["sampler_img_per_s"], res["sampler_nfe"] = sampler_speed(device, n, 5 if q else 25, 2.0)
    res["sampler_img_per_s"] = round(res["sampler_img_per_s"], 1)
    print(f"sampler: tiny, Heun {5 if q else 25} steps, CFG 2 -> NFE {res['sampler_nfe']}, "
          f"{res['sampler_img_per_s']} img/s ({n} images)", flush=True)

    net = fid.InceptionV3(pretrained=False).to(device)
    x = torch.rand(4 if q else 16, 3, 32, 32, device=device)
    with torch.no_grad():
        res["fid_features_img_per_s"] = round(len(x) / timed(lambda: net(x), device, 1,
                                                             1 if q else 2), 2)
    print(f"FID-Inception features: {res['fid_features_img_per_s']} img/s "
          f"(299 px, batch {len(x)})", flush=True)

    dim = 256 if q else 2048
    t_ours, t_ref, rel = frechet_times(dim, 2 * dim)
    res.update(frechet_dim=dim, frechet_ours_s=round(t_ours, 3), frechet_sqrtm_s=round(t_ref, 3),
               frechet_speedup=round(t_ref / t_ours, 2), frechet_rel_diff=float(f"{rel:.2e}"))
    print(f"Fréchet distance, {dim}-d: ours {t_ours:.2f} s, sqrtm {t_ref:.2f} s "
          f"({t_ref / t_ours:.1f}x), relative difference {rel:.1e}", flush=True)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
