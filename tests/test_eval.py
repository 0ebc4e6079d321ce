"""
Tests for the evaluation protocol of sample.py / fid.py (the released engines/eval.py): 8-bit
images, the CFG-scale search (a list of scales, and the released adaptive rule), rFID and PSNR on a
held-out split, and the authors' checkpoint files. CPU, micro checkpoints written here, a small
feature function instead of Inception where the network does not matter; ~30 s:

    python -m pytest -q tests/test_eval.py
"""
import os

# numpy's multi-threaded LAPACK is slow on small matrices, and pathological on a busy 2-core machine
# (a 2048-d FD: 4.5 s on 1 thread, 20 s on 2), as in tests/test_fid.py. Takes effect only if numpy
# is not imported yet.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import fid  # noqa: E402
import model as unite  # noqa: E402
import official  # noqa: E402
import sample  # noqa: E402
from conftest import ROOT  # noqa: E402
from data import UserError  # noqa: E402

SAMPLING = dict(sample_steps=2, sampler="euler", cfg_scale=2.0, cfg_min_t=0.1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def micro_model(num_classes=6, seed=0):
    """A micro UNITE whose weights are perturbed, so its samples differ from image to image and
    from scale to scale (zero-initialised adaLN layers would make every output the same)."""
    torch.manual_seed(seed)
    m = unite.UNITE(unite.make_config("micro", num_classes=num_classes))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    """(path, model): a checkpoint in our format (train.py's keys), 6 classes as the shapes data."""
    m = micro_model()
    path = str(tmp_path_factory.mktemp("ckpt") / "micro.pt")
    sd = m.state_dict()
    data.save_checkpoint(path, {"config": asdict(m.cfg), "ema": sd, "model": sd, "step": 3,
                                "args": dict(SAMPLING), "class_names": data.SHAPES})
    return path, m


def pool_features(x):
    """A 12-d stand-in for Inception: 2x2 average-pooled RGB. Fast; FDs of 24 images are exact."""
    return F.adaptive_avg_pool2d(x, 2).flatten(1)


@pytest.fixture
def fake_inception(monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": pool_features)


def run_main(argv, capsys):
    """sample.main(argv) in this process: (stdout lines, the JSON of the last line)."""
    sample.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def shapes_test_images(n):
    return torch.stack([data.shapes_dataset("test")[i][0] for i in range(n)])


# -----------------------------------------------------------------------------
# 8-bit images

def test_to_uint8_truncates_as_the_released_code():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g) * 1.2 - 0.1  # some values out of range
    released_fid = (x * 255).clamp(0, 255).to(torch.uint8)                     # utils/fid.py:80
    released_rfid = (x.numpy() * 255).clip(0, 255).astype(np.uint8)           # engines/eval.py:529
    assert torch.equal(fid.to_uint8(x), released_fid)
    assert np.array_equal(fid.to_uint8(x).numpy(), released_rfid)
    floor = fid.to_uint8(torch.tensor([0.6 / 255, 254.99 / 255, 1.0]))
    assert floor.tolist() == [0, 254, 255]  # not rounded
    k = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(fid.to_uint8(k.float() / 255), k)  # 8-bit inputs pass through unchanged


def test_quantize_equals_a_png_round_trip(tmp_path):
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "x.png")
    Image.fromarray(fid.to_uint8(x).permute(1, 2, 0).numpy()).save(path)
    back = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
    assert torch.equal(fid.quantize_8bit(x), back)
    assert torch.equal(fid.quantize_8bit(back), back)  # idempotent: 8-bit images stay as they are


def test_save_png_writes_what_fid_measures(tmp_path):
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    data.save_png(x, str(tmp_path / "x.png"))
    back = torch.from_numpy(np.array(Image.open(tmp_path / "x.png"))).permute(2, 0, 1).float() / 255
    assert torch.equal(fid.quantize_8bit(x), back)


def released_compute_psnr(recon, gt):
    """utils/eval_metrics.py compute_psnr of the released code, transcribed: (N, H, W, C) uint8."""
    recon_f, gt_f = recon.astype(np.float64), gt.astype(np.float64)
    mse = np.maximum(np.mean((recon_f - gt_f) ** 2, axis=(1, 2, 3)), 1e-10)
    return float(np.mean(20 * np.log10(255.0 / np.sqrt(mse))))


def test_psnr_closed_form_and_released_formula():
    g = torch.Generator().manual_seed(3)
    ref = torch.randint(10, 200, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
    rec = ref.clone()
    rec[0] += 5                                   # every pixel off by 5: mse 25
    rec[1, :, :2] += 9                            # a quarter of the pixels off by 9: mse 81 / 4
    got = fid.psnr_8bit(rec, ref)
    expect = [20 * np.log10(255 / d) for d in (5, 4.5, 1e-5)]  # rec[2] is exact: mse floored
    assert got.dtype == torch.float64 and np.allclose(got.numpy(), expect, rtol=1e-12)
    a = torch.randint(0, 256, (5, 3, 8, 8), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (5, 3, 8, 8), generator=g, dtype=torch.uint8)
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    released = released_compute_psnr(nhwc(a), nhwc(b))
    assert fid.psnr_8bit(a, b).mean().item() == pytest.approx(released, rel=1e-12)
    x = torch.rand(5, 3, 8, 8, generator=g)      # floats go through to_uint8 first
    assert torch.equal(fid.psnr_8bit(x, b), fid.psnr_8bit(fid.to_uint8(x), b))


# -----------------------------------------------------------------------------
# the adaptive CFG search: the released rule on synthetic FID curves

def released_adaptive_cfg_search(fid_at, current_best_cfg_scale, max_iterations=7):
    """engines/eval.py adaptive_cfg_search (lines 304-376) with evaluate_fid's choice of the best
    of a list (lines 159-250), transcribed without the sampling: (best scale, best FID)."""
    X = round(current_best_cfg_scale, 1)
    overall_best = float("inf")
    initial = [s for s in [X, round(X - 0.2, 1)] if s > 0]
    best_fid, best_cfg = float("inf"), X                     # evaluate_fid(cfg_scales=initial, ...)
    for cfg_scale in initial:
        fid_val = fid_at(cfg_scale)
        if fid_val < best_fid:
            best_fid, best_cfg = fid_val, cfg_scale
    best_cfg = round(best_cfg, 1)
    overall_best = min(overall_best, best_fid)
    direction = -0.2 if best_cfg < X else 0.2
    prev_fid = best_fid
    for _ in range(max_iterations):
        next_scale = round(best_cfg + direction, 1)
        if next_scale <= 0 or next_scale > 10.0:
            break
        new_fid = fid_at(next_scale)
        if new_fid < overall_best:
            overall_best = new_fid
        if new_fid >= prev_fid:
            break
        best_cfg = next_scale
        prev_fid = new_fid
    return round(best_cfg, 1), overall_best


def traced(curve):
    """(fid_at, list of the scales it was asked for, in order)."""
    asked = []
    return (lambda s: asked.append(s) or curve(s)), asked


@pytest.mark.parametrize("start, curve, expect_asked, expect_best", [
    (3.4, lambda s: abs(s - 2.8), [3.4, 3.2, 3.0, 2.8, 2.6], 2.8),                     # walks down
    (3.4, lambda s: abs(s - 4.0), [3.4, 3.2, 3.6, 3.8, 4.0, 4.2], 4.0),                # walks up
    (3.4, lambda s: -s, [3.4, 3.2] + [round(3.6 + 0.2 * i, 1) for i in range(7)], 4.8),  # 7 more
    (3.4, lambda s: 1.0, [3.4, 3.2, 3.6], 3.4),                # a tie keeps X; 3.6 is no better
    (0.2, lambda s: s, [0.2, 0.4], 0.2),                       # X - 0.2 = 0 is not tried
    (0.4, lambda s: s, [0.4, 0.2], 0.2),                       # 0.0 is out of range: stop
    (9.8, lambda s: -s, [9.8, 9.6, 10.0], 10.0),               # 10.2 > 10: stop
])
def test_adaptive_search_released_rule(start, curve, expect_asked, expect_best):
    fid_at, asked = traced(curve)
    best, score = sample.adaptive_cfg_search(fid_at, start)
    assert asked == expect_asked and best == expect_best and score == curve(best)


def test_adaptive_search_equals_released_transcription_on_random_curves():
    rng = random.Random(0)
    for trial in range(300):
        table = {}  # a random FID per 0.1 grid point, with ties and plateaus
        values = [1.0, 1.5, 2.0] + [3 * rng.random() for _ in range(5)]
        curve = lambda s: table.setdefault(round(s, 1), rng.choice(values))
        start = rng.choice([0.2, 0.4, 1.0, 3.4, 5.1, 9.6, 10.0])
        fid_at, asked = traced(curve)
        ref_at, ref_asked = traced(curve)
        ours = sample.adaptive_cfg_search(fid_at, start)
        assert ours == released_adaptive_cfg_search(ref_at, start)
        assert asked == ref_asked, trial


# -----------------------------------------------------------------------------
# FID at a list of scales, and the adaptive search, through sample.py

@pytest.fixture(scope="module")
def pool_ref(tmp_path_factory):
    """pool_features statistics of 60 shapes test images (8-bit already), as fid.py --save-stats."""
    path = str(tmp_path_factory.mktemp("ref") / "ref.npz")
    mu, sigma = fid.feature_stats(pool_features(shapes_test_images(60)).double().numpy())
    np.savez(path, mu=mu, sigma=sigma)
    return path


def test_cfg_scales_pick_the_lowest_fid(micro_ckpt, pool_ref, fake_inception, capsys):
    path, m = micro_ckpt
    lines, result = run_main([path, "--fid-ref", pool_ref, "--cfg-scales", "1,2.5,4",
                              "--num-samples", "25", "--batch-size", "10"], capsys)
    assert lines[0] == "note: 25 samples -> 24, a multiple of the 6 classes"  # class-balanced
    assert [l.split(":")[0] for l in lines[1:4]] == ["cfg 1", "cfg 2.5", "cfg 4"]
    assert result["metric"] == "FID" and result["n"] == 24 and result["search"] == "list"
    ref = fid.load_stats(pool_ref)
    expect = {}
    for s in (1.0, 2.5, 4.0):  # the same samples by hand: per-index noise, labels i % 6, 8-bit
        gen = lambda idx: unite.generate(m, idx, 6, seed=0, steps=2, method="euler", cfg_scale=s,
                                         cfg_min_t=0.1)[0]
        feats = fid.generated_features(gen, pool_features, 24, batch_size=10)
        expect[f"{s:g}"] = fid.frechet_distance(*fid.feature_stats(feats), *ref)
    assert result["by_cfg_scale"] == pytest.approx(expect, rel=1e-9)
    assert len({round(v, 6) for v in expect.values()}) == 3  # the scales really differ
    best = min(expect, key=expect.get)
    assert result["best_cfg_scale"] == float(best)
    assert result["value"] == pytest.approx(expect[best])
    assert lines[4].startswith(f"best: cfg {best}, FID-24 ")


def test_cfg_search_cli_follows_the_released_rule(micro_ckpt, pool_ref, fake_inception, capsys):
    path, _ = micro_ckpt
    _, result = run_main([path, "--fid-ref", pool_ref, "--cfg-search", "1.0", "--num-samples",
                          "12"], capsys)
    scores = result["by_cfg_scale"]
    fid_at, asked = traced(lambda s: scores[f"{s:g}"])  # replay the scores the run measured
    best, value = released_adaptive_cfg_search(fid_at, 1.0)
    assert [f"{s:g}" for s in asked] == list(scores)  # exactly these scales, in this order
    assert result["best_cfg_scale"] == best and result["value"] == value
    assert result["search"] == "adaptive" and len(scores) >= 2


def test_fid_with_an_inception_file(micro_ckpt, tmp_path, capsys):
    """The real network path once (random weights: the official file cannot be downloaded here):
    --fid-ref alone scores the checkpoint's one CFG scale, and the protocol line says which file."""
    from test_fid import randomize_
    net = randomize_(fid.InceptionV3(pretrained=False))
    weights = str(tmp_path / "inception.pth")
    torch.save(net.state_dict(), weights)
    ref = str(tmp_path / "ref.npz")
    feats = fid.extract_features(net, shapes_test_images(6), 6, progress=False)
    np.savez(ref, **dict(zip(("mu", "sigma"), fid.feature_stats(feats))))
    lines, r = run_main([micro_ckpt[0], "--fid-ref", ref, "--inception", weights, "--num-samples",
                         "6"], capsys)
    assert list(r["by_cfg_scale"]) == ["2"] and r["value"] > 0  # the checkpoint's cfg_scale
    assert r["inception_sha256"] == data.file_hash(weights)
    assert "pytorch-fid protocol" in lines[-2] and "NOT the official weights" in lines[-2]


def _two_ranks_equal_one(argv, env):
    one = subprocess.run([sys.executable, "sample.py", *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port=29531", "sample.py", *argv, "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(one.stdout.splitlines()[-1]), json.loads(two.stdout.splitlines()[-1])
    return a, b


def test_fd_shapes_search_on_two_ranks_equals_one(micro_ckpt, tmp_path_factory):
    """torchrun: samples sharded over 2 processes, features gathered, the FD computed on rank 0 and
    broadcast; the scores equal one process's (FD-shapes: offline, a small cached ShapesNet)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINUNITE_CACHE", str(cache))
        fid.load_shapes_net(steps=30, n_train=500, n_test=300)
    tag = f"shapes_fd_net_d{data.SHAPES_VERSION}"
    shutil.copy(cache / f"{tag}_30_500_300.pt", cache / f"{tag}.pt")  # pose as the real one
    env = dict(os.environ, MINUNITE_CACHE=str(cache), OMP_NUM_THREADS="1")
    path, _ = micro_ckpt
    a, b = _two_ranks_equal_one([path, "--metric", "fd-shapes", "--cfg-search", "2",
                                 "--num-samples", "30", "--batch-size", "8"], env)
    assert a["metric"] == "FD-shapes" and a["search"] == "adaptive"
    # other batches round a few pixels the other way (8-bit): ~1e-6 of the score (measured 3e-6)
    assert a["by_cfg_scale"] == pytest.approx(b["by_cfg_scale"], rel=1e-4)
    assert a["best_cfg_scale"] == b["best_cfg_scale"]


# -----------------------------------------------------------------------------
# rFID and PSNR of reconstructions

class ShiftModel(torch.nn.Module):
    """Reconstructs an 8-bit image as itself plus `shift` levels (0: perfect reconstruction)."""

    def __init__(self, shift=0):
        super().__init__()
        self.shift, self.cfg = shift, unite.make_config("micro", num_classes=6)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def reconstruct(self, x, noise=None, t=None):  # the contract of UNITE.reconstruct
        return (((x * 255).round() + self.shift) / 255).clamp(0, 1)


def test_rfid_of_a_set_against_its_own_stats_is_zero(micro_ckpt, fake_inception, tmp_path,
                                                     monkeypatch, capsys):
    path, _ = micro_ckpt
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: (ShiftModel(0), {"args": SAMPLING}))
    _, r = run_main([path, "--recon-data", "shapes", "--num-samples", "40"], capsys)
    assert r["metric"] == "rFID" and r["n"] == 40 and r["ref"] == "the same 40 real images"
    assert r["value"] == pytest.approx(0, abs=1e-8)
    assert r["psnr"] == pytest.approx(20 * np.log10(255 / 1e-5))  # mse 0 floored at 1e-10
    real = shapes_test_images(40)
    stats = str(tmp_path / "own.npz")
    mu, sigma = fid.feature_stats(pool_features(real).double().numpy())
    np.savez(stats, mu=mu, sigma=sigma)
    _, r = run_main([path, "--recon-data", "shapes", "--num-samples", "40", "--fid-ref", stats],
                    capsys)
    assert r["value"] == pytest.approx(0, abs=1e-8) and r["ref"] == stats
    # every pixel 3 levels brighter (shapes never exceed 252): PSNR = 20 log10(255 / 3), rFID > 0
    assert real.amax() * 255 <= 252
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: (ShiftModel(3), {"args": SAMPLING}))
    _, r = run_main([path, "--recon-data", "shapes", "--num-samples", "40", "--batch-size", "16"],
                    capsys)
    assert r["psnr"] == pytest.approx(20 * np.log10(255 / 3), rel=1e-12) and r["value"] > 1e-6


def test_rfid_of_a_real_model(micro_ckpt, fake_inception, capsys):
    """The micro model's reconstructions: rFID > 0, a finite PSNR, the same figures on a repeat and
    at another batch size (the tokenizer noise is keyed per image)."""
    path, m = micro_ckpt
    argv = [path, "--recon-data", "shapes", "--num-samples", "30", "--batch-size", "16"]
    _, r = run_main(argv, capsys)
    _, again = run_main(argv, capsys)
    assert r["value"] > 0 and 0 < r["psnr"] < 100 and r == again
    _, other = run_main(argv[:-1] + ["7"], capsys)
    assert (abs(other["psnr"] - r["psnr"]) < 1e-9
            and abs(other["value"] - r["value"]) < 1e-6 * r["value"])


# -----------------------------------------------------------------------------
# the authors' checkpoint files

def released_file(path, m):
    """m's weights as the authors' checkpoint holds them (utils/checkpoint.py): released names
    (official._official_name), the decoder under torch.compile's _orig_mod., their extra label
    row."""
    sd = {}
    for k, v in m.state_dict().items():
        name = official._official_name(k)
        if name.startswith("decoder."):
            name = "decoder._orig_mod." + name[len("decoder."):]
        if k == "encoder.y_embed.weight":
            v = torch.cat([v, torch.zeros_like(v[:1])])
        elif k == "decoder.cls":
            v = v.flatten()
        sd[name] = v
    torch.save({"step": 7, "epoch": 1, "model": sd, "ema": sd, "optimizer": {"state": {}},
                "current_best_cfg_scale": 3.2}, path)
    return path


def test_released_file_routes_to_from_official(tmp_path, monkeypatch, capsys):
    m = micro_model(num_classes=1000)
    path = released_file(str(tmp_path / "UNITE-B.pt"), m)
    calls = []
    real = official.from_official
    monkeypatch.setattr(official, "from_official", lambda ck, cfg, preset=None: calls.append(
        (sorted(ck), cfg, preset)) or real(ck, m.cfg, preset))  # the file holds micro weights
    loaded, meta = sample.load_model(path, "cpu")
    assert calls[-1] == (["current_best_cfg_scale", "ema", "epoch", "model", "optimizer", "step"],
                         unite.make_config("B"), "B")
    assert meta["args"] == sample.RELEASED_SAMPLING == dict(sample_steps=50, sampler="dopri5",
                                                            cfg_scale=3.4, cfg_min_t=0.1)
    assert not any(isinstance(v, dict) for k, v in meta.items() if k not in ("args", "config"))
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    sample.load_model(path, "cpu", use_ema=False, preset="L")
    assert calls[-1][0] == ["model"] and calls[-1][1] == unite.make_config("L")
    # the whole script: the paper's sampling defaults for an authors' file (dopri5 on a micro model)
    lines, r = run_main([path, "--per-class", "1", "--num-samples", "2", "--out",
                         str(tmp_path / "g.png")], capsys)
    assert (r["method"], r["steps"], r["cfg_scale"], r["cfg_min_t"]) == ("dopri5", 50, 3.4, 0.1)
    assert "UNITE-B EMA weights, step 7, dopri5-50" in lines[0]
    assert "the file's search kept cfg 3.2" in lines[0]


def test_released_file_with_the_wrong_preset_is_one_line(tmp_path):
    path = released_file(str(tmp_path / "UNITE-L.pt"), micro_model(num_classes=1000))
    r = subprocess.run([sys.executable, "sample.py", path, "--model", "L"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0
    assert r.stderr.startswith("error: --model L has 24 encoder.blocks.* layers")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not sample.is_released({"config": {}, "ema": {"encoder.blocks.0.x": 0}})  # ours
    assert not sample.is_released({"model": {"w": 0}})
    assert sample.is_released({"model": {"module.up_sample_decoder.weight": 0}})


# -----------------------------------------------------------------------------
# user errors: one line each, before any sampling

@pytest.mark.parametrize("argv, msg", [
    (["--recon-data", "/no/such/folder"], "data folder not found: /no/such/folder"),
    (["--fid-ref", "/no/such/ref.npz"], "reference statistics not found: /no/such/ref.npz"),
    (["--cfg-scales", "3,x"], "--cfg-scales '3,x': give numbers"),
    (["--cfg-scales", "1,2"], "FID needs --fid-ref"),
    (["--cfg-scales", "1,2", "--cfg-search", "--metric", "fd-shapes"], "not both"),
    (["--recon-data", "shapes", "--cfg-search"], "--recon-data scores reconstructions"),
    (["--metric", "fd-shapes", "--out-dir", "x"], "--out-dir writes PNGs"),
])
def test_user_errors(micro_ckpt, argv, msg):
    with pytest.raises(UserError, match=None) as e:
        sample.main([micro_ckpt[0], *argv])
    assert msg in str(e.value)


def test_bad_recon_path_is_one_line(micro_ckpt):
    r = subprocess.run([sys.executable, "sample.py", micro_ckpt[0], "--recon-data", "/no/such/val"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip() == "error: data folder not found: /no/such/val"
