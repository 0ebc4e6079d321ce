"""Molecule adapter tests: tokenizer and graph round trips, metrics on hand-made lists, bad input
lines, a tiny overfit, the CLI end to end. Run: python -m pytest tests/test_molecules.py -q"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("rdkit")
import molecules as M  # noqa: E402
from model import UniteConfig, draw_noise  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def qm9_head():
    # the first 300 QM9 lines (qm9pack), read without the full file
    return M.read_smiles(None, limit=300)


@pytest.mark.parametrize("smi", ["ClCCBr", "c1cc[nH]c1", "C[N+](C)(C)C", "C1CC2CC1CC2",
                                 "C%10CCCC%10", "F/C=C/F", "C[C@@H](O)C(=O)[O-]",
                                 "OC(=O)c1ccccc1Cl"])
def test_smiles_tokenizer_round_trip(smi):
    toks = M.tokenize_smiles(smi)
    assert "".join(toks) == smi
    vocab = [M.PAD] + sorted(set(toks))
    x = M.smiles_encode(smi, vocab, len(toks) + 3)
    assert M.smiles_decode(x, vocab)[1] == smi


def test_smiles_tokenizer_atoms():
    assert M.tokenize_smiles("ClC(Br)[nH]%12") == ["Cl", "C", "(", "Br", ")", "[nH]", "%12"]
    assert M.tokenize_smiles("C[N+](=O)[O-]") == ["C", "[N+]", "(", "=", "O", ")", "[O-]"]
    assert M.tokenize_smiles("C[C@H](F)/C=C\\C") == ["C", "[C@H]", "(", "F", ")", "/", "C", "=",
                                                     "C", "\\", "C"]
    assert M.tokenize_smiles("C{C") is None  # not a SMILES character: no silent loss


def test_graph_round_trip_qm9(qm9_head):
    n = 0
    for s in qm9_head:
        c = M.canonical(s)
        x = M.graph_encode(c, 9)
        assert x is not None, c  # QM9 fits the vocabulary
        assert (x[:, 1:] == x[:, 1:].T).all()  # bond rows form a symmetric adjacency
        assert M.graph_decode(x)[0] == c
        n += 1
    assert n == 300


def test_graph_charged_and_aromatic():
    for smi in ["C[N+](C)(C)[O-]", "[C-]#[N+]C", "c1ccoc1", "O=c1cc[nH]cc1"]:
        c = M.canonical(smi)
        assert M.graph_decode(M.graph_encode(c, 9))[0] == c
    assert M.graph_encode("CCCCCCCCCC", 9) is None  # 10 heavy atoms > 9 slots
    assert M.graph_encode("CCS", 9) is None          # sulfur is not in the vocabulary


def test_graph_decode_invalid_valence():
    x = M.graph_encode("CC(C)(C)C", 9)
    x[1, 1 + 5] = x[5, 1 + 1] = 1  # a sixth atom ...
    x[5, 0] = 1                     # ... carbon, bonded to the centre carbon: 5 bonds
    smi, raw = M.graph_decode(x)
    assert smi is None and raw.count("C") == 6


def test_valence_correct_hand_made():
    x = M.graph_encode("CC(C)(C)C", 9)
    x[1, 1 + 5] = x[5, 1 + 1] = 1  # the pentavalent carbon of the test above
    x[5, 0] = 1
    fixed = M.valence_correct(x)
    # last-index bond dropped
    assert M.graph_decode(x)[0] is None and M.graph_decode(fixed)[0] == "C.CC(C)(C)C"
    # input left untouched
    assert (fixed[:, 1:] == fixed[:, 1:].T).all() and (x != fixed).sum() == 2
    o = M.graph_encode("COC", 9)
    o[0, 1 + 1] = o[1, 1 + 0] = 2  # C=O-C: O has valence 3; its highest order bond is lowered
    assert M.graph_decode(o)[0] is None and M.graph_decode(M.valence_correct(o))[0] == "COC"
    # valid graphs are unchanged
    for smi in ["CC(=O)O", "C#N", "C[N+](C)(C)[O-]", "[C-]#[N+]C", "O=c1cc[nH]cc1"]:
        g = M.graph_encode(M.canonical(smi), 9)
        assert (M.valence_correct(g) == g).all()


def test_metrics_known_answers():
    train = [M.canonical(s) for s in ["CCO", "CC"]]
    samples = ["CCO", "OCC", "C1=CC=CC=C1", "C(C)(C)(C)(C)C", "not_smiles", "CCN"]
    r = M.evaluate(samples, train_smiles=train)
    assert r["n_samples"] == 6 and r["n_valid"] == 4  # pentavalent carbon and garbage are invalid
    assert r["validity"] == pytest.approx(4 / 6)
    assert r["uniqueness"] == pytest.approx(3 / 4)    # CCO == OCC
    assert r["novelty"] == pytest.approx(2 / 3)       # benzene and CCN are new, CCO is in train
    assert r["fcd"] is None and r["rdkit_version"]
    assert M.evaluate(["C.C", "CC"])["connected"] == pytest.approx(0.5)


def test_bad_lines_counted_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("MINUNITE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "mols.csv"
    f.write_text("id,smiles\n1,CCO\n2,C1CC\n3,c1ccccc1\n4,CCS\n5,\n6,C(C)(C)(C)(C)C\n7,CC#N\n"
                 "8,OCC=O\n")
    d = M.load_molecules(M.parse_args(["--data", str(f), "--test-frac", "0.2"]))
    assert d["n_lines"] == 7 and d["n_unparsable"] == 2                   # C1CC and pentavalent C
    assert d["train_out_of_vocab"] + d["test_out_of_vocab"] == 1           # CCS
    assert len(d["train_smiles"]) + len(d["test_smiles"]) == 4
    assert d["train_x"].shape[1:] == (9, 10)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name\n1,x\n")
    with pytest.raises(M.UserError, match="no SMILES column"):
        M.load_molecules(M.parse_args(["--data", str(bad)]))


def test_tiny_model_overfits(qm9_head):
    torch.manual_seed(0)
    smis = [M.canonical(s) for s in qm9_head[100:108]]
    x = torch.from_numpy(__import__("numpy").stack([M.graph_encode(s, 9) for s in smis]))
    meta = {"repr": "graph", "n_tokens": 9, "vocab_sizes": [len(M.ATOM_TYPES)] + [4] * 9}
    cfg = UniteConfig(latent_dim=8, enc_depth=2, enc_width=64, enc_heads=2, dec_depth=1,
                      dec_width=64, dec_heads=2, num_classes=1, in_context_len=0, class_dropout=0.0,
                      flow_copies=2, latent_tokens=9, input_tokens=9)
    model = M.build_model(cfg, meta)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    y = torch.zeros(len(x), dtype=torch.long)
    first = None
    for step in range(150):
        loss, st = model(x, y, draw_noise(cfg, len(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else (st["recon"].item(), st["flow"].item())
    assert st["recon"].item() < 0.1 * first[0]  # the decoder reads the molecules back from z0 ...
    assert st["flow"].item() < 0.5 * first[1]   # ... and the same GE learns to denoise z0
    # z0 is not a constant (the collapse build_model's init avoids)
    assert st["flow"].item() > 1e-3


def test_cli_end_to_end(tmp_path, qm9_head):
    data = tmp_path / "qm9_head.smi"
    data.write_text("\n".join(qm9_head[:250] + ["garbage(", "CCS"]) + "\n")
    out = tmp_path / "out"
    env = dict(os.environ, MINUNITE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    args = [sys.executable, os.path.join(ROOT, "molecules.py"), "--data", str(data),
            "--out-dir", str(out), "--max-steps", "4", "--batch-size", "32", "--width", "32",
            "--depth", "1", "--heads", "2", "--dec-width", "32", "--dec-depth", "1",
            "--num-samples", "40", "--recon-samples", "20", "--sample-steps", "2",
            "--log-every", "2"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 unparsable, 1 out of vocabulary" in r.stdout
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("validity", "uniqueness", "novelty", "fcd", "n_samples", "rdkit_version",
              "recon_match"):
        assert k in res
    assert res["n_samples"] == 40 and 0 <= res["validity"] <= 1
    assert json.load(open(out / "metrics.json")) == res
    assert len((out / "samples.smi").read_text().splitlines()) == 40
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and ck["config"]["latent_tokens"] == 9
    # --eval on the written samples gives the same sample metrics
    r2 = subprocess.run([sys.executable, os.path.join(ROOT, "molecules.py"), "--data", str(data),
                         "--eval", str(out / "samples.smi")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 0, r2.stderr
    ev = json.loads(r2.stdout.strip().splitlines()[-1])
    assert ev["validity"] == res["validity"] and ev["uniqueness"] == res["uniqueness"]


def test_cli_user_errors(tmp_path):
    env = dict(os.environ, MINUNITE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "molecules.py")
    r = subprocess.run([sys.executable, script, "--eval", str(tmp_path / "missing.smi")],
                       capture_output=True, text=True, env=env)
    assert (r.returncode != 0 and r.stderr.strip().splitlines()
            == [f"error: --eval {tmp_path}/missing.smi: file not found"])
    bad = tmp_path / "bad.smi"
    bad.write_text("xx(\nyy)\n")
    r = subprocess.run([sys.executable, script, "--data", str(bad)], capture_output=True, text=True,
                       env=env)
    assert r.returncode != 0 and "0 valid molecules in 2 lines" in r.stderr


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, qm9_head):
    """DDP: noise (keyed per global sample) and data order do not depend on the number of processes,
    so 2 processes train the same weights as 1."""
    data = tmp_path / "qm9_head.smi"
    data.write_text("\n".join(qm9_head[:200]) + "\n")
    env = dict(os.environ, MINUNITE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    common = ["--data", str(data), "--max-steps", "3", "--batch-size", "16", "--width", "32",
              "--depth", "1", "--heads", "2", "--dec-width", "32", "--dec-depth", "1",
              "--num-samples", "4", "--recon-samples", "4", "--sample-steps", "1",
              "--precision", "fp32"]  # bf16 rounding would swamp the comparison
    script = os.path.join(ROOT, "molecules.py")
    for name, pre in (("one", [sys.executable]),
                      ("two", [sys.executable, "-m", "torch.distributed.run",
                               "--nproc_per_node=2", "--master_port=29535"])):
        r = subprocess.run(pre + [script, "--out-dir", str(tmp_path / name)] + common,
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_ablation_flags_separate_and_no_stopgrad(tmp_path, qm9_head, monkeypatch):
    """bench.py --ablation qm9 runs these: separate denoiser weights exist and train; the CPU-clock
    budget ends the loop."""
    import molecules
    data = tmp_path / "qm9_head.smi"
    data.write_text("\n".join(qm9_head[:200]) + "\n")
    monkeypatch.setenv("MINUNITE_CACHE", str(tmp_path / "cache"))
    res = molecules.main(["--data", str(data), "--out-dir", str(tmp_path / "o"),
                          "--batch-size", "16", "--width", "32", "--depth", "1", "--heads", "2",
                          "--dec-width", "32", "--dec-depth", "1", "--num-samples", "8",
                          "--recon-samples", "4", "--sample-steps", "1", "--separate",
                          "--no-stopgrad", "--time-budget", "2", "--budget-clock", "cpu"])
    ck = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ck["config"]["separate"] and not ck["config"]["stopgrad"]
    assert any(k.startswith("denoiser_.") for k in ck["model"])
    assert 20 <= res["steps"] < 100000 and res["cpu_s"] < 30
