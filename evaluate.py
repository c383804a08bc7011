"""Robust accuracy of any L-inf classifier on the test set, under the paper's attack settings by
default, and the checks a careful reviewer runs before believing the numbers.

    python evaluate.py runs/cat/best.pt --attacks natural,pgd20,apgd-ce,apgd-t,square --json eval.json
    python evaluate.py runs/cat/best.pt runs/at/best.pt --attacks natural,pgd20,autoattack     # one table
    python evaluate.py runs/cat/best.pt --eps 0.1,0.2,0.3,0.4 --plot curve.png --csv eval.csv  # eps sweep
    python evaluate.py weights.pt --dataset cifar10 --arch preact18                            # a state_dict
    python evaluate.py my_models.py:build --dataset cifar10                                    # any nn.Module
    python evaluate.py runs/cat/best.pt --sanity --save-masks masks.png                        # Figure 2

Models: a train.py checkpoint; a plain state_dict of a models.py architecture (--dataset, --arch);
or `file.py:function`, a function that returns an nn.Module taking images in [0, 1] and returning
logits (the RobustBench convention). Files are read with torch.load(weights_only=True).

Test settings (Sec. 5.1.1; common.TEST_ATTACK): PGD without random start, step 0.015 (MNIST, eps
0.3) or 0.003 (CIFAR, eps 8/255); CW-inf as in FAT: eps 0.031, step 0.003, 30 steps, kappa 50 (on
MNIST eps 0.3, step 0.015); FGSM one step of eps; MT-PGD 20 steps of the PGD step towards each
of the 9 most likely wrong classes; pgdN is PGD with N steps. At another --eps the steps keep
the paper's step/eps ratio and CW-inf uses that eps. From the authors' package pyautoattack,
with AutoAttack's standard settings: APGD-CE (100 iterations, no restarts), APGD-T (100
iterations towards each of the 9 top wrong classes), Square (black-box, 5000 queries) and
AutoAttack (APGD-CE, APGD-T, FAB-T, Square). Every attack result is checked to lie in the
eps-ball and the [0, 1] box before it is scored. The model is in eval mode and runs in full
fp32 (no autocast, no TF32). Accuracies are in %. Under the table, flags (verdicts.py) point at
numbers that look like gradient masking or a broken evaluation, judged on the attacks asked for.

The store (--json): one '1' (correct) or '0' per test image and attack, kept under
  results[weights][f"{attack} {the settings it reads} on {test set}"] = {"bits", "seconds", "notes"}
where `weights` hashes the classifier's loaded state_dict (checkpoint, state_dict or factory alike),
the key holds only the settings that attack reads (READS: natural none, pgd20 eps and alpha, ...)
and the test set is named by a hash of its images; bits[i] is test image i, so a result on the
first 1,000 images serves a run on 500. A run reuses what matches, computes the rest batch by batch
(written after every batch, with random starts fixed by the seed and the batch's first image, so an
interrupted run resumes exactly) and never removes what it did not compute: other models, eps and
attacks stay. results[weights]["model"] says what the weights were loaded from. Beside the store,
"models" holds this run's table, one row per model and eps, for report.py, and "command_seconds" the
wall-clock time of this command alone ("seconds" of each entry adds up every command that computed
its bits; older stores called the first "wall_seconds"). A file in an older shape
is converted when read (convert); a file that is no evaluation is refused, never overwritten.
While an attack runs, a line every 30 s (--progress) gives the images done, the robust accuracy
so far and the ETA; AutoAttack's own progress lines are shown as they come. Every output (--json,
--csv, --plot, --save-masks) is tried before any model loads; a write that still fails (a full disk)
is one line saying what is kept and the command that goes on.
"""
import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shlex
import signal
import sys
import time

import torch

import attacks
import cat
import checkpoints
import common
import data
import models
import report
from common import OneLineParser, die, fraction
from verdicts import EXTERNAL, NAMES, SANITY, accuracies, all_flags, known, pct, pgd_steps, restartable, title

# ============================================================================ settings

# Shared by all datasets. MT-PGD: PGD-20's steps per target, the 9 top wrong classes (all of
# them for 10 classes, as APGD-T). Large-eps check: at eps >= 0.5 the mid-grey image (0.5
# everywhere) lies in every ball, so every test image can be turned into the same input: no
# classifier can stay above the largest class share (~10%), and a PGD-100 that works (steps of
# eps/10, ten times across the ball) drives a model to ~0%. Survivors mean the gradients lie.
COMMON = dict(mt_steps=20, mt_targets=9, large_eps=0.5, large_alpha=0.05, large_steps=100)
TOL = 1e-6              # fp32 rounding of |x_adv - x| near eps; anything beyond is an attack bug
# The settings each attack reads: its results are stored and reused under these alone (pgd: every pgdN).
# The restartable ones also read restarts, and the seed when there is a random start (RANDOM, or restarts > 1).
READS = {"natural": (), "fgsm": ("eps",), "pgd": ("eps", "alpha"), "pgd10rs": ("eps",),
         "cw": ("cw_eps", "cw_alpha", "cw_steps", "kappa"), "mtpgd": ("eps", "alpha", "mt_steps", "mt_targets"),
         "apgd-ce": ("eps",), "apgd-t": ("eps",), "square": ("eps", "queries"), "autoattack": ("eps",),
         "eps0": (), "large_eps": ("large_eps", "large_alpha", "large_steps")}
RANDOM = {"pgd10rs", "cw", "apgd-ce", "apgd-t", "square", "autoattack"}
MODEL_KEYS = ("source", "kind", "dataset", "arch", "method", "epoch")     # what results[weights]["model"] says


def settings_for(dataset, eps=None, alpha=None, cw_steps=None, mt_steps=None, restarts=1, queries=5000, seed=0,
                 batch_size=500):
    """Every number that defines one row of the evaluation of `dataset`.
    eps None or the paper's: the paper's settings. Another eps: the PGD and CW-inf steps keep the
    paper's step/eps ratio (so 20 steps still cross the ball) and CW-inf uses that eps."""
    paper = common.TEST_ATTACK[dataset]
    s = {**paper, **COMMON}
    if eps is not None and eps != paper["eps"]:
        ratio = eps / paper["eps"]
        s.update(eps=eps, alpha=round(paper["alpha"] * ratio, 10), cw_eps=eps,
                 cw_alpha=round(paper["cw_alpha"] * ratio, 10))
    if alpha is not None:
        s.update(alpha=alpha, cw_alpha=alpha)
    s.update(cw_steps=cw_steps or s["cw_steps"], mt_steps=mt_steps or s["mt_steps"])
    return {**s, "restarts": restarts, "queries": queries, "seed": seed, "batch_size": batch_size}


def reads(name, s):
    """{setting: value} of the settings in `s` that attack `name` reads."""
    keys = list(READS["pgd" if pgd_steps(name) else name])
    if restartable(name):
        keys.append("restarts")
    if name in RANDOM or (restartable(name) and s["restarts"] > 1):
        keys.append("seed")
    return {k: s[k] for k in keys}


def entry_key(name, s, images):
    """The store's key of attack `name` under settings `s` on the test set `images`."""
    return " ".join([name, *(f"{k}={json.dumps(v)}" for k, v in reads(name, s).items()), "on", images])


# ============================================================================ attacks: one loop runs them all

def attack_eps(name, s):
    """The L-inf budget that attack `name` must respect under settings `s`."""
    return 0.0 if name in ("natural", "eps0") else s[{"cw": "cw_eps", "large_eps": "large_eps"}.get(name, "eps")]


def run_attack(name, f, x, y, s, random_start=False):
    """x_adv for attack `name` under settings `s`, f in eval mode (its flags restored).
    random_start: start the PGD family from a uniform point of the ball (extra restarts);
    the first run of each is the paper's: PGD and MT-PGD from x, CW-inf from a random point."""
    with attacks.eval_mode(f):
        if name == "natural":
            return x
        if name == "fgsm":
            return attacks.fgsm(f, x, y, s["eps"])
        if pgd_steps(name):
            return attacks.pgd(f, x, y, s["eps"], s["alpha"], pgd_steps(name), random_start)
        if name == "pgd10rs":       # the paper's Figures 4-5: PGD-10, random start, step eps/4 (2/255 on CIFAR)
            return attacks.pgd(f, x, y, s["eps"], s["eps"] / 4, 10, random_start=True)
        if name == "cw":
            return attacks.cw_inf(f, x, y, s["cw_eps"], s["cw_alpha"], s["cw_steps"], s["kappa"])
        if name == "mtpgd":
            return attacks.mtpgd(f, x, y, s["eps"], s["alpha"], s["mt_steps"], s["mt_targets"], random_start)
        if name == "eps0":          # PGD-20 that cannot move: must reproduce natural exactly
            return attacks.pgd(f, x, y, 0.0, s["alpha"], 20)
        if name == "large_eps":
            return attacks.pgd(f, x, y, s["large_eps"], s["large_alpha"], s["large_steps"])
        if name in EXTERNAL:
            return run_pyautoattack(name, f, x, y, s)
    raise ValueError(f"unknown attack {name!r}")


def run_pyautoattack(name, f, x, y, s):
    """One of the authors' attacks. Square: l_inf, s['queries'] queries, otherwise AutoAttack's
    own configuration of it. APGD-CE and APGD-T: the attack alone, exactly as the standard
    version of AutoAttack configures and runs it. 'autoattack': the standard version whole."""
    from pyautoattack import AutoAttack
    from pyautoattack.square import SquareAttack
    with torch.no_grad():
        if name == "square":
            square = SquareAttack(f, norm="Linf", n_queries=s["queries"], eps=s["eps"], p_init=0.8, n_restarts=1,
                                  seed=s["seed"], verbose=False, resc_schedule=False, device=x.device)
            return square.perturb(x, y)
        aa = AutoAttack(f, norm="Linf", eps=s["eps"], version="standard", seed=s["seed"], device=x.device)
        if name != "autoattack":
            aa.attacks_to_run = [name]          # 'apgd-ce' or 'apgd-t', with the standard version's settings
        return aa.run_standard_evaluation(x, y, batch_size=len(x))[0]


def in_threat_model(x_adv, x, eps, name):
    """x_adv, checked to lie in the eps-ball around x and the [0, 1] box (up to fp32 rounding),
    then projected there. An attack that leaves the threat model fails loudly instead of
    counting as a success."""
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        raise RuntimeError(f"{name} returned shape {tuple(x_adv.shape)} for {tuple(x.shape)}, or NaN/inf")
    excess = max(((x_adv - x).abs().max() - eps).item(), -x_adv.min().item(), (x_adv.max() - 1).item())
    if excess > TOL:
        raise RuntimeError(f"{name} left the threat model by {excess:.2g} (eps {eps:.5f}, box [0, 1])")
    return attacks.project(x_adv.to(x.dtype), x, eps)


def attack_correct(name, f, x, y, s):
    """Bool (N,): still classified correctly after attack `name` and all its restarts.
    An example broken once stays broken (the worst run per example counts), so each restart
    attacks only the survivors; with eval-mode batch norm the examples are independent."""
    correct = torch.ones_like(y, dtype=torch.bool)
    for run in range(s["restarts"] if restartable(name) else 1):
        idx = correct.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        x_adv = run_attack(name, f, x[idx], y[idx], s, random_start=run > 0)
        x_adv = in_threat_model(x_adv, x[idx], attack_eps(name, s), name)
        with torch.no_grad(), attacks.eval_mode(f):
            correct[idx] = f(x_adv).argmax(1) == y[idx]
    return correct


def to_bits(correct):
    return "".join("1" if c else "0" for c in correct.tolist())


def from_bits(bits):
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def attack_split(name, f, split, s, bits="", on_batch=None, progress=None):
    """'1' (still correct) or '0' per test image after attack `name`, batch by batch, continuing
    after the `bits` already known for the first images (a resumed run). Each batch's random starts
    come from the seed and the index of its first image alone, so a resumed run gives the bits of an
    uninterrupted one. on_batch(bits, seconds) runs after each batch."""
    for x, y in data.batches(split.take(slice(len(bits), None)), s["batch_size"]):
        t0 = time.time()
        torch.manual_seed(s["seed"] * 1_000_003 + len(bits))
        bits += to_bits(attack_correct(name, f, x, y, s).cpu())     # .cpu() syncs the device
        if on_batch:
            on_batch(bits, time.time() - t0)
        if progress:
            progress.update(len(bits), bits.count("1"))
    return bits


def evaluate_split(f, split, names, s, progress=None):
    """({name: bool (N,) correct after that attack}, {name: seconds}) over the whole split."""
    correct, seconds = {}, {}
    for name in names:
        t0 = time.time()
        correct[name] = from_bits(attack_split(name, f, split, s, progress=progress))
        seconds[name] = round(time.time() - t0, 1)
    return correct, seconds


# ============================================================================ masks (Figure 2)

def calibration(f, g, x, y, cfg):
    """(delta, M) of the images x: delta = PGD-20(f, x) - x at the checkpoint's training eps and step (no
    random start), M = sigmoid(g(x + delta)) as in train.train_step."""
    delta = attacks.pgd(f, x, y, cfg["eps"], cfg["alpha"], 20) - x
    with torch.no_grad(), attacks.eval_mode(g):
        return delta, cat.mask_of(g(x + delta))


def mask_stats(sums, cfg):
    """Mean mask over all pixels, over bright ones (x > 0.5, per channel) and dark ones, from the sums
    [sum of M, sum of M on bright pixels, bright pixels, pixels]."""
    m_all, m_bright, n_bright, n = sums
    stats = {"mean": m_all / n, "mean_bright": m_bright / max(n_bright, 1),
             "mean_dark": (m_all - m_bright) / max(n - n_bright, 1), "bright_fraction": n_bright / n}
    return {**{k: round(v, 4) for k, v in stats.items()}, "eps": cfg["eps"], "alpha": cfg["alpha"], "steps": 20}


def run_masks(m, split, images, store, args, progress, save):
    """Mask statistics of a CAT checkpoint over the split, batch by batch like an attack, kept in
    the store (only --save-masks asks for them); returns (statistics, Figure-2 grid)."""
    cfg, n = m["config"], len(split)
    key = (f"masks eps={json.dumps(cfg['eps'])} alpha={json.dumps(cfg['alpha'])} steps=20 "
           f"mask={checkpoints.weights_hash(m['g'])} on {images} n={n}")
    e = store[m["weights"]].setdefault(key, {"done": 0, "sums": [0.0, 0.0, 0.0, 0.0], "seconds": 0.0})
    with progress.running(f"{m['label']} masks", n, e["done"], None):
        for x, y in data.batches(split.take(slice(e["done"], None)), args.batch_size):
            t0, (_, mask) = time.time(), calibration(m["f"], m["g"], x, y, cfg)
            bright = (x > 0.5).float()
            sums = [mask.sum().item(), (mask * bright).sum().item(), bright.sum().item(), mask.numel()]
            e["sums"] = [a + b for a, b in zip(e["sums"], sums)]
            e.update(done=e["done"] + len(y), seconds=round(e["seconds"] + time.time() - t0, 1))
            progress.update(e["done"], None)
            save()
    x, y = next(data.batches(split.take(slice(0, 8)), 8))        # Figure 2: x, x + delta, M, x_cali (Eq. 10)
    delta, mask = calibration(m["f"], m["g"], x, y, cfg)
    return mask_stats(e["sums"], cfg), torch.cat([x, x + delta, mask, cat.calibrate(x, delta, mask)]).cpu()


# ============================================================================ the store

def test_set_id(dataset, test):
    """The test set's name in the store: the dataset and a hash of its images and labels."""
    digest = hashlib.sha256(test.images.cpu().numpy().tobytes())
    digest.update(test.labels.cpu().numpy().tobytes())
    return f"{dataset} test {digest.hexdigest()[:12]}"


def convert(doc, weights_of, images_of):
    """The store of a JSON in an older shape: {"models": [rows with per-image bits in "correct"]} or one
    flat model. Each row's bits become entries; the row itself (bits aside) and a flat file whole are kept
    under results[weights]["earlier"]. weights_of(row) names the weights, images_of(dataset) the test set."""
    if "results" in doc:
        return doc["results"]
    store = {}
    for row in doc["models"] if "models" in doc else [{**doc, "source": doc["checkpoint"], "kind": "checkpoint"}]:
        mine = store.setdefault(weights_of(row), {"model": {k: row.get(k) for k in MODEL_KEYS}})
        s = {**settings_for(row["dataset"]), **row.get("settings", {})}
        for name, bits in row.get("correct", {}).items():
            e = mine.setdefault(entry_key(name, s, images_of(row["dataset"])), {"bits": "", "seconds": 0.0})
            if len(bits) > len(e["bits"]):
                e.update(bits=bits, seconds=row.get("seconds", {}).get(name, 0.0),
                         notes=row.get("notes", []) if name in EXTERNAL else [])
        mine.setdefault("earlier", []).append({k: v for k, v in row.items() if k != "correct"})
    return store


def old_weights(row):
    """The weights of an old row: hashed from its checkpoint or state_dict when that file is still
    there (and, where the row has its sha256, unchanged); else the file named, which matches no run."""
    source = row.get("source") or ""
    if row.get("kind") != "factory" and os.path.isfile(source) and row.get("sha256") in (None, checkpoints.sha256(source)):
        with contextlib.suppress(checkpoints.CheckpointError):
            arch = row.get("arch") if row.get("kind") == "state_dict" else None
            return checkpoints.weights_hash(checkpoints.load_model(source, row.get("dataset"), arch)["f"])
    return f"file {row.get('sha256', '?')[:16]} {source}"


def open_store(path, args, splits):
    """The store in the JSON at `path` ({} when there is none; older shapes converted). A file that is no
    evaluation is refused in one line, before any attack runs, and left as it is."""
    if not path or not os.path.exists(path):
        return {}
    ids = {dataset: images for dataset, (_, images) in splits.items()}

    def images_of(dataset):                      # the test set of a dataset no model of this run uses
        if dataset not in ids:
            with contextlib.suppress(data.DataError):
                ids[dataset] = test_set_id(dataset, data.load_test(dataset, args.data_dir, log=lambda *_: None))
        return ids.get(dataset, f"{dataset} test")

    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        with open(path) as fh:
            doc = json.load(fh)
        store = convert(doc, old_weights, images_of)
        if isinstance(doc.get("models", []), list) and all(isinstance(v, dict) for v in store.values()):
            return store
    die(f"{path} is not an evaluation written by evaluate.py; choose another --json, it is left as it is")


def attack_bits(name, m, split, s, images, store, progress, save):
    """The bits of attack `name` on the split: those stored under its key, continued where they end."""
    e = store[m["weights"]].setdefault(entry_key(name, s, images), {"bits": "", "seconds": 0.0, "notes": []})
    n, known_bits = len(split), e["bits"][:len(split)]
    if len(known_bits) < n:
        def on_batch(bits, seconds):
            e.update(bits=bits, seconds=round(e["seconds"] + seconds, 1))
            save()

        with progress.running(f"{m['label']} eps {s['eps']:.4g} {title(name)}", n, len(known_bits),
                              known_bits.count("1")), report.autoattack_log(progress.log, e.setdefault("notes", [])):
            attack_split(name, m["f"], split, s, known_bits, on_batch, progress)
        progress.log(f"  {title(name)}: {pct(from_bits(e['bits'][:n])):.2f}% ({e['seconds']:.1f} s)")
    return e


def make_row(m, s, split, images, runs, shown, store):
    """The table row of model m under settings s: accuracy and standard error of each attack of `runs`
    the store has for every image of the split; Avg, Worst and the flags once all of them are there."""
    n, mine = len(split), store[m["weights"]]
    entries = {a: mine.get(entry_key(a, s, images), {}) for a in runs}
    correct = {a: from_bits(e["bits"][:n]) for a, e in entries.items() if len(e.get("bits", "")) >= n}
    row = {"model": m["label"], "weights": m["weights"], **{k: m[k] for k in MODEL_KEYS}, "eps": s["eps"],
           "n_test": n, "seed": s["seed"], "test_set": images, "settings": s, "runs": runs,
           "accuracy": {a: pct(correct[a]) for a in shown if a in correct},
           "seconds": {a: e["seconds"] for a, e in entries.items() if "seconds" in e},
           "notes": list(dict.fromkeys(x for e in entries.values() for x in e.get("notes", []))),
           "complete": len(correct) == len(runs), "flags": []}
    # binomial standard error of each accuracy, in points: sqrt(p (100 - p) / n)
    row["stderr"] = {a: round((p * (100 - p) / n) ** 0.5, 2) for a, p in row["accuracy"].items()}
    if row["complete"]:
        row.update(accuracy=accuracies(correct, shown), flags=all_flags(correct, s, row["notes"]))
        if "eps0" in correct:
            row["sanity"] = {"eps0": pct(correct["eps0"]), "large_eps": pct(correct["large_eps"]),
                             "large_eps_value": s["large_eps"]}
    return row


# ============================================================================ command line

def eps_list(text):
    """'0.3' or '0.1,0.2,0.3' or '2/255,8/255' -> sorted list of distinct budgets in (0, 1]."""
    parts = [t.strip() for t in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty entry; separate the eps values by single commas")
    values = sorted({fraction(t) for t in parts})
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each eps must lie in (0, 1], in pixel units (8/255 on CIFAR)")
    return values


def build_parser():
    p = OneLineParser(prog="evaluate.py", description="Evaluate classifiers under white- and black-box "
                      "L-inf attacks (accuracy in %), with checks for gradient masking.")
    a = p.add_argument
    a("models", nargs="+", metavar="MODEL", help="train.py checkpoints (best.pt / last.pt), state_dict files "
      "(with --dataset and --arch) or path/to/file.py:function factories; several give one table")
    a("--attacks", default="natural,fgsm,pgd20,pgd100,cw", help=f"comma list of {', '.join(NAMES)}, or pgdN "
      "(PGD with N steps). default: %(default)s")
    a("--eps", type=eps_list, help="L-inf budget(s) in pixel units, one row each: 0.3, 0.1,0.2,0.3 or "
      "2/255,8/255. default: the paper's (0.3 on MNIST, 8/255 on CIFAR)")
    a("--alpha", type=fraction, help="step size of pgdN, mtpgd and cw in pixel units. default: the paper's "
      "(0.015 at eps 0.3 on MNIST, 0.003 at eps 8/255 on CIFAR), scaled with --eps")
    a("--cw-steps", type=int, help="steps of cw (default 30)")
    a("--mt-steps", type=int, help="steps of mtpgd towards each target class (default 20)")
    a("--restarts", type=int, help="runs of pgdN, cw, mtpgd, pgd10rs (default 1); the first is the paper's, "
      "the others start at random points; an example is robust only if it survives all")
    a("--queries", type=int, help="queries of square (default 5000; autoattack keeps its own 5000)")
    a("--seed", type=int, default=0, help="seeds the random starts and pyautoattack")
    a("--sanity", action="store_true", help="also run PGD-20 at eps 0 (must equal natural) and PGD-100 at "
      "eps 0.5 (must reach ~0%%), once per model")
    a("--save-masks", metavar="FILE.png", help="CAT checkpoint only: Figure-2 grid of x, x + delta, mask, x_cali, "
      "and the mean mask over the test images (a PGD-20 pass of its own)")
    a("--dataset", choices=sorted(common.TEST_ATTACK), help="the dataset of a state_dict or factory; refuses "
      "checkpoints trained on another")
    a("--arch", help="the models.py architecture of a state_dict; refuses checkpoints of another")
    a("--subset", type=int, help="evaluate on the first N test images. default: all (10,000 on MNIST and CIFAR)")
    a("--batch-size", type=int, default=500, help="test images per batch (restarts attack the survivors only). "
      "default: %(default)s")
    a("--json", help="the store of per-image results (kept per model weights, attack and the settings it reads; "
      "written after each batch) and this run's table; running again reuses what matches and keeps the rest")
    a("--csv", help="write the table here as CSV")
    a("--plot", metavar="FILE.png", help="accuracy against eps, one line per attack and model (two or more --eps), "
      "in the format of its extension (.png, .pdf, .svg, ...)")
    a("--progress", type=float, default=30.0, help="seconds between progress lines while an attack runs")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--data-dir", default="data", help="folder holding the datasets (see data.py)")
    return p


def parse_args(argv=None):
    """Flags -> namespace, or exit 2 with one line naming the problem and the fix."""
    p = build_parser()
    args = p.parse_args(argv)
    typed = [a.strip() for a in args.attacks.split(",")]
    args.attacks = list(dict.fromkeys(typed))
    unknown = [a for a in args.attacks if a and not known(a)]
    used = lambda test: any(test(a) for a in args.attacks)
    outputs = {flag: o for flag, o in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot),
                                       ("--save-masks", args.save_masks)) if o is not None}
    drawn = {"--plot": report.figure_problem, "--save-masks": report.image_problem}     # the extension's format
    refused = {flag: common.unwritable(o) or drawn.get(flag, lambda _: None)(o)     # tried now, before any attack
               for flag, o in outputs.items()}
    checks = [
        (args.attacks != [""], f"--attacks is empty; choose from {', '.join(NAMES)}"),
        (all(typed), f"--attacks {','.join(typed)} has an empty entry; separate the attacks by single commas"),
        (not unknown, f"unknown attack {', '.join(unknown)} in --attacks; choose from {', '.join(NAMES)}, pgdN"),
        (args.restarts is None or args.restarts >= 1, f"--restarts {args.restarts} must be >= 1"),
        (args.restarts is None or used(restartable), "--restarts applies to pgdN, cw, mtpgd, pgd10rs: add one"),
        (args.queries is None or args.queries >= 1, f"--queries {args.queries} must be >= 1"),
        (args.queries is None or "square" in args.attacks, "--queries applies to square: add it to --attacks"),
        (args.alpha is None or 0 < args.alpha < math.inf, f"--alpha {args.alpha} must be a finite number > 0"),
        (args.alpha is None or used(lambda a: pgd_steps(a) or a in ("cw", "mtpgd")),
         "--alpha is the step of pgdN, cw and mtpgd: add one to --attacks"),
        (args.cw_steps is None or (args.cw_steps >= 1 and "cw" in args.attacks), "--cw-steps needs cw and >= 1"),
        (args.mt_steps is None or (args.mt_steps >= 1 and "mtpgd" in args.attacks), "--mt-steps needs mtpgd and >= 1"),
        (not args.plot or len(args.eps or []) >= 2, "--plot draws accuracy against eps: give two or more --eps"),
        (args.progress > 0, f"--progress {args.progress} must be > 0 seconds"),
        (args.subset is None or args.subset >= 1, f"--subset {args.subset} must be >= 1"),
        (args.batch_size >= 1, f"--batch-size {args.batch_size} must be >= 1"),
        (not args.save_masks or len(args.models) == 1, "--save-masks takes one checkpoint; run once per model"),
        (not (args.arch and args.dataset) or args.arch in models.CLASSIFIERS[args.dataset],
         f"--arch {args.arch} is not a {args.dataset} classifier; choose from "
         f"{', '.join(models.CLASSIFIERS.get(args.dataset, ()))}"),
        *[(not why, f"{flag} {outputs[flag]}: {why}") for flag, why in refused.items()],
    ]
    problem = next((msg for ok, msg in checks if not ok), None)
    if problem:
        p.error(problem)
    return args


def need_packages(args):
    """Refuse before any compute when an optional package that the flags need is missing."""
    if EXTERNAL & set(args.attacks):
        try:
            import pyautoattack  # noqa: F401
        except ImportError:
            die(f"--attacks {','.join(sorted(EXTERNAL))} use the authors' implementation: "
                "pip install pyautoattack==0.2.0")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        die("--plot draws with matplotlib: pip install matplotlib")


def load_everything(args, device):
    """Every model (with the hash of its weights) and test split (with its name in the store),
    checked before any evaluation starts: a bad one costs no compute."""
    try:
        loaded, splits = [], {}
        for source in args.models:
            m = checkpoints.load_model(source, args.dataset, args.arch, device)
            if args.save_masks and m["g"] is None:
                die(f"{source} has no mask network (not a CAT checkpoint, or trained with --no-mask); "
                    "--save-masks needs one: drop it or pass a CAT checkpoint")
            loaded.append({**m, "weights": checkpoints.weights_hash(m["f"])})
        for dataset in dict.fromkeys(m["dataset"] for m in loaded):
            test = data.load_test(dataset, args.data_dir)
            if (args.subset or 0) > len(test):
                die(f"--subset {args.subset}: the {dataset} test set has {len(test):,} images; give at most that "
                    "or drop --subset")
            splits[dataset] = (test.take(slice(0, args.subset)).to(device), test_set_id(dataset, test))
        for m in loaded:
            x, _ = next(data.batches(splits[m["dataset"]][0].take(slice(0, 2)), 2))
            with attacks.eval_mode(m["f"]):
                checkpoints.check_output(m, x)
    except (checkpoints.CheckpointError, data.DataError) as e:
        die(str(e))
    return loaded, splits


def evaluate_all(loaded, splits, args, store, rows, save):
    """Every model at every eps, each row appended to `rows` and renewed after each attack; returns
    the Figure-2 grid of the first model (for --save-masks, which takes one)."""
    progress, grid = report.Progress(args.progress), None
    for m in loaded:
        split, images = splits[m["dataset"]]
        store.setdefault(m["weights"], {}).setdefault("model", {k: m[k] for k in MODEL_KEYS})
        for k, eps in enumerate(args.eps or [None]):
            s = settings_for(m["dataset"], eps, args.alpha, args.cw_steps, args.mt_steps, args.restarts or 1,
                             args.queries or 5000, args.seed, args.batch_size)
            runs = list(dict.fromkeys(["natural", *args.attacks, *(SANITY if args.sanity and k == 0 else ())]))
            facts = [m["kind"], m["dataset"], m["arch"], m["method"], m["epoch"] is not None and f"epoch {m['epoch']}"]
            report.say(f"evaluating {m['source']} ({', '.join(str(k) for k in facts if k)}, weights "
                       f"{m['weights']}) at eps {s['eps']:.4g} on {len(split)} test images, {split.labels.device}")
            report.say(f"settings: {json.dumps(s)}")
            rows.append(make_row(m, s, split, images, runs, args.attacks, store))
            for name in runs:
                attack_bits(name, m, split, s, images, store, progress, save)
                rows[-1] = make_row(m, s, split, images, runs, args.attacks, store)
            if k == 0 and args.save_masks:
                rows[-1]["masks"], grid = run_masks(m, split, images, store, args, progress, save)
            save()
    return grid


def written(path, write, kept):
    """write(), or one line naming `path`, the cause in plain words (a full or read-only disk) and what
    is kept, exit 1: no traceback after the attacks."""
    try:
        write()
    except OSError as e:
        die(f"could not write {path}: {common.cause(e)}; {kept}", code=1)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    t_start = time.time()
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.exact_fp32()                               # full fp32: no TF32 in matmuls or convolutions
    need_packages(args)
    loaded, splits = load_everything(args, device)
    store, rows = open_store(args.json, args, splits), []         # a bad file is refused before any attack
    command = ["evaluate.py", *(sys.argv[1:] if argv is None else argv)]
    again = f"run python {shlex.join(command)} again"

    def save():
        if args.json:
            doc = {"results": store, "models": rows, "attacks": args.attacks, "command": command,
                   "command_seconds": round(time.time() - t_start, 1)}
            kept = (f"{args.json} holds every batch written before, intact" if os.path.exists(args.json)
                    else "no batch was written yet")
            written(args.json, lambda: common.write_json(doc, args.json),
                    f"{kept}: once the disk takes it (free space, or a writable one), {again} to go on")

    previous = signal.signal(signal.SIGTERM, interrupt)          # SIGTERM stops as Ctrl-C does
    try:
        grid = evaluate_all(loaded, splits, args, store, rows, save)
    except KeyboardInterrupt:
        save()
        die("interrupted; " + (f"every finished batch is in {args.json}: run the same command again to resume"
                               if args.json else "nothing kept (no --json)"), code=130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.eval_table(rows, args.attacks))
    kept = (f"every result is in {args.json}: once the disk takes it, {again} (it recomputes nothing)" if args.json
            else "the table above has the numbers (nothing else is kept without --json)")
    for path, write, name in ((args.save_masks, lambda: report.save_grid(grid, args.save_masks), "masks"),
                              (args.csv, lambda: report.write_csv(rows, args.attacks, args.csv), "csv"),
                              (args.plot, lambda: report.plot_curve(rows, args.attacks, args.plot), "curve")):
        if path:
            written(path, write, kept)
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
