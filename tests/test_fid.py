"""
Tests for fid.py: Frechet-distance closed forms and parity with pytorch-fid's sqrtm formula, the
Inception network (random weights: the real file cannot be downloaded in CI), weight-file checks,
the CLI, the Inception Score, FD-shapes and the DDP feature gather. CPU only, < 1 min in all:

    python -m pytest tests/test_fid.py -q                        # fast tests
    RUN_SLOW=1 python -m pytest tests/test_fid.py -q -m slow     # full ShapesNet training, 2048-d
                                                                 # timing (~2 min)
"""
import os

# numpy's multi-threaded LAPACK is slow on small matrices, and pathological (up to 100x) on a busy
# 2-core machine.
# Takes effect only if numpy is not imported yet; changes no result.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import fid  # noqa: E402
from data import UserError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The 299x299 Inception forward is faster on 1 thread than on 2 busy ones; restored for other
    test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def slow(test):
    """Marked slow (CI runs -m "not slow"), and skipped unless RUN_SLOW=1 so that a plain run of
    this file is fast."""
    return pytest.mark.slow(pytest.mark.skipif(not os.environ.get("RUN_SLOW"),
                                               reason="slow: set RUN_SLOW=1")(test))


def pytorch_fid_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (fid_score.py), rewritten step for step: scipy sqrtm
    of the product, an eps*I retry when it is not finite, the real part if the imaginary one is
    small."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy >= 1.16 deprecates disp
        covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def random_stats(d, n, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) @ (rng.standard_normal((d, d)) / np.sqrt(d))
         + rng.standard_normal(d))
    return fid.feature_stats(x)


# -----------------------------------------------------------------------------
# Frechet distance, statistics, Inception Score

def test_frechet_closed_forms():
    mu, sigma = random_stats(32, 200, 0)
    mu2 = mu + np.linspace(-1, 1, 32)
    # identical stats
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    assert fid.frechet_distance(mu, sigma, mu2, sigma) == pytest.approx(np.sum((mu - mu2) ** 2),
                                                                        rel=1e-8)
    a, b = np.array([1.0, 4.0, 0.0, 2.5]), np.array([9.0, 1.0, 0.5, 0.0])  # diagonal, both singular
    expect = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + 2.0 ** 2
    assert fid.frechet_distance(np.zeros(4), np.diag(a), np.r_[2.0, 0, 0, 0],
                                np.diag(b)) == pytest.approx(expect)
    _, sigma2 = random_stats(32, 300, 1)
    forward, backward = (fid.frechet_distance(mu, sigma, mu2, sigma2),
                         fid.frechet_distance(mu2, sigma2, mu, sigma))
    assert forward == pytest.approx(backward, rel=1e-10)  # symmetric in its arguments


@pytest.mark.parametrize("d", [16, 256])
def test_frechet_matches_pytorch_fid_formula(d):
    mu1, s1 = random_stats(d, 4 * d, 2)
    mu2, s2 = random_stats(d, 4 * d, 3)
    ours, ref = fid.frechet_distance(mu1, s1, mu2, s2), pytorch_fid_reference(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


@pytest.mark.parametrize("n2", [30, 500])
def test_frechet_singular_sigma_stays_exact(n2):
    mu1, s1 = random_stats(64, 20, 4)  # N < D: singular
    mu2, s2 = random_stats(64, n2, 5)  # singular too (n2=30): Cholesky fails, the eigh path runs
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()  # brute force
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-7)


def test_frechet_rejects_mismatched_or_broken_stats():
    mu, sigma = random_stats(8, 50, 0)
    with pytest.raises(UserError, match="do not match"):
        fid.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    with pytest.raises(UserError, match="NaN"):
        fid.frechet_distance(mu * np.nan, sigma, mu, sigma)


def test_feature_stats(capsys):
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    mu, sigma = fid.feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (8, 8)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    assert capsys.readouterr().err == ""
    fid.feature_stats(x[:5])  # N < D: a warning, not an error
    assert "sigma is singular" in capsys.readouterr().err
    with pytest.raises(UserError, match="at least 2"):
        fid.feature_stats(x[:1])


def test_inception_score():
    assert fid.inception_score(np.zeros((20, 1008))) == pytest.approx((1.0, 0.0))  # uniform: IS 1
    probs = np.eye(10)[np.arange(100) % 10]  # confident and balanced over 10 classes in each split
    assert fid.inception_score(probs) == pytest.approx((10.0, 0.0))
    logits = np.random.default_rng(0).standard_normal((100, 1008)) * 3
    mean, std = fid.inception_score(logits)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert fid.inception_score(p) == pytest.approx((mean, std))  # probabilities give the same
    with pytest.raises(UserError):
        fid.inception_score(logits[:5])


# -----------------------------------------------------------------------------
# the Inception network and its weight file

def randomize_(net, seed=0):
    """Random weights with O(1) activations all the way to pool3 (default init shrinks them to
    ~1e-8)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g)
                               * (2 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random-weight FID Inception state dict, saved like the real file (same keys)."""
    net = randomize_(fid.InceptionV3(pretrained=False))
    path = str(tmp_path_factory.mktemp("weights") / "random_inception.pth")
    torch.save(net.state_dict(), path)
    return net, path


def test_inception_forward_shape_and_logits(inception_file):
    net, _ = inception_file
    x = torch.rand(2, 3, 75, 75)
    f = net(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and f.std() > 1e-3
    assert net.logits(f).shape == (2, 1008)
    feats = fid.extract_features(net, (x * 255).to(torch.uint8), batch_size=1, progress=False)
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        fid.extract_features(net, x * 2 - 1, progress=False)  # [-1, 1] samples are a classic bug


def test_parity_with_pytorch_fid(inception_file, monkeypatch):
    try:
        import pytorch_fid.inception as pf
    except Exception as e:  # not installed, or torchvision does not import beside this torch
        pytest.skip(f"pytorch_fid not importable ({type(e).__name__}: {e})")
    ours, path = inception_file
    state = torch.load(path, weights_only=True)
    # its own API, our random file
    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: state)
    ref = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = ref(x)[0].flatten(1)
        got = ours(x)
    assert (got - expect).abs().max().item() <= 1e-4


def test_explicit_weight_file_loads_with_warning(inception_file, capsys):
    net, path = inception_file
    loaded = fid.InceptionV3(path)
    assert "not the official" in capsys.readouterr().err and loaded.sha256 == data.file_hash(path)
    x = torch.rand(1, 3, 40, 40)
    assert torch.equal(loaded(x), net(x))


def test_weight_file_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MINUNITE_CACHE", str(tmp_path))
    cached = tmp_path / fid.FID_WEIGHTS_URL.rsplit("/", 1)[1]
    cached.write_bytes(b"not the inception weights")
    with pytest.raises(UserError, match="sha256"):  # wrong file in the cache dir
        fid.InceptionV3()
    cached.unlink()
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL",
                        "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(UserError, match="put the file at"):  # offline, no file
        fid.InceptionV3()
    with pytest.raises(UserError, match="not found"):
        fid.InceptionV3(str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="not an FID Inception state dict"):
        fid.InceptionV3(str(tmp_path / "junk.pth"))


# -----------------------------------------------------------------------------
# command line

def run_cli(*args, env=None):
    """python fid.py args..., as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "fid.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def run_main(argv, monkeypatch, capsys):
    """fid.main() in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fid.py", *argv])
    try:
        fid.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def write_images(folder, imgs, exts=(".png",)):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(os.path.join(folder, f"{i:03d}{exts[i % len(exts)]}"))
    return str(folder)


def test_cli_fid_is_and_save_stats(inception_file, tmp_path, monkeypatch, capsys):
    _, weights = inception_file
    rng = np.random.default_rng(0)
    a = write_images(tmp_path / "a", rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
                     (".png", ".PNG", ".bmp"))
    b = write_images(tmp_path / "b", rng.integers(0, 128, (4, 40, 30, 3), dtype=np.uint8))
    stats = str(tmp_path / "a_stats.npz")
    r = run_cli(a, b, "--inception", weights, "--is", "--save-stats", stats, "--batch-size", "4",
                "--num-workers", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert re.search(r"^FID-10: \d+\.\d{3} \(pytorch-fid protocol, inception sha256 "
                     r"[0-9a-f]{8}\.\.\., NOT the official", r.stdout, re.M), r.stdout
    assert re.search(r"^IS-10: \d+\.\d{3} \+- \d+\.\d{3}", r.stdout, re.M)
    result = json.loads(lines[-1])
    assert (result["metric"] == "FID" and result["n"] == 10 and result["n_ref"] == 4
            and result["value"] > 0)
    with np.load(stats) as f:  # pytorch-fid's format: mu (2048,), sigma (2048, 2048)
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # 2048-d FDs take seconds: stats-only runs are checked at 8-d
    small = str(tmp_path / "small.npz")
    np.savez(small, mu=np.zeros(8), sigma=np.eye(8))
    # stats only: no network, works offline
    code, out, _ = run_main([small, small], monkeypatch, capsys)
    assert (code == 0 and "FID: 0.000 (from two statistics files" in out
            and json.loads(out.splitlines()[-1])["value"] == 0)


def test_cli_user_errors_are_one_line(inception_file, tmp_path, monkeypatch, capsys):
    _, weights = inception_file
    # the real process: no traceback
    r = run_cli(str(tmp_path / "missing"), str(tmp_path / "missing2"))
    assert r.returncode != 0 and r.stderr.strip() == f"error: {tmp_path / 'missing'}: no such " \
        f"folder or .npz file, nor a dataset name (cifar10-train, cifar10-test, shapes-train, " \
        f"shapes-test)", r.stderr
    one = write_images(tmp_path / "one", np.zeros((1, 16, 16, 3), np.uint8))
    bad = write_images(tmp_path / "bad", np.zeros((2, 16, 16, 3), np.uint8))
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "three.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "four.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp_path / "keys.npz", x=np.zeros(3))
    cases = [([one, one], "at least 2 images"), ([bad, one], "corrupt or unreadable"),
             ([str(tmp_path / "empty"), one], "no image files"),
             ([str(tmp_path / "three.npz"), str(tmp_path / "four.npz")], "statistics do not match"),
             ([str(tmp_path / "keys.npz"), one], "expected mu and sigma"),
             ([one], "give two inputs"),
             ([str(tmp_path / "three.npz"), one, "--is"], "--is needs images")]
    for argv, msg in cases:
        code, _, err = run_main(argv + ["--inception", weights, "--num-workers", "0"], monkeypatch,
                                capsys)
        assert (code == 1 and msg in err
                and err.strip().splitlines()[-1].startswith("error: ")), (argv, err)


# -----------------------------------------------------------------------------
# FD-shapes

@pytest.fixture(scope="module")
def tiny_shapes_net(tmp_path_factory):
    """A ShapesNet trained for a few steps on few images (the real one: 600 steps on 20k, ~1 min),
    cached in a temporary cache dir exactly as load_shapes_net caches the real one."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINUNITE_CACHE", str(cache))
        rng_state = torch.get_rng_state()
        net = fid.load_shapes_net(steps=30, n_train=500, n_test=300)
        assert torch.equal(torch.get_rng_state(), rng_state)  # train.py's RNG stream is left alone
        again = fid.load_shapes_net(steps=30, n_train=500, n_test=300)  # from the cache file now
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    return net, cache


def test_fd_shapes_scale(tiny_shapes_net):
    net, _ = tiny_shapes_net
    imgs, _ = data.make_shapes(600, seed=7)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    assert net.ref_mu.shape == (256,) and net.ref_sigma.shape == (256, 256)
    feats = fid.extract_features(net, x, 200, progress=False)
    mu, sigma = fid.feature_stats(feats)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
    real = fid.fd_shapes(x, net)
    # colour channels rotated: a visibly wrong generator
    swapped = fid.fd_shapes(x[:, [2, 0, 1]], net)
    repeated = fid.fd_shapes(x[:1].repeat(600, 1, 1, 1), net)  # mode collapse
    assert real < swapped and real < repeated, (real, swapped, repeated)
    with pytest.raises(UserError, match="32x32"):
        fid.extract_features(net, torch.rand(2, 3, 64, 64), progress=False)


def test_cli_fd_shapes(tiny_shapes_net, tmp_path):
    _, cache = tiny_shapes_net
    tag = f"shapes_fd_net_d{data.SHAPES_VERSION}"
    shutil.copy(cache / f"{tag}_30_500_300.pt", cache / f"{tag}.pt")  # pose as the real one
    a = write_images(tmp_path / "a", data.make_shapes(12, seed=3)[0])
    b = write_images(tmp_path / "b", data.make_shapes(12, seed=4)[0])
    r = run_cli(a, b, "--metric", "fd-shapes", "--num-workers", "0",
                env={"MINUNITE_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert re.search(r"^FD-shapes-12: \d+\.\d{3} \(.*not FID", r.stdout, re.M), r.stdout
    assert json.loads(r.stdout.splitlines()[-1])["metric"] == "FD-shapes"


@slow
def test_full_shapes_net(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINUNITE_CACHE", str(tmp_path))
    t0 = time.time()
    net = fid.load_shapes_net()
    print(f"ShapesNet training + reference stats: {time.time() - t0:.0f}s, accuracy {net.test_acc}")
    assert net.test_acc["shape"] > 0.98
    train = data.make_shapes(2000, seed=0)[0]  # the first 2000 train images
    x = torch.from_numpy(train).permute(0, 3, 1, 2).float() / 255
    real, rotated = fid.fd_shapes(x, net), fid.fd_shapes(x[:, [2, 0, 1]], net)
    print(f"FD-shapes at N=2000: real {real:.1f}, colour channels rotated {rotated:.1f}")
    assert real < 20 < 50 < rotated  # measured: 10-11 and 80-90


# -----------------------------------------------------------------------------
# DDP: features gathered across ranks

def _gather_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    feats = torch.full((2 + rank, 3), float(rank))  # uneven shards: 2 and 3 rows
    out = fid.gather_features(feats)
    assert out.shape == (5, 3) and out[:2].eq(0).all() and out[2:].eq(1).all()
    torch.distributed.destroy_process_group()


def test_gather_features():
    x = torch.rand(4, 3)
    assert fid.gather_features(x) is x  # no DDP: identity
    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.start_processes(_gather_worker, (2, port), nprocs=2, start_method="fork")


@slow
def test_frechet_speed_2048():
    mu1, s1 = random_stats(2048, 4096, 0)
    mu2, s2 = random_stats(2048, 4096, 1)
    t0 = time.time()
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    t1 = time.time()
    ref = pytorch_fid_reference(mu1, s1, mu2, s2)
    t2 = time.time()
    print(f"Frechet distance at 2048-d: ours {t1 - t0:.2f}s, scipy sqrtm {t2 - t1:.2f}s, "
          f"{(t2 - t1) / (t1 - t0):.1f}x")
    assert abs(ours - ref) <= 1e-6 * abs(ref) and (t2 - t1) >= 5 * (t1 - t0)
