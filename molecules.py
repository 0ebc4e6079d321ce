"""
UNITE on molecules: the same Generative Encoder (model.py) tokenizes and generates QM9 molecules.

    python molecules.py                              # QM9 graphs on CPU: <= 15 min training,
                                                     # sampling, metrics
    python molecules.py --repr smiles                # SMILES tokens through the same GE
    python molecules.py --eval out_mol/samples.smi   # all metrics for any SMILES file
                                                     # (one per line)
    torchrun --nproc_per_node=2 molecules.py         # DDP, as train.py

The adapter is only an input embedding, a decoder and a reconstruction loss; the GE, the two passes,
the flow loss and the samplers are model.py's, the optimizers, the EMA and the training step
optim.py's:

    molecule ─> tokens x (B, P, F) ints ─> TokenEmbed ─> (B, P, D) ─> GE.tokenize ─> z0 (B, K, C)
        graph : P = 9 atom slots, F = 1 + 9 = [atom type | bond type to slot 0..8]
                (a row of the adjacency)
        smiles: P = max SMILES length, F = 1 = [token id]
    z0 ─> noise-aug ─> MolDecoder ─> logits (B, P, F, V) ─> cross-entropy vs x
          (graph: bond logits symmetrised)
    z0 ─ stop-grad ─> K noised copies ─> same GE ─> x-prediction ─> flow loss
    sampling: noise (B, K, C) ─> Heun on the GE (t=0 noise -> t=1 clean) ─> MolDecoder ─> argmax
              ─> RDKit ─> SMILES

Data: QM9 from the qm9pack package's CSVs (located without importing it), or --data FILE (.csv with
a SMILES column, or one SMILES per line). Molecules are canonicalised with RDKit (no stereo, heavy
atoms only), kekulised for the graph form; unparsable and out-of-vocabulary lines are counted and
skipped. Split: a fixed permutation (seed 0), the last --test-frac is the test split. The processed
data is cached in data.cache_dir().

Metrics (MOSES definitions), over N generated samples:
    validity    = share of ALL N samples that RDKit parses and sanitizes (a sample of several
                  fragments counts as valid, as in MOSES; `connected` reports the share of valid
                  samples that are one fragment)
    uniqueness  = distinct canonical SMILES / valid samples
    novelty     = distinct valid samples not in the training split / distinct valid samples
    fcd         = Frechet ChemNet Distance (fcd package) of the valid samples against the test split
    recon_match = share of test molecules for which tokenize -> decode gives back the same
                  canonical SMILES
Decoding is a plain argmax: no valence correction, no fragment pruning.

On a CPU shared with other jobs run with OMP_NUM_THREADS=1: measured 32 mol/s with torch's 2 threads
vs ~100 with one while two other training runs shared the 2 vCPUs (OpenMP threads spin against each
other).
"""
import argparse
import copy
import csv
import hashlib
import importlib.util
import json
import os
import re
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (UserError, all_mean, batch_indices, cache_dir, open_log, run_main,
                  save_checkpoint, setup_run, write_atomic)
from model import (UNITE, UniteConfig, ViTBlock, count_params, sample_latents, sample_noise,
                   step_noise)
from optim import lr_at, make_optimizers, train_step

from rdkit import Chem, rdBase  # noqa: E402  (after torch: import order matters for some builds)

# atom vocabulary of QM9's heavy atoms (symbol, formal charge); index 0 = an empty slot
ATOM_TYPES = [(None, 0), ("C", 0), ("N", 0), ("O", 0), ("F", 0), ("N", 1), ("O", -1), ("C", -1),
              ("N", -1)]
BOND_TYPES = [None, Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE]  # 0 = no bond
# atom-level SMILES regex (Schwaller et al. 2019): bracket atoms, two-letter Cl/Br, %nn ring
# closures, bonds, stereo
SMILES_REGEX = re.compile(r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@"
                          r"|\?|>|\*|\$|%[0-9]{2}|[0-9])")
PAD = "<pad>"


# -----------------------------------------------------------------------------
# SMILES <-> tokens, molecule <-> graph

def canonical(smi):
    """Canonical SMILES (RDKit, no stereo) or None if RDKit cannot parse and sanitize it."""
    mol = Chem.MolFromSmiles(smi) if smi else None
    return Chem.MolToSmiles(mol, isomericSmiles=False) if mol is not None else None


def tokenize_smiles(smi):
    """Atom-level tokens; None if some characters are not SMILES tokens (the tokens must join back
    to smi)."""
    toks = SMILES_REGEX.findall(smi)
    return toks if "".join(toks) == smi else None


def graph_encode(smi, max_atoms):
    """Canonical SMILES -> (max_atoms, 1 + max_atoms) ints: per atom slot [type | kekulé bond type
    to each slot], atoms in canonical SMILES order, empty slots last. None if the molecule does not
    fit the vocabulary."""
    mol = Chem.MolFromSmiles(smi)
    if mol is None or mol.GetNumAtoms() > max_atoms:
        return None
    Chem.Kekulize(mol, clearAromaticFlags=True)
    x = np.zeros((max_atoms, 1 + max_atoms), dtype=np.uint8)
    for a in mol.GetAtoms():
        key = (a.GetSymbol(), a.GetFormalCharge())
        if key not in ATOM_TYPES or a.GetNumRadicalElectrons():
            return None
        x[a.GetIdx(), 0] = ATOM_TYPES.index(key)
    for b in mol.GetBonds():
        i, j, k = b.GetBeginAtomIdx(), b.GetEndAtomIdx(), BOND_TYPES.index(b.GetBondType())
        x[i, 1 + j] = x[j, 1 + i] = k
    return x


def graph_decode(x):
    """(N, 1 + N) ints -> (canonical SMILES or None if RDKit rejects it, raw SMILES of the graph as
    built). Bonds are read from the upper triangle; bonds to empty slots are dropped. No valence
    correction."""
    mol, idx = Chem.RWMol(), {}
    for i, t in enumerate(x[:, 0].tolist()):
        if t > 0:
            sym, charge = ATOM_TYPES[t]
            a = Chem.Atom(sym)
            a.SetFormalCharge(charge)
            idx[i] = mol.AddAtom(a)
    n = x.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            k = int(x[i, 1 + j])
            if k and i in idx and j in idx:
                mol.AddBond(idx[i], idx[j], BOND_TYPES[k])
    if not idx:
        return None, "<empty>"
    raw = Chem.MolToSmiles(mol, canonical=False)
    try:
        Chem.SanitizeMol(mol)
    except Exception:  # valence, kekulization: an invalid sample
        return None, raw
    return Chem.MolToSmiles(mol, isomericSmiles=False), raw


# per ATOM_TYPES entry: C N O F N+ O- C- N- (RDKit's default valences)
MAX_VALENCE = [0, 4, 3, 2, 1, 4, 1, 3, 2]


def valence_correct(x):
    """A copy of the graph (N, 1 + N) ints with over-valent atoms fixed: while an atom's bond orders
    sum above its MAX_VALENCE, lower its highest-order bond by one (to its partner of highest index
    on ties). As MoFlow/GDSS's "with correction"; used only for the labelled extra figure
    `validity_valence_corrected`, never the headline."""
    x = x.copy()
    types, bonds = x[:, 0], x[:, 1:]                                     # views: (N,), (N, N)
    n = len(types)
    bonds[np.arange(n), np.arange(n)] = 0                                # graph_decode ignores the
    bonds[types == 0, :] = 0                                             # diagonal and bonds to
    bonds[:, types == 0] = 0                                             # empty slots
    for i in range(n):
        while types[i] and int(bonds[i].sum()) > MAX_VALENCE[types[i]]:
            j = n - 1 - int(np.argmax(bonds[i, ::-1]))                   # highest order, last index
            bonds[i, j] -= 1
            bonds[j, i] = bonds[i, j]
    return x


def smiles_encode(smi, vocab, length):
    toks = tokenize_smiles(smi)
    if toks is None or len(toks) > length or any(t not in vocab for t in toks):
        return None
    ids = [vocab.index(t) for t in toks] + [0] * (length - len(toks))  # 0 = PAD
    return np.array(ids, dtype=np.uint8)[:, None]                       # (L, 1)


def smiles_decode(x, vocab):
    """(L, 1) ints -> (canonical SMILES or None, raw string); the string ends at the first PAD."""
    toks = [vocab[i] for i in x[:, 0].tolist()]
    raw = "".join(toks[:toks.index(PAD)] if PAD in toks else toks)
    return canonical(raw), raw or "<empty>"


def decode(x, meta):
    return graph_decode(x) if meta["repr"] == "graph" else smiles_decode(x, meta["vocab"])


# -----------------------------------------------------------------------------
# data: read, canonicalise, split, encode (cached)

def qm9_files():
    """qm9pack's CSVs, found without importing qm9pack (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("QM9 needs the qm9pack package (pip install qm9pack), or pass "
                        "--data FILE.smi/.csv")
    folder = os.path.join(spec.submodule_search_locations[0], "data")
    return [os.path.join(folder, f"qm9_part{i}.csv") for i in (1, 2, 3)]


def read_smiles(path=None, limit=None):
    """Raw SMILES strings of a .csv (column named SMILES, any case) or a text file (first field per
    line); None = QM9. Blank lines and comment lines (#) are not molecules."""
    files = qm9_files() if path is None else [path]
    out = []
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"molecule file not found: {f}")
        with open(f, newline="") as fh:
            if f.lower().endswith(".csv"):
                csv.field_size_limit(1 << 30)  # qm9pack's CSVs hold long XYZ fields
                rows = csv.reader(fh)
                header = [h.strip().lower() for h in next(rows, [])]
                if "smiles" not in header:
                    raise UserError(f"{f}: no SMILES column in the header "
                                    f"({', '.join(header[:8])})")
                col = header.index("smiles")
                out += [r[col].strip() if len(r) > col else "" for r in rows]
            else:
                out += [l.split()[0] if l.split() else "" for l in fh if not l.startswith("#")]
        if limit and len(out) >= limit:
            return out[:limit]
    return [s for s in out if s]


def load_molecules(args):
    """Canonical train/test SMILES and their token tensors (M, P, F) uint8, plus the vocabulary: a
    dict, cached."""
    files = qm9_files() if args.data is None else [args.data]
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"molecule file not found: {f}")
    key = json.dumps([[os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)] for f in files]
                     + [args.repr, args.max_atoms, args.test_frac, 1])
    path = os.path.join(cache_dir(), f"molecules-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    raw = read_smiles(args.data)
    with rdBase.BlockLogs():  # count failures instead of printing them
        canon = [canonical(s) for s in raw]
    good = [c for c in canon if c is not None]
    if len(good) < 2:
        raise UserError(f"{args.data or 'QM9'}: {len(good)} valid molecules in {len(raw)} lines; "
                        "need at least 2")
    order = np.random.default_rng(0).permutation(len(good))  # fixed split, independent of --seed
    n_test = max(1, int(round(args.test_frac * len(good))))
    splits = {"train": [good[i] for i in order[:-n_test]],
              "test": [good[i] for i in order[-n_test:]]}
    if args.repr == "graph":
        meta = {"repr": "graph", "n_tokens": args.max_atoms,
                "vocab_sizes": [len(ATOM_TYPES)] + [4] * args.max_atoms}
        enc = lambda s: graph_encode(s, args.max_atoms)
    else:
        toks = [tokenize_smiles(s) or [] for s in splits["train"]]
        vocab = [PAD] + sorted({t for ts in toks for t in ts})
        length = max(map(len, toks))
        meta = {"repr": "smiles", "n_tokens": length, "vocab_sizes": [len(vocab)], "vocab": vocab}
        enc = lambda s: smiles_encode(s, vocab, length)
    out = dict(meta=meta, n_lines=len(raw), n_unparsable=len(raw) - len(good))
    for name, smis in splits.items():
        xs = [enc(s) for s in smis]
        out[name + "_smiles"] = [s for s, x in zip(smis, xs) if x is not None]
        out[name + "_x"] = torch.from_numpy(np.stack([x for x in xs if x is not None]))
        out[name + "_out_of_vocab"] = sum(x is None for x in xs)
    os.makedirs(cache_dir(), exist_ok=True)
    save_checkpoint(path, out)
    return out


# -----------------------------------------------------------------------------
# the adapter: input embedding, decoder, reconstruction loss

class TokenEmbed(nn.Module):
    """Molecule tokens (B, P, F) ints -> (B, P, D): one embedding row per (feature, value), summed
    over features, plus a learned position per token. Graph: atom type + bond-type-to-slot-j for
    each j (= its adjacency row)."""

    def __init__(self, vocab_sizes, n_tokens, dim):
        super().__init__()
        self.register_buffer("offsets", torch.tensor([0] + vocab_sizes[:-1]).cumsum(0),
                             persistent=False)
        self.table = nn.Embedding(sum(vocab_sizes), dim)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, x):
        return self.table(x.long() + self.offsets).sum(2) + self.pos                 # (B, P, D)


class MolDecoder(nn.Module):
    """Latent (B, K, C) -> logits (B, P, F, V) through plain ViT blocks (model.py's). With one
    latent per token (graph: K = P = 9 atom slots) latent p predicts token p; otherwise (smiles) P
    learned query tokens are appended and query p predicts token p. Graph: bond logits (i, j) and
    (j, i) are averaged."""

    def __init__(self, cfg, vocab_sizes, n_tokens, symmetric):
        super().__init__()
        D, V, Fn = cfg.dec_width, max(vocab_sizes), len(vocab_sizes)
        self.shape, self.symmetric = (n_tokens, Fn, V), symmetric
        self.embed = nn.Linear(cfg.latent_dim, D)
        n_queries = 0 if n_tokens == cfg.num_tokens else n_tokens
        self.queries = nn.Parameter(torch.zeros(1, n_queries, D))
        self.pos = nn.Parameter(torch.randn(1, cfg.num_tokens + n_queries, D) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(D, cfg.dec_heads) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, Fn * V)
        # features with fewer classes than V (bond types: 4 of 9) get -1e4 on the classes they do
        # not have
        mask = torch.arange(V)[None] >= torch.tensor(vocab_sizes)[:, None]            # (F, V)
        self.register_buffer("logit_mask", mask.float() * -1e4, persistent=False)

    def forward(self, z):
        B, P = z.shape[0], self.shape[0]
        # (B, K(+P), D)
        x = torch.cat([self.embed(z), self.queries.expand(B, -1, -1)], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        # (B, P, F, V)
        logits = self.head(self.norm(x[:, -P:])).float().view(B, *self.shape) + self.logit_mask
        if self.symmetric:  # bonds: (B, N, N, V), one prediction per atom pair
            bonds = logits[:, :, 1:]
            logits = torch.cat([logits[:, :, :1], 0.5 * (bonds + bonds.transpose(1, 2))], dim=2)
        return logits


def token_ce(logits, x):
    """Reconstruction loss: cross-entropy per (token, feature), summed over a token's features, mean
    over tokens."""
    ce = F.cross_entropy(logits.flatten(0, 2), x.long().flatten(), reduction="none")
    return ce.view(x.shape).sum(2).mean()


def build_model(cfg, meta):
    P, vs = meta["n_tokens"], meta["vocab_sizes"]
    model = UNITE(cfg, input_embed=TokenEmbed(vs, P, cfg.enc_width),
                  decoder=MolDecoder(cfg, vs, P, symmetric=meta["repr"] == "graph"),
                  recon_loss=token_ce)
    # The GE's zero-initialised output layer is a saddle here: z0 = LN(0) carries nothing, so no
    # gradient reaches the GE body and registers never learn to read the atoms (measured on 8
    # molecules: recon CE flat at 0.95 for 300 steps). A small random init breaks the symmetry
    # (recon 0.46 after 100 steps).
    nn.init.normal_(model.encoder.final_linear.weight, std=0.02)
    return model


# -----------------------------------------------------------------------------
# metrics

def fcd_stats(smiles):
    """ChemNet activations' mean and covariance (fcd package, weights shipped with it)."""
    import fcd
    # n_jobs=0: no worker process
    act = fcd.get_predictions(fcd.load_ref_model(), list(smiles), n_jobs=0)
    return act.mean(0), np.cov(act.T)


def reference_stats(test_smiles):
    key = hashlib.sha1("\n".join(test_smiles).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"fcd-ref-{key}.npz")
    if not os.path.exists(path):
        mu, sigma = fcd_stats(test_smiles)
        os.makedirs(cache_dir(), exist_ok=True)
        np.savez(path + ".tmp.npz", mu=mu, sigma=sigma)
        os.replace(path + ".tmp.npz", path)
    ref = np.load(path)
    return ref["mu"], ref["sigma"]


def evaluate(samples, train_smiles=None, test_smiles=None):
    """MOSES-style metrics of a list of generated SMILES (see the module docstring). Novelty needs
    the training SMILES and FCD the test SMILES (canonical); they are None without them."""
    with rdBase.BlockLogs():
        canon = [canonical(s) for s in samples]
    valid = [c for c in canon if c is not None]
    unique = set(valid)
    n = len(samples)
    res = dict(n_samples=n, n_valid=len(valid), n_invalid=n - len(valid),
               validity=len(valid) / n if n else 0.0,
               uniqueness=len(unique) / len(valid) if valid else 0.0,
               novelty=(len(unique - set(train_smiles)) / len(unique)
                        if unique and train_smiles else None),
               connected=sum("." not in c for c in valid) / len(valid) if valid else 0.0, fcd=None,
               rdkit_version=rdBase.rdkitVersion)
    if test_smiles and len(valid) >= 2:
        import fcd
        mu, sigma = fcd_stats(valid)
        res["fcd"] = float(fcd.calculate_frechet_distance(mu, sigma, *reference_stats(test_smiles)))
    return res


def save_grid_png(smiles, path, n=48):
    from rdkit.Chem import Draw
    mols = [Chem.MolFromSmiles(s) for s in smiles[:n]]
    Draw.MolsToGridImage(mols, molsPerRow=8, subImgSize=(200, 200)).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


# -----------------------------------------------------------------------------
# sampling and reconstruction with the EMA model

@torch.no_grad()
def generate(ema, meta, n, args, batch=1000):
    """n samples (raw strings, as written to samples.smi; invalid ones stay in). Sample i depends
    only on i.
    Returns (samples, corrected): corrected = the same graphs after valence_correct
    (graph repr; else None)."""
    cfg, out, corrected = ema.cfg, [], []
    for i in range(0, n, batch):
        idx = range(i, min(n, i + batch))
        noise = sample_noise(idx, args.seed + 1, (cfg.num_tokens, cfg.latent_dim))
        y = torch.zeros(len(idx), dtype=torch.long)  # the one class (unconditional)
        z, nfe = sample_latents(ema.denoiser, noise, y, steps=args.sample_steps,
                                method=args.sampler, shift=cfg.time_shift, t_eps=cfg.t_eps)
        x = ema.decoder(z).argmax(-1).numpy()                                        # (b, P, F)
        with rdBase.BlockLogs():  # invalid samples are counted by evaluate(), not printed
            out += [decode(xi, meta)[1] for xi in x]
            if meta["repr"] == "graph":
                corrected += [graph_decode(valence_correct(xi))[1] for xi in x]
    return out, (corrected if meta["repr"] == "graph" else None)


@torch.no_grad()
def recon_match(ema, x, smiles, meta, batch=1000):
    """Share of molecules whose tokenize -> decode gives back the same canonical SMILES."""
    hits = 0
    for i in range(0, len(x), batch):
        rec = ema.decoder(ema.encoder.tokenize(x[i:i + batch])).argmax(-1).numpy()
        with rdBase.BlockLogs():
            hits += sum(decode(r, meta)[0] == s for r, s in zip(rec, smiles[i:i + batch]))
    return hits / max(1, len(x))


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--eval", default="",
                   help="only compute the metrics of this SMILES file (one per line)")
    p.add_argument("--data", default=None,
                   help="QM9 (default) | a .csv with a SMILES column | a .smi file")
    p.add_argument("--repr", default="graph", choices=["graph", "smiles"])
    p.add_argument("--out-dir", default="out_mol")
    p.add_argument("--max-atoms", type=int, default=9,
                   help="graph slots; larger molecules are skipped")
    p.add_argument("--test-frac", type=float, default=0.1)
    # model: a small GE (the budget favours a small, fast model)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dec-width", type=int, default=128)
    p.add_argument("--dec-depth", type=int, default=2)
    p.add_argument("--latents", type=int, default=0,
                   help="latent tokens K (0: one per atom slot; smiles 16)")
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--flow-copies", type=int, default=2)
    # optimisation
    p.add_argument("--batch-size", type=int, default=32,
                   help="global batch = micro x world. Small: at a fixed CPU budget the number "
                        "of steps matters more\n"
                        "than the batch (300 CPU-s: FCD 12.2 / 6.8 / 5.0 at batch 128 / 64 / 32, "
                        "at 121 / 130 / 100 mol/s)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adamw", choices=["muon", "adamw"],
                   help="adamw: measured faster out of the recon stall here (CE 0.16 vs 0.50 "
                        "after 150 steps)")
    p.add_argument("--warmup-epochs", type=float, default=0.05)
    p.add_argument("--min-lr-frac", type=float, default=0.1,
                   help="cosine to this fraction by the end (1 = flat)")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--time-budget", type=float, default=840,
                   help="stop training after this many seconds")
    p.add_argument("--budget-clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: count this process's CPU seconds (fair equal-budget comparisons on a "
                        "shared machine)")
    p.add_argument("--separate", action="store_true",
                   help="Tab. 7a: separate tokenizer and denoiser weights")
    p.add_argument("--stopgrad", action=argparse.BooleanOptionalAction, default=True,
                   help="Tab. 7a: --no-stopgrad lets the flow loss reach the tokenizer")
    p.add_argument("--grad-clip", type=float, default=3.0)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    # run
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    # sampling and evaluation
    p.add_argument("--sampler", default="heun", choices=["heun", "euler"])
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--recon-samples", type=int, default=2000,
                   help="test molecules for the recon match rate")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.eval:  # metrics of a SMILES file against the data's splits
        if not os.path.isfile(args.eval):
            raise UserError(f"--eval {args.eval}: file not found")
        with open(args.eval) as f:
            samples = [l.split()[0] if l.split() else "" for l in f]
        samples = [s for s in samples if s]
        if not samples:
            raise UserError(f"--eval {args.eval}: no SMILES lines")
        d = load_molecules(args)
        res = evaluate(samples, d["train_smiles"], d["test_smiles"])
        print(json.dumps(res))
        return res

    rank, world, device, precision = setup_run(args.device, args.precision)
    p0 = open_log(args.out_dir, rank)
    if rank == 0:
        d = load_molecules(args)   # rank 0 builds the cache once ...
    if world > 1:
        dist.barrier()
    d = d if rank == 0 else load_molecules(args)  # ... the other ranks read it
    meta, x_train = d["meta"], d["train_x"]
    p0(f"data {args.data or 'QM9 (qm9pack)'}: {d['n_lines']} lines, "
       f"{d['n_unparsable']} unparsable, "
       f"{d['train_out_of_vocab'] + d['test_out_of_vocab']} out of vocabulary (skipped) -> "
       f"train {len(x_train)}, test {len(d['test_x'])} | repr {meta['repr']}: "
       f"{meta['n_tokens']} tokens x {len(meta['vocab_sizes'])} features")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of {world} processes")
    micro = args.batch_size // world
    steps_per_epoch = len(x_train) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(x_train)} training molecules is fewer than one batch of "
                        f"{args.batch_size}")

    K = args.latents or (meta["n_tokens"] if meta["repr"] == "graph" else 16)
    cfg = UniteConfig(latent_dim=args.latent_dim, enc_depth=args.depth, enc_width=args.width,
                      enc_heads=args.heads, dec_depth=args.dec_depth, dec_width=args.dec_width,
                      dec_heads=args.heads, num_classes=1,
                      in_context_len=0, class_dropout=0.0, flow_copies=args.flow_copies,
                      latent_tokens=K, input_tokens=meta["n_tokens"], separate=args.separate,
                      stopgrad=args.stopgrad)
    torch.manual_seed(args.seed)  # same init on every rank
    raw = build_model(cfg, meta).to(device)
    ema = copy.deepcopy(raw).float().eval().requires_grad_(False)
    opts = make_optimizers(raw, args.lr, args.optimizer == "muon")
    torch.manual_seed(args.seed + rank + 1)
    model = (DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if world > 1
             else raw)
    p0(f"UNITE molecules: GE {count_params(raw.encoder) / 1e6:.2f}M, "
       f"decoder {count_params(raw.decoder) / 1e6:.2f}M "
       f"| latent {K}x{cfg.latent_dim} | device {device}, {precision}, world {world} "
       f"| batch {args.batch_size} | {args.optimizer} lr {args.lr:.1e} "
       f"| budget {args.time_budget:.0f}s or {args.max_steps} steps")
    p0("args: " + json.dumps(vars(args)))

    order = batch_indices(len(x_train), args.batch_size, args.seed, 0, 1, world, rank)
    step, total, stats, bad = 0, args.max_steps, torch.zeros(3, device=device), 0
    t_start = t0 = time.time()
    clock = time.time if args.budget_clock == "wall" else time.process_time
    c_start, p_start = clock(), time.process_time()
    while step < total:
        # --------------------------------------------- one optimization step: two passes, shared GE
        # warmup, then cosine to min_lr_frac by the end (which the time budget may move)
        lr = lr_at(step, args.lr, args.warmup_epochs * steps_per_epoch, 0, total, args.min_lr_frac)
        noise = step_noise(cfg, args.seed, step, range(rank * micro, (rank + 1) * micro), device)
        x = x_train[next(order)].to(device)                                 # (b, P, F) ints
        y = torch.zeros(micro, dtype=torch.long, device=device)             # unconditional: class 0
        norm, st, bad = train_step(model, opts, ema, [(x, y, noise)], lr=lr, step=step,
                                   grad_clip=args.grad_clip, ema_decay=args.ema, ema_warmup=True,
                                   precision=precision, bad=bad)
        stats += st
        if bad:
            p0(f"step {step}: non-finite loss/gradient, step skipped")
        step += 1
        elapsed = clock() - c_start
        # steps that fit the budget at the measured speed (cosine end)
        if args.time_budget > 0 and step >= 20:
            total = min(args.max_steps, step + int((args.time_budget - elapsed) / (elapsed / step)))
            # every rank must run the same number of steps: take the smallest estimate
            if world > 1:
                t = torch.tensor(total, device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MIN)
                total = int(t)
        if step % args.log_every == 0 or step >= total:
            n = (step - 1) % args.log_every + 1
            l, r, f = (all_mean(stats, world) / n).tolist()  # on the device: nccl reduces there
            p0(f"step {step}/{total} | loss {l:.4f} | recon {r:.4f} | flow {f:.4f} | "
               f"grad {norm.item():.2f} | lr {lr:.2e} | "
               f"{n * args.batch_size / (time.time() - t0):.0f} mol/s | {elapsed:.0f}s")
            t0, stats = time.time(), torch.zeros(3, device=device)
    train_s, train_cpu_s = time.time() - t_start, time.process_time() - p_start
    if rank == 0:
        save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
            "model": raw.state_dict(), "ema": ema.state_dict(),
            "optimizer": [o.state_dict() for o in opts],
            "step": step, "config": asdict(cfg), "args": vars(args), "meta": meta})
    if world > 1:
        dist.barrier()
    if rank != 0:
        dist.destroy_process_group()
        return None
    # -------------------------------------- end of run (rank 0): samples, metrics, last line = JSON
    t1 = time.time()
    ema = ema.cpu()
    samples, corrected = generate(ema, meta, args.num_samples, args)
    write_atomic(os.path.join(args.out_dir, "samples.smi"), "\n".join(samples) + "\n")
    sample_s = time.time() - t1
    res = evaluate(samples, d["train_smiles"], d["test_smiles"])
    # extra figure, NOT the MOSES validity above: the same samples after valence_correct
    if corrected is not None:
        with rdBase.BlockLogs():
            res["validity_valence_corrected"] = (sum(canonical(s) is not None for s in corrected)
                                                 / len(corrected))
    n_rec = min(args.recon_samples, len(d["test_x"]))
    res["recon_match"] = recon_match(ema, d["test_x"][:n_rec], d["test_smiles"][:n_rec], meta)
    with rdBase.BlockLogs():  # invalid samples were counted by evaluate(); no log line per failure
        valid = [c for c in map(canonical, samples[:200]) if c]
    if valid:
        save_grid_png(valid, os.path.join(args.out_dir, "samples.png"))
    res.update(repr=meta["repr"], steps=step, wall_s=round(train_s, 1), cpu_s=round(train_cpu_s, 1),
               mol_per_s=round(step * args.batch_size / train_s, 1), sample_s=round(sample_s, 1),
               sampler=f"{args.sampler}-{args.sample_steps}",
               total_s=round(time.time() - t_start, 1))
    write_atomic(os.path.join(args.out_dir, "metrics.json"), json.dumps(res, indent=1))
    p0(f"wrote {args.out_dir}/ckpt.pt, samples.smi, samples.png, metrics.json")
    p0(json.dumps(res))
    if world > 1:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    run_main(main)
