"""
Tests for perceptual.LPIPS (VGG16 LPIPS v0.1) and its loaders, CPU only, a few seconds:

    python -m pytest -q tests/test_lpips.py

The real weight files are not in CI (the `lpips` package is not a dependency and VGG16 is 528 MB),
so the tests write their own files in the published formats with random weights: a torchvision
vgg16 state dict (features.* plus classifier.*) and a heads file (linK.model.1.weight). With the
same weights, perceptual.LPIPS equals the `lpips` package (0.1.4) to 0.0 (checked outside the repo).
"""
import urllib.request

import pytest
import torch
import torch.nn.functional as F

import data
import perceptual
from data import UserError

CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)   # conv indices in vgg16.features
POOLS = (4, 9, 16, 23)                                       # max pools (the last one, 30, unused)
TAPS = (3, 8, 15, 22, 29)                                    # relu1_2 .. relu5_3


def torchvision_vgg16_state_dict(seed=0):
    """Random weights with torchvision's vgg16 keys and shapes, classifier included."""
    g = torch.Generator().manual_seed(seed)
    sd, cin = {}, 3
    for i, cout in zip(CONVS, (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)):
        std = (2 / (9 * cin)) ** 0.5                             # He init keeps activations O(1)
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * std
        sd[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
        cin = cout
    sd["classifier.0.weight"] = torch.randn(8, 8, generator=g)  # stands in for the (ignored) head
    sd["classifier.0.bias"] = torch.zeros(8)
    return sd


def heads_state_dict(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
            for i, c in enumerate((64, 128, 256, 512, 512))}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    vgg, lin = torchvision_vgg16_state_dict(), heads_state_dict()
    torch.save(vgg, d / "vgg16.pth")
    torch.save(lin, d / "heads.pth")
    return dict(dir=d, vgg=vgg, lin=lin,
                vgg_path=str(d / "vgg16.pth"), lin_path=str(d / "heads.pth"))


@pytest.fixture(scope="module")
def net(files):
    return perceptual.LPIPS(files["vgg_path"], files["lin_path"])


def reference_lpips(vgg, lin, a, b):
    """The LPIPS v0.1 formula straight from the two state dicts (functional, no module)."""
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    def feats(x):
        x, out = (x - shift) / scale, []
        for i in range(30):
            if i in CONVS:
                x = F.conv2d(x, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1)
            elif i in POOLS:
                x = F.max_pool2d(x, 2)
            else:
                x = x.clamp_min(0)
            if i in TAPS:
                out.append(x)
        return out

    d = torch.zeros(a.shape[0], dtype=torch.float64)
    for k, (fa, fb) in enumerate(zip(feats(a), feats(b))):
        fa = fa / (torch.sqrt((fa ** 2).sum(1, keepdim=True)) + 1e-10)
        fb = fb / (torch.sqrt((fb ** 2).sum(1, keepdim=True)) + 1e-10)
        w = lin[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        d += ((fa - fb) ** 2 * w).sum(1).mean(dim=(1, 2)).double()
    return d


def images(B=2, px=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, px, px, generator=g) * 2 - 1


def test_loaded_weights_and_output_match_reference_formula(files, net):
    sd = net.state_dict()
    for k, v in files["vgg"].items():
        if k.startswith("features."):
            assert torch.equal(sd[k], v), k
    for i, h in enumerate(net.heads):
        assert torch.equal(h.weight, files["lin"][f"lin{i}.model.1.weight"])
    a, b = images(seed=0), images(seed=1)
    for x, y in ((a, b), (a, (a + 0.05 * torch.randn_like(a)).clamp(-1, 1))):
        with torch.no_grad():
            out = net(x, y)
        assert out.shape == (2,)
        ref = reference_lpips(files["vgg"], files["lin"], x, y)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    # per-image distances: a batch equals its images taken one at a time (non-square too)
    x, y = images(2, 48, seed=2)[..., :40], images(2, 48, seed=3)[..., :40]
    with torch.no_grad():
        both = net(x, y)
        single = torch.cat([net(x[i:i + 1], y[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-7)


def test_identical_images_give_zero_and_order_does_not_matter(net):
    a, b = images(seed=4), images(seed=5)
    with torch.no_grad():
        assert torch.equal(net(a, a), torch.zeros(2))
        torch.testing.assert_close(net(a, b), net(b, a))
        assert (net(a, b) > 0).all()


def test_frozen_eval_and_gradient_reaches_the_input(net):
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training and not any(m.training for m in net.modules())
    features = {k for k in torchvision_vgg16_state_dict() if k.startswith("features.")}
    heads = {f"heads.{i}.weight" for i in range(5)}
    assert set(net.state_dict()) == features | heads              # scaling constants not saved
    x = images(1, seed=6).requires_grad_(True)
    net(x, images(1, seed=7)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_loss_released_and_defined(net):
    recon, imgs = (images(2, seed=8) + 1) / 2, (images(2, seed=9) + 1) / 2     # [0, 1]
    with torch.no_grad():
        # released: [0, 1] fed unchanged, batch mean; in eval no dropout
        rel = perceptual.lpips_loss(net, recon, imgs, released=True, training=False)
        torch.testing.assert_close(rel, net(imgs, recon).mean())
        # as defined: 2x - 1
        torch.testing.assert_close(perceptual.lpips_loss(net, recon, imgs, released=False),
                                   net(2 * imgs - 1, 2 * recon - 1).mean())
        # released training steps: dropout p = 0.5 before each head (reproducible from the seed)
        torch.manual_seed(0)
        d1 = perceptual.lpips_loss(net, recon, imgs, released=True, training=True)
        torch.manual_seed(0)
        d2 = perceptual.lpips_loss(net, recon, imgs, released=True, training=True)
        assert torch.equal(d1, d2) and not torch.allclose(d1, rel, rtol=1e-4)


@pytest.mark.parametrize("which, key, change", [
    ("vgg", "features.28.bias", "drop"),
    ("vgg", "features.10.weight", "shape"),
    ("lin", "lin2.model.1.weight", "drop"),
    ("lin", "lin4.model.1.weight", "shape"),
])
def test_bad_files_name_the_key(files, tmp_path, which, key, change):
    sd = dict(files[which])
    if change == "drop":
        del sd[key]
        if which == "lin":
            sd["lin2.model.0.weight"] = files["lin"][key]   # as if saved without the dropout
    else:
        sd[key] = sd[key][:, :-1]
    path = str(tmp_path / "bad.pth")
    torch.save(sd, path)
    paths = {"vgg_path": files["vgg_path"], "lin_path": files["lin_path"], which + "_path": path}
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
        perceptual.LPIPS(**paths)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_missing_or_unreadable_file(files, tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="nope.pth: no such file"):
        perceptual.LPIPS(missing, files["lin_path"])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth: not a torch state dict"):
        perceptual.LPIPS(files["vgg_path"], str(junk))


def test_load_lpips_offline_says_where_to_put_each_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MINUNITE_CACHE", str(tmp_path))

    def offline(url, path):
        raise OSError("no network")
    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(UserError) as e:
        perceptual.load_lpips()
    msg = data.error_line(e.value)
    assert msg == str(e.value)                                    # one line
    for url, sha256, name in perceptual.LPIPS_FILES.values():
        assert str(tmp_path / name) in msg and url in msg and sha256 in msg


def test_load_lpips_from_cache(files, tmp_path, monkeypatch):
    """The table drives the cache paths and checksums (here pointed at the test's own files)."""
    monkeypatch.setenv("MINUNITE_CACHE", str(files["dir"]))
    table = {"vgg": ("http://unused/vgg16.pth", data.file_hash(files["vgg_path"]), "vgg16.pth"),
             "lin": ("http://unused/heads.pth", data.file_hash(files["lin_path"]), "heads.pth")}
    monkeypatch.setattr(perceptual, "LPIPS_FILES", table)
    net = perceptual.load_lpips("cpu")
    a, b = images(1, seed=10), images(1, seed=11)
    with torch.no_grad():
        ref = reference_lpips(files["vgg"], files["lin"], a, b)
        torch.testing.assert_close(net(a, b).double(), ref, rtol=1e-5, atol=1e-7)
    # a corrupt cached file: UserError naming the file and where it comes from
    table["lin"] = ("http://unused/heads.pth", "0" * 64, "heads.pth")
    with pytest.raises(UserError, match="heads.pth has sha256"):
        perceptual.load_lpips("cpu")
