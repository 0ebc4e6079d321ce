"""bench.py tests: the analytic FLOP count equals torch's per-op count, and the quick benchmark runs
end to end.
Run: python -m pytest tests/test_bench.py -q"""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from model import UNITE, draw_noise, make_config


@pytest.mark.parametrize("overrides", [dict(), dict(flow_copies=3, in_context_len=0),
                                       dict(separate=True)])
def test_train_flops_match_torch_flop_counter(overrides):
    torch.manual_seed(0)
    cfg = make_config("micro", num_classes=4, **overrides)
    model, B = UNITE(cfg), 3
    x, y = torch.rand(B, 3, 32, 32), torch.randint(0, 4, (B,))
    # the math attention kernel runs as bmm's, which the counter sees (it has no rule for the CPU
    # flash kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = model(x, y, draw_noise(cfg, B))
        loss.backward()
    counted = counter.get_total_flops()
    # torch counts what runs: the patch-embed conv needs no input gradient (images are leaves), the
    # rest is 3x
    assert abs(bench.train_flops(cfg, B) - counted) / counted < 0.02


def test_quick_bench_prints_json(capsys):
    res = bench.main(["--quick", "--device", "cpu"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(res))
    assert 0 < last["tiny_train_peak_fraction"] and last["sampler_nfe"] > 0
    assert last["frechet_rel_diff"] < 1e-6   # fid.py's Fréchet distance = the sqrtm formula
