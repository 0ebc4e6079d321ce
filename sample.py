"""
Sample from a UNITE checkpoint with its EMA weights and the sampling settings stored in it.

    python sample.py out/ckpt.pt                         # out/ckpt_samples.png: one row per class
    python sample.py out/ckpt.pt --cfg-scale 3 --steps 50 --sampler heun
    torchrun --nproc_per_node=8 sample.py ckpt.pt --num-samples 50000 --out-dir samples/   # PNGs for fid.py

Sample i always gets the same noise (seeded by --seed and i) and the label i % num_classes (class-balanced),
so the images do not depend on the batch size or the number of GPUs.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from data import DataError, error_line, load_checkpoint, save_grid, save_png
from model import UNITE, TwoStage, UniteConfig, VAEConfig, generate


def load_model(path, device, use_ema=True):
    """(model in eval mode, checkpoint dict). Checkpoints are plain data: weights_only loading."""
    ck = load_checkpoint(path, "UNITE ", keys=("config", "ema", "model"))
    try:
        cfg = UniteConfig(**ck["config"])  # a two-stage checkpoint (train.py --tokenizer) carries its VAE
        model = TwoStage(cfg, VAEConfig(**ck["vae_config"])) if "vae_config" in ck else UNITE(cfg)
        model.load_state_dict(ck["ema" if use_ema else "model"])
    except Exception as e:
        raise DataError(f"{path} is not a UNITE checkpoint of this code ({type(e).__name__}: {e})") from None
    return model.to(device).eval(), ck


def main(argv=None):
    p = argparse.ArgumentParser(description="sample a UNITE checkpoint")
    p.add_argument("ckpt")
    p.add_argument("--steps", type=int, default=None, help="default: the checkpoint's --sample-steps")
    p.add_argument("--sampler", default=None, choices=["heun", "euler"])
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--cfg-min-t", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    # not --n: torchrun's own parser would take it for an abbreviation of --nnodes/--nproc-per-node
    p.add_argument("--num-samples", type=int, default=None, help="number of images (grid default: 8 per class)")
    p.add_argument("--per-class", type=int, default=8, help="grid columns")
    p.add_argument("--out", default=None, help="grid PNG (default: <ckpt>_samples.png)")
    p.add_argument("--out-dir", default=None, help="write individual PNGs 000000.png ... here (for fid.py)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    rank, world = 0, 1
    if "RANK" in os.environ:  # torchrun: shard the sample indices over ranks
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    model, ck = load_model(args.ckpt, args.device, use_ema=not args.raw)
    ta = ck["args"]
    kw = dict(steps=args.steps or ta["sample_steps"], method=args.sampler or ta["sampler"],
              cfg_scale=ta["cfg_scale"] if args.cfg_scale is None else args.cfg_scale,
              cfg_min_t=ta["cfg_min_t"] if args.cfg_min_t is None else args.cfg_min_t)
    K = model.cfg.num_classes
    if K == 1:
        kw["cfg_scale"] = 1.0  # unconditional model: nothing to guide
    card = (f"{'raw' if args.raw else 'EMA'} weights, step {ck['step']}, {kw['method']}-{kw['steps']}, "
            f"cfg {kw['cfg_scale']} for t>{kw['cfg_min_t']} (all channels), seed {args.seed}")

    if args.out_dir:
        n = args.num_samples or 50000
        os.makedirs(args.out_dir, exist_ok=True)
        mine = list(range(rank, n, world))
        from tqdm import tqdm
        for i in tqdm(range(0, len(mine), args.batch_size), disable=rank != 0, file=sys.stderr):
            idx = mine[i:i + args.batch_size]
            x, nfe = generate(model, idx, K, seed=args.seed, **kw)
            for j, img in zip(idx, x):
                save_png(img, os.path.join(args.out_dir, f"{j:06d}.png"))
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        if rank == 0:
            print(f"wrote {n} PNGs to {args.out_dir} | {card} | NFE {nfe}")
            print(json.dumps({"n": n, "out_dir": args.out_dir, **kw, "seed": args.seed, "ema": not args.raw}))
        return
    if rank != 0:
        return
    rows = min(K, 10)
    n = args.num_samples or rows * args.per_class
    labels = [i // args.per_class % K for i in range(n)] if K > 1 else None
    xs, nfe = [], 0
    for i in range(0, n, args.batch_size):
        idx = list(range(i, min(n, i + args.batch_size)))
        x, nfe = generate(model, idx, K, seed=args.seed, labels=labels[i:i + len(idx)] if labels else None, **kw)
        xs.append(x)
    out = args.out or os.path.splitext(args.ckpt)[0] + "_samples.png"
    save_grid(torch.cat(xs), out, args.per_class)
    names = ck.get("class_names") or []
    print(f"wrote {out}: {n} images, rows = classes {names[:rows] if names else list(range(rows))} | {card} | NFE {nfe}")
    print(json.dumps({"out": out, "n": n, "nfe": nfe, **kw, "seed": args.seed, "ema": not args.raw}))


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {error_line(e)}")
