"""
Sample from a UNITE checkpoint with its EMA weights, and evaluate it with the paper's protocol.

    python sample.py out/ckpt.pt                   # out/ckpt_samples.png: one row per class
    python sample.py out/ckpt.pt --cfg-scale 3 --steps 50 --sampler heun
    torchrun --nproc_per_node=8 sample.py ckpt.pt --num-samples 50000 --out-dir samples/  # PNGs
    torchrun --nproc_per_node=8 sample.py ckpt.pt --fid-ref ref.npz --cfg-scales 3.0,3.2,3.4
    torchrun --nproc_per_node=8 sample.py ckpt.pt --fid-ref ref.npz --cfg-search   # released search
    torchrun --nproc_per_node=8 sample.py ckpt.pt --recon-data /imagenet/val       # rFID + PSNR
    python sample.py UNITE-L.pt --model L --fid-ref jit_in256_stats.npz --cfg-search  # authors' .pt
    python sample.py out/ckpt.pt --metric fd-shapes --cfg-scales 2,3,4 --num-samples 600  # offline

Sample i always gets the same noise (seeded by --seed and i) and the label i % num_classes
(class-balanced), so the images do not depend on the batch size or the number of GPUs.

Evaluation follows the released engines/eval.py. Samples are clamped to [0, 1] and made 8-bit by
truncation, as there (fid.to_uint8), and measured in memory: no PNGs are written. The default is
50000 samples, 50 per class. The score is FID by fid.py, with the pytorch-fid protocol. The released
code uses torch-fidelity's Inception: the same weights, but a TF-style resize and (x - 128) / 128
input, so their numbers are close to ours, not equal. Each CFG scale gets one line, the best gets
one line, and a JSON line ends the run ("value" = the best score).
--recon-data reconstructs the first 50000 images of a held-out split, made 8-bit as well. rFID
compares them with the same real images; --fid-ref compares them with that file's statistics
instead. PSNR is taken on the 8-bit images (released evaluate_rfid). Without Inception weights
(offline), --metric fd-shapes measures the built-in shapes data with fid.py's ShapesNet (not FID).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import fid
from data import (FolderDataset, UserError, get_dataset, load_checkpoint, run_main, save_grid,
                  save_png)
from model import UNITE, UniteConfig, generate, make_config
from vae import TwoStage, VAEConfig

# the paper's sampling for the authors' files (A1 App. B, engines/eval.py): dopri5 on a 50-point
# grid, CFG 3.4 (where the released search starts, engines/train.py:22), guidance for 0.1 < t < 1
RELEASED_SAMPLING = dict(sample_steps=50, sampler="dopri5", cfg_scale=3.4, cfg_min_t=0.1)


def is_released(ck):
    """The authors' UNITE-B/L .pt (utils/checkpoint.py save_checkpoint: step, epoch, model, ema,
    optimizers, current_best_cfg_scale, no config), with up_sample_decoder / decoder._orig_mod.*."""
    if not isinstance(ck, dict) or "config" in ck:
        return False
    sd = ck.get("ema", ck.get("model"))
    prefixes = ("encoder.blocks.", "up_sample_decoder.", "decoder._orig_mod.")
    return isinstance(sd, dict) and any(str(k).removeprefix("module.").startswith(prefixes)
                                        for k in sd)  # module.: a DDP-wrapped save


def load_model(path, device, use_ema=True, preset="B"):
    """(model in eval mode, the checkpoint without its weights). Our checkpoints are plain data
    (weights_only loading). official.from_official maps the authors' files onto make_config(preset);
    their sampling defaults ("args") are the paper's."""
    ck = load_checkpoint(path, "UNITE ")
    if is_released(ck):
        from official import from_official  # a wrong preset -> a UserError from there
        weights = ck if use_ema else {"model": ck["model"]}  # it takes "ema", else "model"
        model = from_official(weights, make_config(preset), preset)
        ck = {**ck, "args": dict(RELEASED_SAMPLING), "released": f"UNITE-{preset}"}
    else:
        missing = [k for k in ("config", "ema", "model") if not isinstance(ck, dict) or k not in ck]
        if missing:
            raise UserError(f"{path} is not a UNITE checkpoint (it has no {missing[0]!r}), nor an "
                            f"authors' UNITE-B/L file")
        try:  # a two-stage checkpoint (train.py --tokenizer) carries its VAE
            cfg = UniteConfig(**ck["config"])
            two_stage = "vae_config" in ck
            model = TwoStage(cfg, VAEConfig(**ck["vae_config"])) if two_stage else UNITE(cfg)
            model.load_state_dict(ck["ema" if use_ema else "model"])
        except Exception as e:
            raise UserError(f"{path} is not a UNITE checkpoint of this code "
                            f"({type(e).__name__}: {e})") from None
    # drop weights and optimizer state: an authors' UNITE-L file holds gigabytes of them
    meta = {k: v for k, v in ck.items() if not isinstance(v, dict) or k in ("config", "args")}
    return model.to(device).eval(), meta


def print0(rank, *a):
    if rank == 0:
        print(*a, flush=True)


def from_rank0(value, world):
    """Rank 0's value on every rank: only rank 0 computes the distance, and every rank's adaptive
    search must take the same branch (the released code broadcasts too, engines/eval.py:237-243)."""
    if world > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def adaptive_cfg_search(score_at, start=3.4, max_iterations=7):
    """The released adaptive CFG search (engines/eval.py:304-376), step for step: score
    X = round(start, 1) and X - 0.2 (if > 0) and keep the lower (X on a tie: eval.py:248, strict <),
    then walk in 0.2 steps, down if X - 0.2 won and up otherwise, at most 7 more scales inside
    (0, 10]. Stopping rule (eval.py:361): stop at the first scale whose score is >= the best so far.
    Scales are rounded to 0.1, as there. Returns (best scale, its score). The released loop also
    stops quietly if a scale raises (eval.py:365); here the error propagates."""
    X = round(start, 1)
    best, best_score = X, float("inf")
    for s in [s for s in (X, round(X - 0.2, 1)) if s > 0]:
        score = score_at(s)
        if score < best_score:
            best, best_score = s, score
    direction = -0.2 if best < X else 0.2
    for _ in range(max_iterations):
        nxt = round(best + direction, 1)
        if nxt <= 0 or nxt > 10.0:
            break
        score = score_at(nxt)
        if score >= best_score:
            break
        best, best_score = nxt, score
    return best, best_score


def feature_net(args, device):
    """(feature network, reference (mu, sigma) or None) for --metric and --fid-ref."""
    ref = fid.load_stats(args.fid_ref) if args.fid_ref else None
    if args.metric == "fd-shapes":
        net = fid.rank0_first(fid.load_shapes_net).to(device)  # trained once, cached by rank 0
        if ref is None and not args.recon_data:
            ref = net.ref_mu, net.ref_sigma  # the shapes test split's, cached with the network
        return net, ref
    return fid.load_inception(args.inception, device), ref


def evaluate_generation(model, K, kw, args, rank, world, card):
    """The score of n class-balanced samples at each CFG scale (--cfg-scales, --cfg-search, or the
    one --cfg-scale): one line per scale, the best, and a JSON line."""
    n = args.num_samples or 50000
    if n % K:  # the released eval keeps a class-balanced subset (engines/eval.py:143-150)
        print0(rank, f"note: {n} samples -> {n - n % K}, a multiple of the {K} classes")
        n -= n % K
    net, ref = feature_net(args, args.device)
    name = f"{'FID' if args.metric == 'fid' else 'FD-shapes'}-{n}"
    scores = {}

    def score_at(scale):
        t0, skw = time.time(), {**kw, "cfg_scale": scale}
        sample = lambda idx: generate(model, idx, K, seed=args.seed, **skw)[0]
        feats = fid.generated_features(sample, net, n, args.batch_size, rank, world)
        fd = fid.frechet_distance(*fid.feature_stats(feats), *ref) if rank == 0 else None
        scores[scale] = from_rank0(fd, world)
        print0(rank, f"cfg {scale:g}: {name} {scores[scale]:.3f} ({time.time() - t0:.0f} s)")
        return scores[scale]

    if args.cfg_search is not None:
        best, _ = adaptive_cfg_search(score_at, args.cfg_search)
    else:
        scales = args.cfg_scales or [kw["cfg_scale"]]
        for s in scales:
            score_at(s)
        best = min(scales, key=scores.get)  # the first of equal scores, as the released strict <
    print0(rank, f"best: cfg {best:g}, {name} {scores[best]:.3f} | {card} | "
                 f"{fid.protocol_note(net)}")
    result = {"metric": name.rsplit("-", 1)[0], "n": n,
              "by_cfg_scale": {f"{s:g}": v for s, v in scores.items()},
              "best_cfg_scale": best, "value": scores[best],
              "search": "adaptive" if args.cfg_search is not None else "list",
              "steps": kw["steps"], "method": kw["method"], "cfg_min_t": kw["cfg_min_t"],
              "seed": args.seed, "ema": not args.raw,
              "inception_sha256": getattr(net, "sha256", None)}
    print0(rank, json.dumps(result))


def tokenizer_noise(cfg, indices, seed, device):
    """The tokenizer pass's register noise (B, T, C) and t (B,) for images `indices`, each from its
    own generator keyed by (seed, index): the released code draws both at random
    (models/unite.py:186-99); keyed, rFID and PSNR are the same at any batch size and number of
    GPUs."""
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]
    noise = torch.stack([torch.randn(cfg.num_tokens, cfg.latent_dim, generator=g) for g in gens])
    t = torch.stack([torch.rand((), generator=g) for g in gens]) * cfg.recon_t_max
    return noise.to(device), t.to(device)


@torch.inference_mode()
def evaluate_reconstruction(model, args, rank, world, card):
    """rFID and PSNR of reconstructions of a held-out split, as the released evaluate_rfid
    (engines/eval.py:383-593): the first min(n, 50000) images (ADM center crop); reconstructions
    clamped to [0, 1] and made 8-bit like its PNGs (eval.py:529); rFID against the same real images,
    8-bit too (eval.py:554 compares with its own ground-truth PNGs), or against --fid-ref; PSNR per
    image on 0..255, then the mean (eval.py:532). No LPIPS: no VGG weights here."""
    ds = get_dataset(args.recon_data, model.cfg.image_size, "test")  # shapes/cifar10: test split
    n = min(args.num_samples or 50000, len(ds))
    if n < world:
        raise UserError(f"{n} images for {world} processes: ask for at least one per process")
    net, ref = feature_net(args, args.device)
    workers = args.num_workers
    if workers is None:
        workers = 4 if isinstance(ds, FolderDataset) else 0  # decoding JPEGs vs in-memory arrays
    mine = torch.utils.data.Subset(ds, fid.shard(n, rank, world))
    loader = torch.utils.data.DataLoader(mine, args.batch_size, num_workers=workers)
    rec_feats, real_feats, psnrs = [], [], []
    idx = fid.shard(n, rank, world)
    for b, (x, _) in enumerate(loader):
        x = x.to(args.device)
        noise, t = tokenizer_noise(model.cfg, idx[b * args.batch_size:][:len(x)], args.seed,
                                   x.device)
        rec, real = fid.quantize_8bit(model.reconstruct(x, noise, t)), fid.quantize_8bit(x)
        rec_feats.append(net(rec).float())
        psnrs.append(fid.psnr_8bit(rec, real)[:, None])
        if ref is None:
            real_feats.append(net(real).float())
    gathered = [fid.gather_features(torch.cat(f)).cpu().double().numpy() if f else None
                for f in (rec_feats, real_feats, psnrs)]  # every rank takes part in the gathers
    if rank != 0:
        return
    feats, real_f, psnr = gathered[0], gathered[1], float(gathered[2].mean())
    ref = fid.feature_stats(real_f) if ref is None else ref
    value = fid.frechet_distance(*fid.feature_stats(feats), *ref)
    name = f"r{'FID' if args.metric == 'fid' else 'FD-shapes'}-{n}"
    against = args.fid_ref or f"the same {n} real images"
    print(f"{name}: {value:.3f} (vs {against}; {fid.protocol_note(net)}) | PSNR {psnr:.2f} dB "
          f"(8-bit) | {card}")
    print(json.dumps({"metric": name.rsplit("-", 1)[0], "n": n, "value": value, "psnr": psnr,
                      "ref": against, "data": args.recon_data, "ema": not args.raw,
                      "inception_sha256": getattr(net, "sha256", None)}))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a train.py checkpoint, or the authors' UNITE-B.pt / UNITE-L.pt")
    p.add_argument("--model", default="B", choices=["B", "L"], help="preset of an authors' file")
    # sampling; defaults: the checkpoint's settings (authors' files: the paper's dopri5, CFG 3.4)
    p.add_argument("--steps", type=int, default=None, help="default: the checkpoint's sample-steps")
    p.add_argument("--sampler", default=None, choices=["heun", "euler", "dopri5"])
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--cfg-min-t", type=float, default=None, help="guidance only for t > this")
    p.add_argument("--seed", type=int, default=0)
    # not --n: torchrun's own parser would take it for an abbreviation of --nnodes/--nproc-per-node
    p.add_argument("--num-samples", type=int, default=None, help="grid: 8 per class; --out-dir and "
                   "FID: 50000; --recon-data: min(50000, the split)")
    p.add_argument("--per-class", type=int, default=8, help="grid columns")
    p.add_argument("--out", default=None, help="grid PNG (default: <ckpt>_samples.png)")
    p.add_argument("--out-dir", default=None, help="write PNGs 000000.png ... here (for fid.py)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # evaluation, in memory (no PNGs)
    p.add_argument("--fid-ref", default="", help="reference mu/sigma .npz (fid.py --save-stats)")
    p.add_argument("--cfg-scales", default="", help="CFG scales to score, e.g. 3.0,3.2,3.4")
    p.add_argument("--cfg-search", type=float, nargs="?", const=3.4, default=None, metavar="START",
                   help="the released adaptive search: START (3.4) and START-0.2, then 0.2 steps "
                        "while the score improves")
    p.add_argument("--recon-data", default="", help="rFID + PSNR of reconstructions of: shapes | "
                   "cifar10 (their test splits) | a held-out image folder, e.g. /imagenet/val")
    p.add_argument("--metric", default=None, choices=["fid", "fd-shapes"],
                   help="fid (default) | fd-shapes: built-in shapes data, offline, not FID")
    p.add_argument("--inception", default=None, help="FID Inception weight file (default: cache)")
    p.add_argument("--num-workers", type=int, default=None, help="image loaders for --recon-data")
    args = p.parse_args(argv)
    try:
        args.cfg_scales = [float(s) for s in args.cfg_scales.split(",")] if args.cfg_scales else []
    except ValueError:
        raise UserError(f"--cfg-scales {args.cfg_scales!r}: give numbers separated by commas, "
                        f"e.g. 3.0,3.2,3.4") from None
    search = bool(args.cfg_scales) or args.cfg_search is not None
    args.evaluate = bool(args.fid_ref or search or args.metric)
    args.metric = args.metric or "fid"
    if args.cfg_scales and args.cfg_search is not None:
        raise UserError("give --cfg-scales or --cfg-search, not both")
    if args.recon_data and (search or args.out_dir):
        raise UserError("--recon-data scores reconstructions: drop --cfg-scales, --cfg-search and "
                        "--out-dir")
    if args.evaluate and args.out_dir and not args.recon_data:
        raise UserError("--out-dir writes PNGs, while --fid-ref / --cfg-scales / --cfg-search / "
                        "--metric score in memory: run one of the two (fid.py scores a PNG folder)")
    if args.recon_data not in ("", "shapes", "cifar10") and not os.path.isdir(args.recon_data):
        raise UserError(f"data folder not found: {args.recon_data}")  # before a checkpoint loads
    if args.evaluate and args.metric == "fid" and not (args.fid_ref or args.recon_data):
        raise UserError("FID needs --fid-ref STATS.npz (python fid.py /imagenet/train --save-stats "
                        "STATS.npz, or JiT's jit_in256_stats.npz), or --metric fd-shapes on shapes")
    if args.fid_ref:
        fid.load_stats(args.fid_ref)  # a bad file fails now, not after 50000 samples
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world = 0, 1
    if "RANK" in os.environ:  # torchrun: shard the sample indices over ranks
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        run(args, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(args, rank, world):
    model, ck = load_model(args.ckpt, args.device, use_ema=not args.raw, preset=args.model)
    ta = ck["args"]
    kw = dict(steps=args.steps or ta["sample_steps"], method=args.sampler or ta["sampler"],
              cfg_scale=ta["cfg_scale"] if args.cfg_scale is None else args.cfg_scale,
              cfg_min_t=ta["cfg_min_t"] if args.cfg_min_t is None else args.cfg_min_t)
    K = model.cfg.num_classes
    if K == 1:
        if args.cfg_scales or args.cfg_search is not None:
            raise UserError("an unconditional model has no CFG scale to search")
        kw["cfg_scale"] = 1.0  # unconditional model: nothing to guide
    card = (f"{ck.get('released', '')} {'raw' if args.raw else 'EMA'} weights, step "
            f"{ck.get('step', '?')}").lstrip()
    if args.recon_data:
        return evaluate_reconstruction(model, args, rank, world, card)
    scale = "searched" if args.cfg_scales or args.cfg_search is not None else kw["cfg_scale"]
    card += (f", {kw['method']}-{kw['steps']}, cfg {scale} for t>{kw['cfg_min_t']} (all channels), "
             f"seed {args.seed}")
    if "current_best_cfg_scale" in ck:  # the released training's search result (checkpoint.py:64)
        card += f"; the file's search kept cfg {ck['current_best_cfg_scale']}"
    if args.evaluate:
        return evaluate_generation(model, K, kw, args, rank, world, card)
    if args.out_dir:
        n = args.num_samples or 50000
        os.makedirs(args.out_dir, exist_ok=True)
        mine = fid.shard(n, rank, world)
        from tqdm import tqdm
        for i in tqdm(range(0, len(mine), args.batch_size), disable=rank != 0, file=sys.stderr):
            idx = mine[i:i + args.batch_size]
            x, nfe = generate(model, idx, K, seed=args.seed, **kw)
            for j, img in zip(idx, x):
                save_png(img, os.path.join(args.out_dir, f"{j:06d}.png"))
        if world > 1:
            dist.barrier()
        print0(rank, f"wrote {n} PNGs to {args.out_dir} | {card} | NFE {nfe}")
        print0(rank, json.dumps({"n": n, "out_dir": args.out_dir, **kw, "seed": args.seed,
                                 "ema": not args.raw}))
        return
    if rank != 0:
        return
    rows = min(K, 10)
    n = args.num_samples or rows * args.per_class
    labels = [i // args.per_class % K for i in range(n)] if K > 1 else None
    xs, nfe = [], 0
    for i in range(0, n, args.batch_size):
        idx = list(range(i, min(n, i + args.batch_size)))
        y = labels[i:i + len(idx)] if labels else None
        x, nfe = generate(model, idx, K, seed=args.seed, labels=y, **kw)
        xs.append(x)
    out = args.out or os.path.splitext(args.ckpt)[0] + "_samples.png"
    save_grid(torch.cat(xs), out, args.per_class)
    names = ck.get("class_names") or list(range(rows))
    print(f"wrote {out}: {n} images, rows = classes {names[:rows]} | {card} | NFE {nfe}")
    print(json.dumps({"out": out, "n": n, "nfe": nfe, **kw, "seed": args.seed,
                      "ema": not args.raw}))


if __name__ == "__main__":
    run_main(main)
