"""
Train UNITE: one Generative Encoder (GE) tokenizes and denoises, plus a ViT decoder, in one stage.

    python train.py                                    # tiny preset, built-in shapes data, CPU
    python train.py --data cifar10 --max-steps 20000   # CIFAR-10 (downloaded once to the cache)
    python train.py --model B --plan                   # the paper run's memory per GPU, no GPU
    torchrun --nproc_per_node=8 train.py --model B --data /imagenet/train   # the paper's setting

One training step (model.UNITE.forward inside optim.train_step); the two passes share the GE:

    image ─> GE.tokenize ─> z0 ─> noise-aug ─> decoder ─> x_hat ─> L1 (+ LPIPS) ──────────┐
                            │                                                             ├─> loss
                            └─> stop-grad ─> K copies of z_t ─> GE ─> x-pred ─> flow MSE ─┘
                                             z_t = t z0 + (1 - t) eps

The flow loss reaches the GE only through the denoising pass (--no-stopgrad lets it reach the
tokenizer). Run settings default to the paper's for S/B/L/XL, as the released code runs them, and to
a CPU budget for `tiny` (the tables PAPER_RUN and TINY_RUN below; --help prints both). Every random
draw of a step is keyed by (seed, step, global sample) (model.step_noise), so a run gives the same
weights on 1 process or N processes at the same global batch, and `--resume` continues exactly.
"""
import argparse
import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (StopCheck, UserError, all_mean, autocast, get_dataset, load_checkpoint,
                  make_loader, open_log, resume_file, run_main, save_checkpoint, save_grid,
                  setup_run, split_batch)
from model import PRESETS, UNITE, count_params, generate, l1_loss, make_config, step_noise
from perceptual import LPIPS, load_lpips, lpips_loss
from vae import TwoStage, VAEConfig, latent_tokens_config
from optim import lr_at, make_optimizers, train_step

# Run defaults, one table per preset. Paper presets: A1 Tab. 8 + the released code, as it runs.
# tiny: a CPU budget (docs/experiments.md has every measurement behind these choices):
#  - up to 3000 steps of batch 32, or 440 s of wall clock when no --max-steps / --epochs is given,
#    so the whole run ends within 10 minutes on a 2-core CPU; the flat lr after warmup makes any
#    stop a clean one, and the EMA does the averaging. Batch 32 learned more per image than 64 at
#    equal compute.
#  - CFG 3: the FD-best scale. Stronger guidance pushes each class away from a weak unconditional
#    model's blobs and rounds the squares.
#  - K = 1 flow copy, recon weight 30 (model.py's preset): K = 2 at equal time, and recon weights
#    10 / 100, were within the seed spread.
# The paper presets' schedule is the one the released code RUNS, not its config's numbers:
# configs/imagenet.yaml says warmup 20 epochs, hold to 30, cosine to 0.5x by 50, but main_train.py
# converts epochs to steps with len(loader) (micro-batches per rank) while engines/train.py steps
# the scheduler once per optimizer step (grad accumulation 2): the run warms up to epoch 40, holds
# to 60 and reaches 0.5x at epoch 100.
# Micro-batch: the released 64 per GPU for S/B (8 x 64 x 2 accum = 1024); 16 for L/XL so they fit
# 80 GB (python train.py --model L --plan).
PAPER_RUN = dict(data=None, batch_size=1024, micro_batch=64, lr=None, epochs=240, max_steps=None,
                 ema=0.9978, ema_warmup=False,
                 warmup_epochs=40, hold_epochs=60, decay_epochs=100, min_lr_frac=0.5,
                 flow_copies=14, lpips=True, sampler="dopri5", sample_steps=50, cfg_scale=3.4,
                 precision="auto", time_budget=0, eval_every=-1)
TINY_RUN = dict(data="shapes", batch_size=32, micro_batch=0, lr=3e-3, epochs=None, max_steps=3000,
                ema=0.99, ema_warmup=True,
                warmup_epochs=0.1, hold_epochs=0, decay_epochs=None, min_lr_frac=1.0,
                flow_copies=1, lpips=False, sampler="heun", sample_steps=25, cfg_scale=3.0,
                precision="auto", time_budget=440, eval_every=1000)
LARGE_MICRO_BATCH = {"L": 16, "XL": 16}


class DefaultsHelp(argparse.RawTextHelpFormatter):
    """--help shows every default: a flag set per preset shows both tables (TINY_RUN, PAPER_RUN)."""

    def _get_help_string(self, action):
        h, k = action.help, action.dest
        if k in PAPER_RUN and k != "lr":
            paper = f"S/B/L/XL {PAPER_RUN[k]}"
            if k == "micro_batch":
                paper = f"S/B {PAPER_RUN[k]}, L/XL {LARGE_MICRO_BATCH['L']}"
            return h + f" (default: tiny {TINY_RUN[k]}; {paper})"
        if action.default not in (None, False, "", argparse.SUPPRESS):
            return h + " (default: %(default)s)"
        return h


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=DefaultsHelp)
    # model and data
    p.add_argument("--model", default="tiny", help="preset: tiny (CPU, 32px), S, B, L, XL (256px)")
    p.add_argument("--data", default=None,
                   help="shapes | cifar10 | path to an ImageFolder or flat image folder")
    p.add_argument("--out-dir", default="out", help="checkpoint, log, sample grid")
    p.add_argument("--flow-copies", type=int, default=None, help="K noised copies per image")
    p.add_argument("--separate", action="store_true",
                   help="separate tokenizer/denoiser weights (Tab. 7a)")
    p.add_argument("--stopgrad", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-stopgrad: the flow loss also reaches the tokenizer (Tab. 7a)")
    p.add_argument("--flow-chunk", type=int, default=3,
                   help="flow copies per denoiser forward (released: 3)")
    p.add_argument("--grad-checkpoint", default="auto", choices=["auto", "off", "flow", "all"],
                   help="recompute GE blocks in backward: the denoising pass (flow), both passes "
                   "(all);\nauto = flow when K > 4, as the released code")
    p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=None,
                   help="L_recon = L1 + --lpips-weight x VGG-LPIPS (paper presets: on; tiny: off, "
                   "L1 x 30)")
    p.add_argument("--lpips-weight", type=float, default=1.0, help="weight of LPIPS in L_recon")
    p.add_argument("--tokenizer", default="",
                   help="two-stage baseline: a sendvae.py checkpoint; the GE trains "
                   "denoise-only (a SiT) on its frozen VAE's latents")
    p.add_argument("--latent-patch", type=int, default=None,
                   help="--tokenizer: latent patch p (default: 256 tokens at 256 px: f8 2, f16 1; "
                   "tiny 1)")
    p.add_argument("--latent-stats-images", type=int, default=2000,
                   help="images (drawn at random) for the --tokenizer latent mean/std")
    # optimisation
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch = micro x accum x world")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="per-process micro-batch (0: batch / processes)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak lr (default: tiny 3e-3; S/B/L/XL 1e-4 x batch / 384, as released)")
    p.add_argument("--optimizer", default="muon", choices=["muon", "adamw"],
                   help="muon: torch.optim.Muon on 2-D weights + AdamW on the rest (released code)")
    p.add_argument("--epochs", type=float, default=None, help="length in epochs")
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--time-budget", type=float, default=None,
                   help="also stop after this many seconds of the loop (0 = off; tiny: 440 s of "
                   "wall clock unless --max-steps or --epochs is given, a safety net so the "
                   "default run ends in 10 minutes on a slower CPU)")
    p.add_argument("--budget-clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: count this process's CPU seconds (fair equal-budget comparisons on "
                   "a shared machine)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="linear lr warmup")
    p.add_argument("--hold-epochs", type=float, default=None,
                   help="constant lr after warmup until here")
    p.add_argument("--decay-epochs", type=float, default=None,
                   help="cosine to min-lr-frac by here (None: the end of the run)")
    p.add_argument("--min-lr-frac", type=float, default=None,
                   help="lr at the end of the cosine / peak")
    p.add_argument("--grad-clip", type=float, default=3.0, help="gradient-norm clip")
    p.add_argument("--ema", type=float, default=None, help="EMA decay per optimizer step")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="cap the EMA decay at (1+step)/(10+step) (tiny: on; released code: off)")
    p.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 on CUDA and on CPUs with bf16 units, else fp32")
    # run
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--seed", type=int, default=0, help="init, data order, noise, samples")
    p.add_argument("--resume", default="",
                   help="'' (fresh) | auto (out-dir/ckpt.pt if present) | PATH")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers (default: 0 in-memory, 8 folder)")
    p.add_argument("--log-every", type=int, default=50, help="log line every N steps")
    p.add_argument("--sample-every", type=int, default=500,
                   help="sample grid PNG every N steps (-1 = off)")
    p.add_argument("--ckpt-every", type=int, default=500,
                   help="checkpoint every N steps (-1 = only at the end)")
    p.add_argument("--plan", action="store_true",
                   help="print the per-GPU memory plan of this run and exit "
                   "(no data, no GPU, no training)")
    p.add_argument("--plan-gpus", type=int, default=8, help="processes the --plan assumes")
    p.add_argument("--gpu-gb", type=float, default=80.0,
                   help="GPU memory the --plan checks against")
    # sampling (stored in the checkpoint; sample.py uses them by default)
    p.add_argument("--sampler", default=None, choices=["dopri5", "heun", "euler"],
                   help="dopri5: adaptive, the paper's numbers (paper presets); heun: fixed steps "
                   "(tiny)")
    p.add_argument("--sample-steps", type=int, default=None, help="heun/euler steps")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--cfg-min-t", type=float, default=0.1,
                   help="guidance only for t > this (t=1 clean)")
    # evaluation
    p.add_argument("--eval-samples", type=int, default=500,
                   help="generated images for the end-of-run figure")
    p.add_argument("--val-data", default=None,
                   help="held-out images for the end-of-run PSNR (default: the test split of "
                   "shapes/cifar10;\nnone for a folder unless given, e.g. /imagenet/val)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="every N steps on shapes: FD-shapes-200 and shape_acc of the EMA, logged,\n"
                   "and the best EMA kept as ckpt_best.pt (-1 = off)")
    p.add_argument("--fid-ref", default="",
                   help="reference stats .npz for FID during training (fid.py)")
    p.add_argument("--fid-every", type=int, default=-1,
                   help="FID every N steps against --fid-ref (-1 = off)")
    p.add_argument("--fid-samples", type=int, default=10000, help="samples per FID")
    p.add_argument("--inception", default=None,
                   help="FID Inception weight file (default: cache dir / download)")
    args = p.parse_args(argv)
    if args.model not in PRESETS:
        raise UserError(f"unknown --model {args.model!r}; choose one of {', '.join(PRESETS)}")
    tiny = args.model in ("tiny", "micro")
    if tiny and args.time_budget is None and (args.max_steps, args.epochs) != (None, None):
        # the 10-minute guard is for the default run; an asked-for length runs in full
        args.time_budget = 0
    if args.micro_batch is None and args.model in LARGE_MICRO_BATCH:
        args.micro_batch = LARGE_MICRO_BATCH[args.model]
    for k, v in (TINY_RUN if tiny else PAPER_RUN).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lr is None:
        args.lr = 1e-4 * args.batch_size / 384  # the released base lr scaling
    if args.plan:
        return args
    if args.data is None:
        raise UserError(f"--data is required for --model {args.model} "
                        f"(an ImageFolder path, or cifar10)")
    return args


def build_config(args, num_classes, **overrides):
    return make_config(args.model, num_classes=num_classes, flow_copies=args.flow_copies,
                       flow_chunk=args.flow_chunk, separate=args.separate,
                       stopgrad=args.stopgrad, grad_checkpoint=args.grad_checkpoint,
                       **overrides)


def load_tokenizer(path):
    """(VAEConfig, VAE weights, VFM label) of a sendvae.py checkpoint (--tokenizer)."""
    ck = load_checkpoint(path, "sendvae.py ", keys=("vae_config", "vae"))
    return VAEConfig(**ck["vae_config"]), ck["vae"], ck.get("vfm", "?")


# -----------------------------------------------------------------------------
# evaluation: sample grids, PSNR, FD / FID on generated images sharded over ranks

def sample_kwargs(args):
    return dict(steps=args.sample_steps, method=args.sampler, cfg_scale=args.cfg_scale,
                cfg_min_t=args.cfg_min_t)


def sample_grid(ema, num_classes, args, path, per_class=8):
    """One row per class (up to 10 classes), fixed noise, EMA weights."""
    rows = min(num_classes, 10)
    idx = [r * per_class + j for r in range(rows) for j in range(per_class)]
    labels = [r for r in range(rows) for _ in range(per_class)]
    x, _ = generate(ema, idx, num_classes, seed=args.seed, labels=labels, **sample_kwargs(args))
    save_grid(x, path, per_class)


@torch.no_grad()
def psnr(ema, ds, device, n=256, seed=0):
    """Mean PSNR of 8-bit EMA reconstructions (the released protocol, fid.psnr_8bit) of n images
    drawn at random (seeded) from the whole set: the first n of a class-sorted folder would be one
    class."""
    import fid
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    x = torch.stack([ds[i][0] for i in idx]).to(device)
    rec = torch.cat([ema.reconstruct(x[i:i + 64]) for i in range(0, len(x), 64)])
    return fid.psnr_8bit(rec, x).mean().item()


def sample_features(ema, feature_fn, n, num_classes, args, rank, world):
    """Features of n 8-bit EMA samples, generated sharded over ranks; every rank gets all of
    them."""
    import fid
    make = lambda idx: generate(ema, idx, num_classes, seed=args.seed + 1, **sample_kwargs(args))[0]
    return fid.generated_features(make, feature_fn, n, 100, rank, world)


def fd_shapes_of_samples(ema, n, num_classes, args, rank, world):
    """FD-shapes: Fréchet distance in the feature space of a small CNN trained on the built-in data
    (fid.py). Not FID: the Inception weights cannot be had offline. Also returns shape_acc, the
    share of samples whose shape the same CNN's shape head classifies as the class they were
    generated for: a direct measure of 'recognisable samples' (the CNN's accuracy on real test
    images is its ceiling)."""
    import fid
    # trained once, cached
    net = fid.rank0_first(fid.load_shapes_net).to(next(ema.parameters()).device)
    feats = sample_features(ema, net, n, num_classes, args, rank, world)
    mu, sigma = fid.feature_stats(feats)
    # in gather order
    labels = [i % num_classes for r in range(world) for i in fid.shard(n, r, world)]
    pred = net.heads["shape"](
        torch.from_numpy(feats).float().to(next(net.parameters()).device)).argmax(1).cpu()
    acc = (pred == torch.tensor(labels)).float().mean().item()
    # FD vs the 10k-image test split
    return fid.frechet_distance(mu, sigma, net.ref_mu, net.ref_sigma), acc


def fid_of_samples(ema, n, num_classes, args, rank, world):
    """FID-n of 8-bit EMA samples against --fid-ref (pytorch-fid protocol, fid.py)."""
    import fid
    net = fid.load_inception(args.inception, next(ema.parameters()).device)
    mu, sigma = fid.feature_stats(sample_features(ema, net, n, num_classes, args, rank, world))
    return fid.frechet_distance(mu, sigma, *fid.load_stats(args.fid_ref))


# -----------------------------------------------------------------------------
# --plan: the per-GPU memory of a run, counted without a GPU

def saved_bytes(run, model):
    """Bytes autograd holds for backward after run()'s forward: the distinct storages packed through
    saved_tensors_hooks, less the parameters and buffers (states, counted apart), plus the inputs
    that a checkpointed GE block keeps (its own saved tensors are recomputed in backward; forward
    pre-hooks see them, and where the block is not checkpointed the same storages are saved
    anyway)."""
    import model as M
    own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    held = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in own:
            held[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t
    hooks = [m.register_forward_pre_hook(lambda m, a: [keep(t) for t in a] and None)
             for m in model.modules() if isinstance(m, M.Block)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    return sum(held.values())


def memory_plan(args, fake=True):
    """The per-GPU memory of `args`'s run at --plan-gpus processes, in bytes: states from the
    parameter lists; activations counted on the step itself, built with fake tensors (shapes only,
    no compute: FakeTensorMode) under bf16 autocast, with attention through SDPA's fused kernel as
    on a GPU (it saves q, k, v, out and the log-sum-exp, not the T x T matrix). A lower bound: no
    allocator fragmentation, no CUDA context, no cuDNN/cuBLAS workspaces. fake=False runs it for
    real (tests)."""
    import model as M
    from torch._subclasses.fake_tensor import FakeTensorMode
    world = args.plan_gpus
    micro, accum, _ = split_batch(args.batch_size, args.micro_batch, world)
    cfg = build_config(args, 6 if args.model in ("tiny", "micro") else 1000)
    bf16 = args.precision != "fp32"
    M.CPU_BF16_MATH_ATTENTION = False
    try:
        with FakeTensorMode() if fake else contextlib.nullcontext():
            lp = LPIPS() if args.lpips else None
            model = UNITE(cfg, recon_loss=recon_loss_fn(args, lp)).train()
            opts = make_optimizers(model, args.lr, args.optimizer == "muon")
            x = torch.rand(micro, 3, cfg.image_size, cfg.image_size)
            noise = M.draw_noise(cfg, micro)
            y = torch.randint(0, cfg.num_classes, (micro,))
            with autocast(torch.device("cpu"), "bf16" if bf16 else "fp32"):
                act = saved_bytes(lambda: model(x, y, noise), model)
                recompute = 0
                if M.checkpoint_flow(cfg):
                    # backward recomputes one checkpointed block at a time: its saved tensors,
                    # for one chunk of flow copies
                    blk, T = model.encoder.blocks[-1], cfg.num_tokens + cfg.in_context_len
                    z = torch.randn(micro * cfg.flow_chunk, T, cfg.enc_width, requires_grad=True)
                    c = torch.randn(micro * cfg.flow_chunk, cfg.enc_width)
                    rope = (model.encoder.rope_ic_cos[:T], model.encoder.rope_ic_sin[:T])
                    recompute = saved_bytes(lambda: blk(z, c, rope), model)
    finally:
        M.CPU_BF16_MATH_ATTENTION = True
    n = lambda ps: sum(p.numel() for p in ps)
    adam = n(opts[0].param_groups[0]["params"])
    muon = n(opts[1].param_groups[0]["params"]) if len(opts) > 1 else 0
    params = adam + muon
    states = dict(weights=4 * params, grads=4 * params, ddp_buckets=4 * params if world > 1 else 0,
                  adamw=8 * adam, muon=4 * muon, ema=4 * params,
                  lpips=4 * n(lp.parameters()) if lp else 0)  # VGG16 trunk + heads, frozen fp32
    st = sum(states.values())
    peak = st + act + recompute
    return dict(model=args.model, gpus=world, params_m=round(params / 1e6, 2), micro_batch=micro,
                accum_steps=accum, flow_copies=cfg.flow_copies, flow_chunk=cfg.flow_chunk,
                grad_checkpoint=cfg.grad_checkpoint, checkpoint_flow=M.checkpoint_flow(cfg),
                lpips=bool(args.lpips), precision="bf16" if bf16 else "fp32",
                activation_bytes=act, states_gb=round(st / 1e9, 2),
                activation_gb=round(act / 1e9, 2), recompute_gb=round(recompute / 1e9, 2),
                peak_gb_per_gpu=round(peak / 1e9, 2), fits=peak / 1e9 <= args.gpu_gb,
                **{f"{k}_gb": round(v / 1e9, 2) for k, v in states.items()})


def print_plan(args):
    plan = memory_plan(args)
    print(f"UNITE-{args.model} on {plan['gpus']} GPUs: {plan['params_m']}M trained parameters | "
          f"global batch {args.batch_size} = {plan['micro_batch']} x {plan['accum_steps']} accum x "
          f"{plan['gpus']} | K = {plan['flow_copies']} flow copies in chunks of "
          f"{plan['flow_chunk']}, denoising pass "
          f"{'checkpointed' if plan['checkpoint_flow'] else 'not checkpointed'} (--grad-checkpoint "
          f"{plan['grad_checkpoint']}) | {plan['precision']}, "
          f"LPIPS {'on' if plan['lpips'] else 'off'}")
    print("  states: " + ", ".join(f"{k} {plan[k + '_gb']:.2f}" for k in
                                   ("weights", "grads", "ddp_buckets", "adamw", "muon", "ema",
                                    "lpips"))
          + f" = {plan['states_gb']:.2f} GB")
    print(f"  activations saved for backward (micro-batch {plan['micro_batch']}): "
          f"{plan['activation_gb']:.2f} GB"
          f" + one checkpointed block recomputed in backward: {plan['recompute_gb']:.2f} GB")
    print(f"  peak per GPU >= {plan['peak_gb_per_gpu']:.2f} GB of {args.gpu_gb:g} GB: "
          + ("fits" if plan["fits"] else
             "does NOT fit: lower --micro-batch or use --grad-checkpoint all"))
    print(json.dumps(plan))


def recon_loss_fn(args, lpips=None):
    """L_recon: L1 (the model's default), or L1 + w * LPIPS as the released code (lpips_loss says
    how)."""
    if not args.lpips:
        return l1_loss
    return lambda recon, x: l1_loss(recon, x) + args.lpips_weight * lpips_loss(lpips, recon, x)


def build_model(args, cfg, ds, tok, device):
    """UNITE (or, with --tokenizer, the two-stage SiT on a frozen VAE) with its seeded init."""
    lpips = load_lpips(device) if args.lpips and not tok else None  # before the seed: same init
    torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts it)
    if not tok:
        return UNITE(cfg, recon_loss=recon_loss_fn(args, lpips)).to(device)
    raw = TwoStage(cfg, tok[0]).to(device)
    raw.decoder.vae.load_state_dict(tok[1])
    # per-channel latent mean/std, once, stored in the checkpoint: from a seeded random sample of
    # the whole training set (the first n of a class-sorted folder would be one or two classes)
    n = min(args.latent_stats_images, len(ds))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    raw.decoder.fit_latent_stats(torch.stack([ds[i][0] for i in idx[j:j + 100]]).to(device)
                                 for j in range(0, n, 100))
    return raw


def load_state(path, cfg, raw, ema, opts):
    """Resume raw, EMA and optimizers from a train.py checkpoint; returns (step, evals)."""
    ck = load_checkpoint(path, "train.py ", keys=("config", "model", "ema", "optimizer", "step"))
    if ck["config"] != asdict(cfg):
        raise UserError(f"{path} was trained with another model config; use another --out-dir")
    raw.load_state_dict(ck["model"])
    ema.load_state_dict(ck["ema"])
    for o, s in zip(opts, ck["optimizer"]):
        o.load_state_dict(s)
    return ck["step"], ck.get("evals", [])


def micro_batches(loader, cfg, args, step, accum, world, rank, device, hflip):
    """This rank's (x, y, noise) for each micro-step of optimizer step `step`. Micro-step m on rank
    r holds rows (m * world + r) * micro ... of the global batch, as the data; their noise is keyed
    by (seed, step, row), so the run is the same at any world size and accumulation."""
    out = []
    for m in range(accum):
        x, y = (t.to(device, non_blocking=True) for t in next(loader))
        lo = (m * world + rank) * args.micro_batch
        noise = step_noise(cfg, args.seed, step, range(lo, lo + args.micro_batch), device)
        if hflip:
            x = torch.where(noise["flip"][:, None, None, None], x.flip(-1), x)
        out.append((x, y, noise))
    return out


def end_of_run(ema, cfg, args, rank, world, device, p0, evals):
    """The run's figures on the EMA (the JSON's keys): PSNR on held-out images, FD-shapes and shape
    accuracy of samples (shapes), FID against --fid-ref; and the final sample grid. With periodic
    evaluations, the best one (the EMA in ckpt_best.pt) is reported too, and a final shape_acc far
    below it is said in one line: a run can end inside a short instability of the denoiser's
    near-clean end (t > 0.9, trained on ~0.2% of flow samples; docs/experiments.md)."""
    res = {}
    if rank == 0:
        sample_grid(ema, cfg.num_classes, args, os.path.join(args.out_dir, "samples.png"))
        val = args.val_data or (args.data if args.data in ("shapes", "cifar10") else None)
        if val:  # held-out images: the test split of shapes / cifar10, or --val-data
            res["psnr"] = round(psnr(ema, get_dataset(val, cfg.image_size, "test"), device), 2)
        else:
            p0("no --val-data: end-of-run PSNR skipped (it is measured on held-out images only)")
    if args.data == "shapes" and args.eval_samples > 1:
        fd, acc = fd_shapes_of_samples(ema, args.eval_samples, cfg.num_classes, args, rank, world)
        res[f"fd_shapes_{args.eval_samples}"], res["shape_acc"] = round(fd, 3), round(acc, 3)
        best = min(evals, key=lambda e: e["fd_shapes_200"], default=None)
        if best:
            res["best_eval"] = best
        if best and acc < best["shape_acc"] - 0.15:
            p0(f"warning: the final EMA's shape_acc {acc:.3f} is far below {best['shape_acc']:.3f} "
               f"at step {best['step']}: the run probably ended in a transient instability; "
               f"{args.out_dir}/ckpt_best.pt holds the step-{best['step']} EMA")
    if args.fid_ref:
        res[f"fid_{args.fid_samples}"] = round(
            fid_of_samples(ema, args.fid_samples, cfg.num_classes, args, rank, world), 3)
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        return print_plan(args)
    rank, world, device, precision = setup_run(args.device, args.precision)
    p0 = open_log(args.out_dir, rank)

    image_size = make_config(args.model).image_size
    ds = get_dataset(args.data, image_size, "train")
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if tok and image_size % tok[0].factor:
        raise UserError(f"--tokenizer: {image_size} px images do not divide by the VAE's "
                        f"factor {tok[0].factor}")
    # two-stage: the VAE latent (B, C, h, w) becomes (h / p)(w / p) GE tokens of C p^2 channels
    try:
        tok_cfg = latent_tokens_config(tok[0], image_size, args.latent_patch) if tok else {}
    except ValueError as e:
        raise UserError(f"--latent-patch: {e}") from None
    cfg = build_config(args, ds.num_classes, **tok_cfg)
    if ds.num_classes == 1:
        args.cfg_scale = 1.0  # a flat folder is unconditional: nothing to guide
    args.micro_batch, accum, steps_per_epoch = split_batch(args.batch_size, args.micro_batch, world,
                                                            len(ds))
    if args.fid_ref and not os.path.isfile(args.fid_ref):
        raise UserError(f"--fid-ref {args.fid_ref}: file not found "
                        f"(make one with: python fid.py DATA --save-stats)")
    total = args.max_steps or int(args.epochs * steps_per_epoch)
    # lr schedule in optimizer steps: warmup, hold, end of the cosine (default: the end of the run)
    schedule = (args.warmup_epochs * steps_per_epoch, args.hold_epochs * steps_per_epoch,
                total if args.decay_epochs is None else args.decay_epochs * steps_per_epoch,
                args.min_lr_frac)

    raw = build_model(args, cfg, ds, tok, device)
    ema = copy.deepcopy(raw).float().eval().requires_grad_(False)
    opts = make_optimizers(raw, args.lr, args.optimizer == "muon",
                           ns_dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    step, evals = 0, []  # evals: the periodic EMA evaluations (--eval-every), kept across --resume
    resume = resume_file(args.resume, args.out_dir)
    if resume:
        step, evals = load_state(resume, cfg, raw, ema, opts)
        p0(f"resumed from {resume} at step {step}")
    torch.manual_seed(args.seed + rank + 1_000_003 * step)  # per rank: anything not keyed per row
    model = (DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)
             if world > 1 else raw)
    loader = make_loader(ds, args.batch_size, args.seed, step, accum, world, rank, device,
                         args.num_workers)

    p0(f"UNITE-{args.model}: GE {count_params(raw.encoder) / 1e6:.2f}M, "
       f"decoder {count_params(raw.decoder) / 1e6:.2f}M"
       + (f", separate denoiser {count_params(raw.denoiser_) / 1e6:.2f}M" if cfg.separate else "")
       + f" | data {args.data}: {len(ds)} images, {ds.num_classes} classes | device {device}, "
         f"{precision}, world {world} | batch {args.batch_size} = {args.micro_batch} x {accum} "
         f"accum x {world} | "
         f"{total} steps ({steps_per_epoch} per epoch) | lr {args.lr:.2e} {args.optimizer}")
    if tok:
        p0(f"two-stage: GE denoise-only (a SiT) on the frozen VAE of {args.tokenizer} "
           f"(VFM: {tok[2]}); the decoder above is that VAE | latent mean "
           f"{raw.decoder.latent_mean.mean():.3f} std {raw.decoder.latent_std.mean():.3f}"
           f" (channel averages, {min(args.latent_stats_images, len(ds))} images)")
    p0("args: " + json.dumps(vars(args)))

    def checkpoint(name="ckpt.pt"):  # atomic (data.py); every rank waits for it
        if rank == 0:
            save_checkpoint(os.path.join(args.out_dir, name), {
                "model": raw.state_dict(), "ema": ema.state_dict(),
                "optimizer": [o.state_dict() for o in opts],
                "step": step, "config": asdict(cfg), "args": vars(args), "evals": evals,
                "class_names": list(ds.class_names), "data": args.data,
                **({"vae_config": asdict(tok[0]), "tokenizer": args.tokenizer} if tok else {})})
        if world > 1:
            dist.barrier()

    from tqdm import tqdm
    # progress bar on a terminal only: in log files and CI the per-interval lines say the same
    bar = tqdm(total=total, initial=step, disable=rank != 0 or not sys.stderr.isatty(),
               dynamic_ncols=True)
    stop = StopCheck(args.time_budget, args.budget_clock, device, world)
    t0, seen, bad, stats, step_start = time.time(), 0, 0, torch.zeros(3, device=device), step
    while step < total and not stop():
        # ------------------------------------------------ one optimization step
        lr = lr_at(step, args.lr, *schedule)
        batches = micro_batches(loader, cfg, args, step, accum, world, rank, device, ds.hflip)
        norm, st, bad = train_step(model, opts, ema, batches, lr=lr, step=step,
                                   grad_clip=args.grad_clip, ema_decay=args.ema,
                                   ema_warmup=args.ema_warmup, precision=precision, bad=bad)
        stats += st
        if bad:
            p0(f"step {step}: non-finite loss/gradient, step skipped")
        step, seen = step + 1, seen + args.batch_size
        bar.update(1)
        # ------------------------------------------------ once in a while: log, sample, save, eval
        if step % args.log_every == 0 or step == total:
            n = (step - 1) % args.log_every + 1
            l, r, f = (all_mean(stats, world) / n).tolist()  # a sync point: only at log time
            p0(f"step {step} | loss {l:.4f} | recon {r:.4f} | flow {f:.4f} | "
               f"grad {norm.item():.3f} | lr {lr:.2e} | {seen / (time.time() - t0):.1f} img/s")
            t0, seen, stats = time.time(), 0, torch.zeros(3, device=device)
        if args.sample_every > 0 and step % args.sample_every == 0 and rank == 0:
            sample_grid(ema, cfg.num_classes, args, os.path.join(args.out_dir, "samples.png"))
        if args.ckpt_every > 0 and step % args.ckpt_every == 0:
            checkpoint()
        if args.eval_every > 0 and step % args.eval_every == 0 and args.data == "shapes":
            # a cheap look at the EMA samples while training: a collapse shows here, and the best
            # EMA so far (lowest FD-shapes) is kept as ckpt_best.pt beside the last one
            fd, acc = fd_shapes_of_samples(ema, 200, cfg.num_classes, args, rank, world)
            evals.append({"step": step, "fd_shapes_200": round(fd, 2), "shape_acc": round(acc, 3)})
            p0(f"step {step} | eval EMA: FD-shapes-200 {fd:.1f} | shape_acc {acc:.3f}")
            if fd < min((e["fd_shapes_200"] for e in evals[:-1]), default=float("inf")):
                checkpoint("ckpt_best.pt")
        if args.fid_every > 0 and step % args.fid_every == 0 and args.fid_ref:
            f = fid_of_samples(ema, args.fid_samples, cfg.num_classes, args, rank, world)
            p0(f"step {step} | FID-{args.fid_samples} {f:.3f} (EMA, {args.sampler}-"
               f"{args.sample_steps}, cfg {args.cfg_scale} for t>{args.cfg_min_t})")
    bar.close()
    train_s, train_cpu_s = time.time() - stop.t0, time.process_time() - stop.cpu0
    if stop.out_of_time and not stop.sigterm:
        p0(f"--time-budget {args.time_budget:g} s ({args.budget_clock} clock) reached: "
           f"stopped at step {step} of {total}")
    checkpoint()
    if stop.sigterm:
        p0(f"SIGTERM: saved {args.out_dir}/ckpt.pt at step {step}, exiting")
        return
    # ------------------------------------------------ end of run: figures, last stdout line = JSON
    res = {"model": args.model, "data": args.data, "steps": step, "wall_s": round(train_s, 1),
           "cpu_s": round(train_cpu_s, 1),
           "img_per_s": round((step - step_start) * args.batch_size / max(train_s, 1e-9), 1),
           **end_of_run(ema, cfg, args, rank, world, device, p0, evals)}
    if evals:
        res["evals"] = evals
    res["total_s"] = round(time.time() - stop.t0, 1)
    p0(f"wrote {args.out_dir}/ckpt.pt and {args.out_dir}/samples.png")
    p0(json.dumps(res))


if __name__ == "__main__":
    run_main(main)
