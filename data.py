"""
Datasets, downloads and the run-time plumbing (processes, precision, checkpoints) shared by the
scripts.

- `shapes`: our built-in procedural dataset (offline, deterministic, 32x32 RGB). Each image is one
  shape (the class label) drawn with random colour, size, position and tilt on a two-tone gradient
  background; every attribute is also returned as a discrete label (the Send-VAE attribute probe
  uses them).
- `cifar10`: the CIFAR-10 python archive, downloaded once into the cache dir (md5-checked).
- a folder: ImageFolder (one sub-folder per class, class-conditional) or a flat folder of images
  (unconditional), ADM center crop (+ random horizontal flip in train.py), as DiT/ADM/UNITE's data
  loaders.

Images are float tensors in [0, 1], shape (3, H, W), as UNITE's code trains on them (no mean/std).
"""
import contextlib
import functools
import hashlib
import os
import pickle
import signal
import sys
import tarfile
import time
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm"}


class UserError(Exception):
    """A problem the user can fix: a bad path or flag, a corrupt file, a missing download, another
    script's checkpoint, a wrong preset. Scripts print it as one line and exit non-zero."""


def run_main(main):
    """A script's entry point: a UserError ends in one line on stderr and exit status 1, and a
    torch.distributed process group, if one was started, is torn down either way."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {error_line(e)}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def error_line(e):
    """One clear line for a UserError, also when a DataLoader worker re-raised it with a
    traceback."""
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    last = lines[-1] if lines else repr(e)
    return last.split("UserError: ", 1)[-1]


# -----------------------------------------------------------------------------
# downloads: one function, a cache dir, a checksum, a clear offline error

def cache_dir():
    return os.environ.get("MINUNITE_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "minunite"))


def file_hash(path, algo="sha256"):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, algo, digest):
    """Return `path`, downloading `url` there first if needed; the file's `algo` hash must equal
    `digest`. Offline (or on a bad download) raise UserError saying where to put the file by
    hand."""
    if os.path.exists(path):
        got = file_hash(path, algo)
        if got != digest:
            raise UserError(f"{path} has {algo} {got[:12]}..., expected {digest[:12]}...: "
                            f"delete it or replace it with the file from {url}")
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".part"
    try:
        print(f"downloading {url} -> {path}", file=sys.stderr)
        urllib.request.urlretrieve(url, tmp)
    except Exception as e:  # no network, DNS failure, HTTP error: all end the same way
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot download {url} ({type(e).__name__}); offline? put the file at "
                        f"{path} ({algo} {digest})") from None
    got = file_hash(tmp, algo)
    if got != digest:
        os.remove(tmp)
        raise UserError(f"download of {url} is corrupt ({algo} {got[:12]}... != {digest[:12]}...); "
                        "try again")
    os.replace(tmp, path)  # atomic: never a half-written file under the final name
    return path


# -----------------------------------------------------------------------------
# writing outputs: atomic, so an interrupted run never leaves a half-written file

def write_atomic(path, text):
    """Write text under a temp name, then rename."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def to_uint8(x):
    """Floats in [0, 1] -> uint8 exactly as the released code converts them before Inception and
    PNGs: x 255, clamp, TRUNCATE (utils/fid.py:80 `(images * 255).clamp(0, 255).to(torch.uint8)` for
    FID; engines/eval.py:485/529 `(x * 255).clip(0, 255).astype(np.uint8)` for rFID, PSNR and its
    PNGs). Floor, not round: on average 0.5/255 darker than rounding. Exact on 8-bit inputs: in
    float32, (k / 255) * 255 truncates to k for every k."""
    return (x.detach().float() * 255).clamp(0, 255).to(torch.uint8)


def save_png(x, path):
    """x (3, H, W) float in [0, 1] -> 8-bit PNG (to_uint8), written under a temp name then
    renamed."""
    arr = to_uint8(x).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def save_grid(images, path, nrow):
    """images (N, 3, H, W) in [0, 1] -> one PNG grid, nrow images per row (white padding)."""
    N, C, H, W = images.shape
    rows = -(-N // nrow)
    grid = torch.ones(rows * nrow, C, H, W)
    grid[:N] = images.detach().cpu().float()
    save_png(grid.view(rows, nrow, C, H, W).permute(2, 0, 3, 1, 4).reshape(C, rows * H, nrow * W),
             path)


# -----------------------------------------------------------------------------
# built-in procedural dataset: "shapes"

SHAPES = ["circle", "square", "triangle", "cross", "ring", "flower"]
COLORS = np.array([[230, 40, 40], [40, 200, 60], [50, 90, 240], [245, 215, 30],
                   [230, 60, 220], [40, 215, 230], [250, 140, 20], [250, 250, 250]],
                  dtype=np.float32)
BACKGROUNDS = np.array([[25, 25, 30], [90, 90, 100], [30, 40, 90], [95, 60, 40]], dtype=np.float32)
# shape radius = (RADIUS[0] + RADIUS[1] * (size bin + U[0,1))) * side = 0.26..0.44 of the side.
# Version 1 drew 0.18..0.42: its smallest shapes (a 6-px flower) were below what 8-px patches
# resolve in a 10-minute CPU run (measured: 37% vs 27% of the samples classified as their class at
# 850 steps).
# Version 3: a tilt of -10..10 degrees (version 2 rotated 0..90, every orientation of a square) and
# a flower of five round petals (version 2: a thin star). A 10-minute model averages over
# orientations it cannot yet tell apart, so on version 2 squares, triangles, crosses and stars came
# out as blobs: at 3000 steps shape_acc 0.77 (v2) -> 0.95 (v3), docs/experiments.md. Caches of
# derived models (fid.py's FD-shapes network) carry SHAPES_VERSION in their file name.
RADIUS = (0.26, 0.06)
TILT = np.radians(20)  # the rotation range: -10..10 degrees, in ATTRIBUTES["rotation"] bins
SHAPES_VERSION = 3
# every attribute and its number of discrete values (shape = the class label)
ATTRIBUTES = {"shape": 6, "color": 8, "background": 4, "size": 3, "x": 3, "y": 3, "rotation": 4}


def _shape_masks(kind, u, v, r):
    """Coverage (N, P) of each image's shape in rotated, centred pixel coordinates u, v (N, P),
    radius r (N, 1). Every shape is evaluated for every image and the right one picked: branch-free
    and fast in torch."""
    rad = torch.sqrt(u * u + v * v)
    tri = torch.stack([u * np.cos(a) + v * np.sin(a)
                       for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3]).amax(0)
    au, av = u.abs(), v.abs()
    masks = torch.stack([
        rad <= r,                                                        # circle
        torch.maximum(au, av) <= 0.8 * r,                                # square
        # equilateral triangle, inradius r/2
        tri <= 0.5 * r,
        ((au <= 0.3 * r) & (av <= r)) | ((av <= 0.3 * r) & (au <= r)),   # cross
        (rad <= r) & (rad >= 0.55 * r),                                  # ring
        rad <= r * (0.45 + 0.55 * torch.cos(2.5 * torch.atan2(v, u)).abs()),  # five round petals
    ])                                                                   # (6, N, P)
    return masks.gather(0, kind.view(1, -1, 1).expand(1, *u.shape))[0]


def make_shapes(n, seed=0, size=32, supersample=2):
    """n images (n, size, size, 3) uint8 and a dict of int64 attribute labels (n,), deterministic in
    seed. All randomness comes from numpy's seeded generator; rendering is float32 torch (2x2
    supersampled)."""
    rng = np.random.default_rng(seed)
    a = {k: rng.integers(0, v, n) for k, v in ATTRIBUTES.items()}
    # continuous values inside each discrete bin, so the labels are exact functions of the image
    f32 = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32))
    radius = f32((RADIUS[0] + RADIUS[1] * (a["size"] + rng.random(n))) * size)
    cx = f32((0.3 + 0.4 * (a["x"] + rng.random(n)) / 3) * size)          # centre in the middle 40%
    cy = f32((0.3 + 0.4 * (a["y"] + rng.random(n)) / 3) * size)
    # -10..10 degrees
    theta = f32(((a["rotation"] + rng.random(n)) / ATTRIBUTES["rotation"] - 0.5) * TILT)
    fg = f32(COLORS[a["color"]] * (0.85 + 0.15 * rng.random((n, 1))))
    bg0 = f32(BACKGROUNDS[a["background"]])
    bg1 = bg0 + f32(40 * rng.random((n, 3)))
    gdir = f32(rng.random(n) * 2 * np.pi)                                # gradient direction
    kind = torch.from_numpy(a["shape"])

    s = size * supersample
    g = (torch.arange(s, dtype=torch.float32) + 0.5) / supersample
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    xx, yy = xx.reshape(1, -1), yy.reshape(1, -1)                        # (1, P)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for i in range(0, n, 500):  # chunks keep memory small
        j = slice(i, min(i + 500, n))
        dx, dy = xx - cx[j, None], yy - cy[j, None]
        c, sn = torch.cos(theta[j])[:, None], torch.sin(theta[j])[:, None]
        mask = _shape_masks(kind[j], c * dx + sn * dy, -sn * dx + c * dy,
                            radius[j, None])[:, None]                                  # (N,1,P)
        w = torch.cos(gdir[j])[:, None] * xx + torch.sin(gdir[j])[:, None] * yy             # (N, P)
        w = ((w - w.amin(1, keepdim=True))
             / (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)))[:, None]
        bg = bg0[j, :, None] * (1 - w) + bg1[j, :, None] * w                               # (N,3,P)
        img = torch.where(mask, fg[j, :, None], bg).view(-1, 3, s, s)
        img = torch.nn.functional.avg_pool2d(img, supersample)          # box-filter antialias
        out[j] = img.round().clamp(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).numpy(), a


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory uint8 images (N, H, W, 3) with labels. Datasets never flip: `hflip` tells train.py
    whether a random horizontal flip is a valid augmentation, and train.py draws it per global
    sample (see draw_noise)."""

    def __init__(self, images, labels, num_classes, class_names, hflip=False, attrs=None):
        # (N, 3, H, W) uint8
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.num_classes, self.class_names, self.hflip, self.attrs = (num_classes, class_names,
                                                                      hflip, attrs)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / 255.0, self.labels[i]


@functools.lru_cache(maxsize=4)  # read-only, so one copy per process serves every caller
def shapes_dataset(split="train", n=None):
    """The built-in dataset: 20k train / 10k test images, fixed seeds, no flips (a flip would break
    the x-position attribute label, and more data is one argument away)."""
    n = n or (20000 if split == "train" else 10000)
    imgs, attrs = make_shapes(n, seed=0 if split == "train" else 1)
    return ArrayDataset(imgs, attrs["shape"], len(SHAPES), SHAPES, attrs=attrs)


# -----------------------------------------------------------------------------
# CIFAR-10 (python version), md5 from the dataset's home page

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]


def cifar10_dataset(split="train"):
    path = download(CIFAR10_URL, os.path.join(cache_dir(), "cifar-10-python.tar.gz"), "md5",
                    CIFAR10_MD5)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    with tarfile.open(path, "r:gz") as tar:
        for name in names:
            d = pickle.load(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="latin1")
            xs.append(d["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.extend(d["labels"])
    return ArrayDataset(np.concatenate(xs), ys, 10, CIFAR10_CLASSES, hflip=True)


# -----------------------------------------------------------------------------
# image folders

def is_image(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS  # case-insensitive: .JPEG counts


def list_images(root):
    """All image files below root (recursive), sorted."""
    out = []
    for d, _, files in os.walk(root, followlinks=True):
        out += [os.path.join(d, f) for f in files if is_image(f)]
    return sorted(out)


def center_crop_arr(img, size):
    """ADM's center crop: halve with BOX while too big, resize with BICUBIC so the short side is
    `size`, then crop the center (guided-diffusion image_datasets.py; used by DiT, SiT, UNITE)."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)  # a writable copy (torch warns on read-only arrays)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def load_image(path, size=None):
    """(H, W, 3) uint8 of an image file, RGB-converted, center-cropped to size if given."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return center_crop_arr(im, size) if size else np.array(im)
    except Exception as e:
        raise UserError(f"corrupt or unreadable image file {path}: {type(e).__name__}") from None


class FolderDataset(torch.utils.data.Dataset):
    """ImageFolder (root/class_x/*.png -> conditional) or flat folder (root/*.png ->
    unconditional)."""

    hflip = True

    def __init__(self, root, resolution):
        if not os.path.isdir(root):
            raise UserError(f"data folder not found: {root}")
        subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        top_images = [f for f in os.listdir(root) if is_image(f)]
        if subdirs and not top_images:  # ImageFolder
            self.class_names, self.files, labels = subdirs, [], []
            for k, d in enumerate(subdirs):
                fs = list_images(os.path.join(root, d))
                self.files += fs
                labels += [k] * len(fs)
        else:  # flat folder: one (null-less) class, i.e. unconditional
            self.class_names, self.files = [], list_images(root)
            labels = [0] * len(self.files)
        if not self.files:
            raise UserError(f"no image files in {root} "
                            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes = max(1, len(self.class_names))
        self.resolution = resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        arr = load_image(self.files[i], self.resolution)
        return (torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0,
                self.labels[i])


def get_dataset(name, resolution=32, split="train"):
    """'shapes' | 'cifar10' | a folder path. Returns a Dataset with .num_classes and
    .class_names."""
    if name == "shapes":
        ds = shapes_dataset(split)
    elif name == "cifar10":
        ds = cifar10_dataset(split)
    else:
        return FolderDataset(name, resolution)
    if ds.images.shape[-1] != resolution:
        raise UserError(f"--data {name} is {ds.images.shape[-1]}x{ds.images.shape[-1]}, "
                        f"the model expects {resolution}x{resolution}: pick a model preset of that "
                        "image size")
    return ds


# -----------------------------------------------------------------------------
# runtime shared by the training scripts (train.py, sendvae.py, molecules.py):
# devices, processes, precision, data order, checkpoints

def setup_distributed(device_arg):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python train.py` is a world of one."""
    if device_arg == "auto":
        device_arg = ("cuda" if torch.cuda.is_available()
                      else "mps" if torch.backends.mps.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg)
    rank, world, local = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                          int(os.environ["LOCAL_RANK"]))
    if device_arg == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")  # CPU (and MPS hosts): gloo
    return rank, world, torch.device(device_arg)


def setup_run(device_arg, precision_arg):
    """A training script's start: (rank, world, device, precision). TF32 matmuls on for fp32 work on
    GPUs, as the released UNITE and REPA-E code."""
    rank, world, device = setup_distributed(device_arg)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, world, device, pick_precision(precision_arg, device)


def cpu_has_bf16():
    """bf16 matmuls are fast only with AVX512-BF16 or AMX; without them they are ~3x slower than
    fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_precision(arg, device):
    if arg == "auto":
        ok = (torch.cuda.is_bf16_supported() if device.type == "cuda"
              else device.type == "cpu" and cpu_has_bf16())
        arg = "bf16" if ok else "fp32"
    return arg


def autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def print0(*a, rank=0, log=None):
    """Print on rank 0 only (through tqdm, so a progress bar on the terminal stays intact), and
    append the line to `log` if given."""
    if rank == 0:
        from tqdm import tqdm
        tqdm.write(" ".join(map(str, a)), file=sys.stdout)
        sys.stdout.flush()
        if log is not None:
            print(*a, file=log, flush=True)


def open_log(out_dir, rank):
    """The scripts' print: rank 0 prints and appends to out_dir/log.txt; other ranks are silent."""
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "log.txt"), "a") if rank == 0 else None
    return lambda *a: print0(*a, rank=rank, log=log)


def all_mean(t, world):
    """In place: the mean of a tensor over all processes (for logged statistics)."""
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


class StopCheck:
    """When a training loop stops, decided the same on every rank (or a collective would hang):
    SIGTERM (pre-emption: the script saves, then exits) or a time budget spent, on the wall clock
    or the process's CPU clock (fair when other jobs share the CPU); budget 0 = none. Call once per
    step; .sigterm and .out_of_time tell why it stopped."""

    def __init__(self, budget=0.0, clock="wall", device="cpu", world=1):
        self.budget, self.clock, self.device, self.world = budget, clock, device, world
        self.t0, self.cpu0 = time.time(), time.process_time()
        self.sigterm = self.out_of_time = self._term = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_):
        self._term = True

    def spent(self):
        return time.time() - self.t0 if self.clock == "wall" else time.process_time() - self.cpu0

    def __call__(self):
        flags = torch.tensor([float(self.budget > 0 and self.spent() > self.budget),
                              float(self._term)], device=self.device)
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.out_of_time, self.sigterm = (bool(f) for f in flags.tolist())
        return self.out_of_time or self.sigterm


def resume_file(arg, out_dir):
    """The checkpoint --resume names: "auto" = out_dir/ckpt.pt if it exists, "" = none; a named
    file that does not exist is a UserError. Returns a path or ""."""
    path = os.path.join(out_dir, "ckpt.pt") if arg == "auto" else arg
    if path and not os.path.exists(path):
        if arg != "auto":
            raise UserError(f"--resume {arg}: file not found")
        return ""
    return path


def make_loader(ds, batch_size, seed, step, accum, world, rank, device, num_workers=None):
    """An iterator of this rank's micro-batches from `step` on (batch_indices' order). Workers: 0
    for in-memory data (shapes, cifar10), else 8 unless given."""
    workers = num_workers if num_workers is not None else (0 if hasattr(ds, "images") else 8)
    return iter(torch.utils.data.DataLoader(
        ds, batch_sampler=batch_indices(len(ds), batch_size, seed, step, accum, world, rank),
        num_workers=workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed)))


def split_batch(batch_size, micro_batch, world, n_items=None):
    """(micro-batch per process, accumulation steps, steps per epoch) of a global batch:
    batch = micro x accum x world, micro 0 = batch / world; a split that does not add up, or a data
    set smaller than one batch, is a UserError. n_items None: no epoch (steps per epoch None)."""
    micro = micro_batch or batch_size // world
    accum = batch_size // max(1, micro * world)
    if accum < 1 or accum * micro * world != batch_size:
        raise UserError(f"--batch-size {batch_size} must be a multiple of --micro-batch {micro} x "
                        f"{world} processes")
    if n_items is not None and n_items < batch_size:
        raise UserError(f"{n_items} images is fewer than one batch of {batch_size}")
    return micro, accum, None if n_items is None else n_items // batch_size


def batch_indices(n, global_batch, seed, start_step, accum, world, rank):
    """Index lists for this rank, micro-step by micro-step, from start_step on. Epoch e is a fixed
    permutation (seed + e); a global batch is split in order: micro-step m, rank r -> contiguous
    slice. drop_last: every rank runs the same number of steps."""
    steps_per_epoch, micro = n // global_batch, global_batch // (accum * world)
    step = start_step
    while True:
        e, s = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))
        for s in range(s, steps_per_epoch):
            g = order[s * global_batch:(s + 1) * global_batch]
            for m in range(accum):
                yield g[(m * world + rank) * micro:(m * world + rank + 1) * micro].tolist()
        step = (e + 1) * steps_per_epoch


def save_checkpoint(path, ckpt):
    """Atomic: a crash or SIGTERM never leaves a half-written ckpt.pt."""
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, what="", keys=()):
    """The plain-data dict of a checkpoint (weights_only loading), or one UserError line saying what
    is wrong with `path`: missing, unreadable, or without one of `keys` (then it is another script's
    checkpoint)."""
    if not os.path.isfile(path):
        raise UserError(f"{what}checkpoint not found: {path}")
    try:
        # mmap: an authors' UNITE-L file with optimizer states (~10 GB) is read only where used
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} is not a {what}checkpoint ({type(e).__name__})") from None
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise UserError(f"{path} is not a {what}checkpoint (it has no {missing[0]!r})")
    return ck
