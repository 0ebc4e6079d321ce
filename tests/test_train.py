"""train.py / sample.py tests: checkpoint round trip, exact resume, DDP == one process, gradient
accumulation, user errors. Run: python -m pytest tests/test_train.py -q"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from conftest import ROOT

# a few steps of the micro preset on the built-in data; the lr schedule does not depend on
# --max-steps
FAST = ["--model", "micro", "--batch-size", "8", "--micro-batch", "8", "--eval-samples", "0",
        "--sample-every", "-1", "--log-every", "2", "--warmup-epochs", "0.001",
        "--decay-epochs", "1", "--lr", "3e-3", "--precision", "fp32"]


def run(*args, env=None, timeout=300):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)


def weights(path, key="model"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def test_checkpoint_round_trip_and_exact_resume(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(FAST + ["--out-dir", a, "--max-steps", "4"])
    train.main(FAST + ["--out-dir", b, "--max-steps", "2"])
    train.main(FAST + ["--out-dir", b, "--max-steps", "4", "--resume", "auto"])
    # plain data only
    ca = torch.load(os.path.join(a, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert {"model", "ema", "optimizer", "step", "config", "args"} <= set(ca)
    assert ca["step"] == 4 and ca["config"]["enc_width"] == 64
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ca["model"])
    cb = weights(os.path.join(b, "ckpt.pt"))
    for k in ca["model"]:
        # k steps + resume + n steps == k + n steps, bit for bit
        assert torch.equal(ca["model"][k], cb[k]), k
    for k, v in weights(os.path.join(b, "ckpt.pt"), "ema").items():
        assert torch.equal(ca["ema"][k], v), k


def logged(out):
    """Per-step (loss, recon, flow, grad-norm) from log.txt: the grad norm is taken before clipping
    and after the DDP all-reduce, so a wrong averaging (sum instead of mean, double division) shows
    up here."""
    rows = [l.split(" | ") for l in open(os.path.join(out, "log.txt")) if l.startswith("step ")]
    return [[float(f.split()[-1]) for f in r[1:5]] for r in rows]


def same_run(a, b):
    la, lb = logged(a), logged(b)
    # micro-batches and ranks change the order of the float sums, so a printed figure may differ in
    # its last digit (seen on an AVX512 CPU: grad norm 54.054 vs 54.055); a wrong averaging is off
    # by a factor, far outside this
    assert len(la) >= 2 and np.allclose(la, lb, rtol=1e-4, atol=1e-4), (la, lb)
    wa, wb = weights(os.path.join(a, "ckpt.pt")), weights(os.path.join(b, "ckpt.pt"))
    # Adam and Muon normalise their updates: float-rounding differences in near-zero gradients
    # (adaLN-Zero weights, t-embedding at step 1) become updates of up to lr = 3e-3. The strict
    # check is the logged loss and grad norm above; weights are compared below one step's update
    # (a rank that did not learn fails this)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=2e-3), k


def test_gradient_accumulation_equals_one_batch(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(FAST + ["--out-dir", a, "--max-steps", "3", "--log-every", "1"])
    train.main(FAST + ["--out-dir", b, "--max-steps", "3", "--log-every", "1",
                       "--micro-batch", "4"])
    same_run(a, b)


def test_ddp_two_processes_equal_one(tmp_path):
    a, b = str(tmp_path / "one"), str(tmp_path / "ddp")
    train.main(FAST + ["--out-dir", a, "--max-steps", "3", "--log-every", "1"])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=29517", "train.py", *FAST, "--micro-batch", "4",
                        "--out-dir", b, "--max-steps", "3", "--device", "cpu", "--log-every", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "world 2" in r.stdout and "batch 8 = 4 x 1 accum x 2" in r.stdout
    same_run(a, b)


def test_sample_py_grid_and_png_dir(tmp_path):
    out = str(tmp_path / "run")
    train.main(FAST + ["--out-dir", out, "--max-steps", "2", "--cfg-scale", "2.5"])
    ck = os.path.join(out, "ckpt.pt")
    r = run("sample.py", ck, "--steps", "3", "--per-class", "2")
    assert r.returncode == 0, r.stderr
    from PIL import Image
    im = Image.open(os.path.join(out, "ckpt_samples.png"))
    assert im.size == (2 * 32, 6 * 32)  # 6 classes (shapes) as rows, 2 columns
    # settings read from the checkpoint
    assert "NFE 6" in r.stdout and '"cfg_scale": 2.5' in r.stdout
    r = run("sample.py", ck, "--steps", "2", "--num-samples", "5",
            "--out-dir", str(tmp_path / "pngs"))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "pngs")) == [f"{i:06d}.png" for i in range(5)]
    # sample i depends neither on the batch size nor on the number of processes
    # (torchrun shards the indices)
    r = run("sample.py", ck, "--steps", "2", "--num-samples", "5", "--batch-size", "2",
            "--out-dir", str(tmp_path / "pngs2"))
    assert r.returncode == 0, r.stderr
    r = run("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518", "sample.py",
            ck, "--steps", "2", "--num-samples", "5", "--device", "cpu",
            "--out-dir", str(tmp_path / "pngs3"))
    assert r.returncode == 0, r.stderr[-2000:]
    for d in ("pngs2", "pngs3"):
        assert sorted(os.listdir(tmp_path / d)) == [f"{i:06d}.png" for i in range(5)]
        for i in range(5):
            a = np.asarray(Image.open(tmp_path / "pngs" / f"{i:06d}.png"))
            b = np.asarray(Image.open(tmp_path / d / f"{i:06d}.png"))
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def one_line_error(r, text):
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if not l.startswith("downloading")]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], r.stderr[-2000:]


def test_bad_inputs_give_one_clear_line(tmp_path):
    one_line_error(run("train.py", "--model", "XXL", "--data", "shapes"), "unknown --model 'XXL'")
    one_line_error(run("train.py", "--model", "micro", "--data", str(tmp_path / "nope")),
                   "data folder not found")
    bad = tmp_path / "imgs"
    bad.mkdir()
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 10, 10)).save(bad / "ok.PNG")
    (bad / "broken.png").write_bytes(b"not a png at all")
    one_line_error(run("train.py", *FAST, "--data", str(bad), "--batch-size", "2",
                       "--micro-batch", "2", "--num-workers", "1",
                       "--out-dir", str(tmp_path / "o")),
                   "broken.png")
    one_line_error(run("sample.py", str(tmp_path / "missing.pt")), "checkpoint not found")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    one_line_error(run("sample.py", str(tmp_path / "junk.pt")), "not a UNITE checkpoint")
    # another script's checkpoint, each way round
    torch.save({"vae_config": {}, "vae": {}}, tmp_path / "vae.pt")
    one_line_error(run("sample.py", str(tmp_path / "vae.pt")),
                   "not a UNITE checkpoint (it has no 'config')")
    torch.save({"config": {}, "ema": {}, "model": {}}, tmp_path / "unite.pt")
    one_line_error(run("train.py", *FAST, "--tokenizer", str(tmp_path / "unite.pt"),
                       "--out-dir", str(tmp_path / "o")),
                   "not a sendvae.py checkpoint (it has no 'vae_config')")
    one_line_error(run("train.py", *FAST, "--resume", str(tmp_path / "none.pt"),
                       "--out-dir", str(tmp_path / "o")),
                   "file not found")
    one_line_error(run("train.py", *FAST, "--resume", str(tmp_path / "vae.pt"),
                       "--out-dir", str(tmp_path / "o")),
                   "not a train.py checkpoint (it has no 'config')")


def test_folder_dataset_and_sigterm_saves(tmp_path):
    """ImageFolder with 2 classes trains (classes inferred), and SIGTERM saves a checkpoint and
    exits 0."""
    from PIL import Image
    for c, col in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (48, 40), col).save(tmp_path / "d" / c / f"{i}.jpg")
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "train.py", *FAST, "--data", str(tmp_path / "d"),
                          "--batch-size", "4", "--micro-batch", "4", "--num-workers", "0",
                          "--max-steps", "100000", "--log-every", "1", "--out-dir", str(out)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while (time.time() < deadline and not (out / "log.txt").exists()
           or "step 2 " not in open(out / "log.txt").read()):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "SIGTERM: saved" in stdout and "2 classes" in stdout
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert (ck["config"]["num_classes"] == 2 and ck["class_names"] == ["blue", "red"]
            and ck["step"] >= 2)


STOP_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from data import StopCheck
dist.init_process_group("gloo")
rank = dist.get_rank()
stop = StopCheck(0, "wall", "cpu", 2)
first = stop()
if rank == 1:
    os.kill(os.getpid(), {sig})  # only rank 1 is signalled
flags = [first, stop(), stop.sigterm, stop.out_of_time]
open(os.path.join({out!r}, f"rank{{rank}}.txt"), "w").write(repr(flags))
dist.destroy_process_group()
"""


def test_stop_check_is_the_same_on_every_rank(tmp_path):
    """SIGTERM on one rank stops every rank at the same step (a rank that left the loop alone would
    hang the others in their next all-reduce); a spent budget stops with out_of_time."""
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT.format(root=ROOT, sig=int(signal.SIGTERM), out=str(tmp_path)))
    r = run("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
            str(script))
    assert r.returncode == 0, r.stderr[-2000:]
    for rank in (0, 1):  # [before the signal, after it, .sigterm, .out_of_time]
        assert (tmp_path / f"rank{rank}.txt").read_text() == "[False, True, True, False]"
    from data import StopCheck
    old = signal.getsignal(signal.SIGTERM)
    try:
        stop = StopCheck(1e-6, "cpu")
        sum(i * i for i in range(200_000))                   # spend some CPU time
        assert stop() and stop.out_of_time and not stop.sigterm
    finally:
        signal.signal(signal.SIGTERM, old)


def test_cifar10_offline_and_corrupt_download(tmp_path, monkeypatch):
    import data
    monkeypatch.setenv("MINUNITE_CACHE", str(tmp_path))
    # nothing listens there
    monkeypatch.setattr(data, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(data.UserError, match="put the file at .*cifar-10-python.tar.gz"):
        data.get_dataset("cifar10")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"truncated")
    with pytest.raises(data.UserError, match="md5"):
        data.get_dataset("cifar10")


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    import model
    real = model.UNITE.forward

    def nan_forward(self, *a, **k):
        loss, st = real(self, *a, **k)
        return loss * float("nan"), st
    monkeypatch.setattr(model.UNITE, "forward", nan_forward)
    from data import UserError
    with pytest.raises(UserError, match="5 non-finite steps in a row"):
        train.main(FAST + ["--out-dir", str(tmp_path), "--max-steps", "20"])
    assert "step 0: non-finite" in open(tmp_path / "log.txt").read()


def test_fid_during_training_with_a_test_made_inception_file(tmp_path):
    import fid
    torch.manual_seed(0)
    w = tmp_path / "inception_random.pth"
    # random weights: only the plumbing is tested
    torch.save(fid.InceptionV3(pretrained=False).state_dict(), w)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(64, 2048))
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    out = tmp_path / "o"
    train.main(FAST + ["--out-dir", str(out), "--max-steps", "2",
                       "--fid-ref", str(tmp_path / "ref.npz"), "--fid-every", "2",
                       "--fid-samples", "3", "--inception", str(w), "--sample-steps", "2"])
    log = open(out / "log.txt").read()
    assert "FID-3 " in log and "EMA, heun-2" in log
    f = float(log.split("FID-3 ")[1].split()[0])
    assert np.isfinite(f) and f > 0


def test_tiny_time_budget_only_guards_the_default_length():
    """The tiny preset's 440 s guard applies to the default run only: an explicit --max-steps /
    --epochs runs in full unless --time-budget is also given."""
    assert train.parse_args([]).time_budget == train.TINY_RUN["time_budget"] > 0
    assert train.parse_args(["--max-steps", "4500"]).time_budget == 0
    assert train.parse_args(["--epochs", "3"]).time_budget == 0
    assert train.parse_args(["--max-steps", "4500", "--time-budget", "60"]).time_budget == 60


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_stops_the_loop(tmp_path, capsys, clock):
    """--time-budget (seconds of the loop, wall or CPU clock) ends a run long before --max-steps,
    which still ends cleanly and says so."""
    train.main(FAST + ["--out-dir", str(tmp_path), "--max-steps", "100000", "--time-budget", "1",
                       "--budget-clock", clock])
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert 0 < res["steps"] < 100000 and 1 <= res[{"wall": "wall_s", "cpu": "cpu_s"}[clock]] < 30
    assert f"reached: stopped at step {res['steps']} of 100000" in "\n".join(out)
    assert weights(tmp_path / "ckpt.pt", "step") == res["steps"]


def test_shape_acc_matches_generated_labels(monkeypatch):
    """shape_acc compares the classifier's shape with the class each sample was generated for
    (i % classes):
    a generator that draws the right class scores 1, one that is off by one class scores 0."""
    import fid

    class LabelNet(torch.nn.Module):  # features = the class written into the image's pixel value
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.heads = {
                "shape": lambda f: torch.nn.functional.one_hot(f[:, 0].round().long(), 6).float()}
            self.ref_mu, self.ref_sigma = np.zeros(2), np.eye(2)

        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)) * 10, x.mean((1, 2, 3))], 1)

    ema = torch.nn.Linear(1, 1)
    monkeypatch.setattr(fid, "load_shapes_net", lambda: LabelNet())
    args = train.parse_args(["--eval-samples", "30"])
    for offset, want in ((0, 1.0), (1, 0.0)):
        fake = lambda m, idx, c, seed, **kw: (
            torch.stack([torch.full((3, 32, 32), ((i + offset) % c) / 10) for i in idx]), 0)
        monkeypatch.setattr(train, "generate", fake)
        fd, acc = train.fd_shapes_of_samples(ema, 30, 6, args, rank=0, world=1)
        assert acc == want and np.isfinite(fd)


def test_shapes_tilt_range_and_bins(monkeypatch):
    """Shapes v3 tilts by -10..10 degrees in 4 rotation bins. A square tilted by theta fills
    1 / (cos + sin)^2 of its bounding box: >= 0.745 for |theta| <= 10 (0.5 at 45 degrees, which
    version 2's 0..90 drew), and the outer bins (5-10 degrees either way) fill less than the inner
    ones. White shapes on black make the mask exact."""
    import data
    monkeypatch.setattr(data, "COLORS", np.full((8, 3), 250, np.float32))
    monkeypatch.setattr(data, "BACKGROUNDS", np.zeros((4, 3), np.float32))
    imgs, a = data.make_shapes(1500, seed=5)
    fill, bins = [], []
    for img, b in zip(imgs[a["shape"] == 1], a["rotation"][a["shape"] == 1]):
        ys, xs = np.nonzero(img.mean(-1) > 128)
        if min(ys.min(), xs.min()) > 0 and max(ys.max(), xs.max()) < 31:  # not cut by the border
            fill.append(len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
            bins.append(b)
    fill, bins = np.array(fill), np.array(bins)
    assert len(fill) > 100 and set(bins) == {0, 1, 2, 3}
    assert fill.min() > 0.7
    assert fill[(bins == 1) | (bins == 2)].mean() > fill[(bins == 0) | (bins == 3)].mean() + 0.03


def plan_args(*extra):
    return train.parse_args(["--plan", *extra])


def test_plan_fake_count_equals_the_real_saved_tensors():
    """--plan counts with fake tensors (shapes only); the same step run for real saves exactly as
    many bytes, with LPIPS, chunked flow copies and the checkpointed denoising pass
    (K = 6 > 4: auto)."""
    args = plan_args("--model", "micro", "--micro-batch", "3", "--batch-size", "6",
                     "--plan-gpus", "2", "--flow-copies", "6", "--lpips")
    fake, real = train.memory_plan(args, fake=True), train.memory_plan(args, fake=False)
    assert fake["checkpoint_flow"] and fake["activation_bytes"] > 0
    assert fake["activation_bytes"] == real["activation_bytes"]
    assert fake["recompute_gb"] == real["recompute_gb"]


def test_plan_activations_scale_and_checkpointing_cuts_them():
    """Saved activations grow linearly with the micro-batch; checkpointing the denoising pass keeps
    only each block's input, far less than the blocks' saved tensors; chunking alone changes
    nothing."""
    base = ["--model", "micro", "--batch-size", "8", "--plan-gpus", "1", "--flow-copies", "6"]
    act = lambda *a: train.memory_plan(plan_args(*base, *a))["activation_bytes"]
    one, two = act("--micro-batch", "1"), act("--micro-batch", "2")
    assert act("--micro-batch", "4") - two == 2 * (two - one)
    assert act("--micro-batch", "4", "--grad-checkpoint", "off") > 1.5 * act("--micro-batch", "4")
    off = ("--micro-batch", "4", "--grad-checkpoint", "off")
    assert act(*off, "--flow-chunk", "1") == act(*off, "--flow-chunk", "6")


def test_plan_paper_presets_fit_80gb(capsys):
    """The default B and L runs on 8 GPUs fit an 80 GB card (a lower bound), and the last line is
    JSON."""
    for m in ("B", "L"):
        train.main(["--model", m, "--plan"])
        plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert plan["peak_gb_per_gpu"] <= 80 and plan["gpus"] == 8 and plan["flow_copies"] == 14
        assert (plan["checkpoint_flow"] and plan["lpips"]
                and plan["accum_steps"] * plan["micro_batch"] * 8 == 1024)


def test_periodic_eval_logs_and_keeps_the_best_ema(tmp_path, monkeypatch, capsys):
    """--eval-every: each evaluation is logged and goes into the JSON; ckpt_best.pt holds the EMA of
    the lowest FD-shapes so far, beside the last checkpoint."""
    # FD-shapes-200, shape_acc at steps 2, 4, 6
    scores = iter([(50.0, 0.5), (80.0, 0.4), (20.0, 0.9)])
    monkeypatch.setattr(train, "fd_shapes_of_samples", lambda *a: next(scores))
    out = str(tmp_path / "e")
    train.main(FAST + ["--out-dir", out, "--max-steps", "4", "--eval-every", "2"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [e["step"] for e in res["evals"]] == [2, 4] and res["evals"][1]["shape_acc"] == 0.4
    best = torch.load(os.path.join(out, "ckpt_best.pt"), map_location="cpu", weights_only=True)
    assert best["step"] == 2 and weights(os.path.join(out, "ckpt.pt"), "step") == 4
    train.main(FAST + ["--out-dir", out, "--max-steps", "6", "--eval-every", "2",
                       "--resume", "auto"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [e["step"] for e in res["evals"]] == [2, 4, 6]  # kept across --resume
    assert torch.load(os.path.join(out, "ckpt_best.pt"), weights_only=True)["step"] == 6


def test_final_eval_far_below_the_best_is_said(tmp_path, monkeypatch, capsys):
    """A run that ends inside a transient instability (final shape_acc far below the best periodic
    one) says so in one line and names ckpt_best.pt; the JSON carries the best evaluation."""
    def scores(ema, n, *a):                    # periodic: 200 samples; the end of the run: 500
        return (30.0, 0.95) if n == 200 else (2000.0, 0.2)
    monkeypatch.setattr(train, "fd_shapes_of_samples", scores)
    monkeypatch.setattr(train, "psnr", lambda *a, **k: 30.0)
    out = str(tmp_path / "w")
    train.main(FAST + ["--out-dir", out, "--max-steps", "2", "--eval-every", "2",
                       "--eval-samples", "500"])
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["best_eval"] == {"step": 2, "fd_shapes_200": 30.0, "shape_acc": 0.95}
    assert res["shape_acc"] == 0.2
    warn = [l for l in lines if l.startswith("warning: the final EMA")]
    assert len(warn) == 1 and "ckpt_best.pt holds the step-2 EMA" in warn[0]


def test_lpips_term_in_training(tmp_path, monkeypatch):
    """--lpips adds the LPIPS term to L_recon (here with random VGG weights); without the weight
    files the run stops with one line saying where to put them."""
    import urllib.request

    import perceptual
    calls = []

    def fake_lpips(device):
        calls.append(device)
        net = perceptual.LPIPS()  # random weights; heads >= 0 as trained ones, so the term is > 0
        for h in net.heads:
            h.weight.data.abs_()
        return net.to(device)
    monkeypatch.setattr(train, "load_lpips", fake_lpips)
    with_lp, without = str(tmp_path / "lp"), str(tmp_path / "l1")
    train.main(FAST + ["--out-dir", with_lp, "--max-steps", "1", "--lpips", "--log-every", "1"])
    train.main(FAST + ["--out-dir", without, "--max-steps", "1", "--log-every", "1"])
    recon = lambda out: logged(out)[0][1]
    assert calls and recon(with_lp) > recon(without) > 0  # same init and batch: L1 + LPIPS > L1
    monkeypatch.undo()
    monkeypatch.setenv("MINUNITE_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(urllib.request, "urlretrieve",
                        lambda *a: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(train.UserError, match="LPIPS weights: .*put the file at"):
        train.main(FAST + ["--out-dir", str(tmp_path / "x"), "--max-steps", "1", "--lpips"])
