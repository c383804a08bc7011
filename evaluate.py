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
fp32 (no autocast, no TF32). Accuracies are in %.

Columns: one per attack, "Avg" = mean of those columns (as in the paper's Tables 2-3), and
"Worst" = examples that survive every attack that ran (natural included). Under the table,
flags point at numbers that look like gradient masking or a broken evaluation.

While an attack runs, a line every 30 s (--progress) gives the images done, the robust accuracy
so far and the ETA; AutoAttack's own progress lines are shown as they come. --json is rewritten
after every batch of every attack, with one '1' (correct) or '0' per test image and attack. The
same command run again skips what is finished and continues the attack it stopped in, with the
same random starts, so the worst case stays exact; Ctrl-C keeps every finished batch. The JSON
is always {"models": [one row per model and eps]}; --csv writes the table, --plot the curve.
"""
import argparse
import contextlib
import csv
import importlib.util
import json
import logging
import math
import os
import re
import sys
import threading
import time

import torch

import attacks
import cat
import checkpoints
import common
import data
import models
from common import OneLineParser, die, fraction

# ============================================================================ settings

NAMES = {"natural": "NATURAL", "fgsm": "FGSM", "pgd20": "PGD-20", "pgd100": "PGD-100", "cw": "CW-inf",
         "mtpgd": "MT-PGD", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "square": "Square", "autoattack": "AA",
         "pgd10rs": "PGD-10rs"}                           # and pgdN for any N: PGD with N steps
EXTERNAL = {"apgd-ce", "apgd-t", "square", "autoattack"}  # from pyautoattack, imported only when asked for
SANITY = {"eps0": "PGD-20 at eps 0", "large_eps": "PGD-100 at eps 0.5"}   # --sanity: not attacks of the threat model
# Shared by all datasets. MT-PGD: PGD-20's steps per target, the 9 top wrong classes (all of
# them for 10 classes, as APGD-T). Large-eps check: at eps >= 0.5 the mid-grey image (0.5
# everywhere) lies in every ball, so every test image can be turned into the same input: no
# classifier can stay above the largest class share (~10%), and a PGD-100 that works (steps of
# eps/10, ten times across the ball) drives a model to ~0%. Survivors mean the gradients lie.
COMMON = dict(mt_steps=20, mt_targets=9, large_eps=0.5, large_alpha=0.05, large_steps=100)
LARGE_EPS_MAX = 1.0     # %: more survivors than this at eps 0.5 is flagged
NOISE_Z = 3.0           # flag an order violation beyond 3 standard deviations (see order_violation)
TOL = 1e-6              # fp32 rounding of |x_adv - x| near eps; anything beyond is an attack bug


def pgd_steps(name):
    """N for an attack named pgdN (PGD with N steps, no random start), else None."""
    match = re.fullmatch(r"pgd([1-9][0-9]*)", name)
    return int(match.group(1)) if match else None


def known(name):
    return name in NAMES or pgd_steps(name) is not None


def title(name):
    return NAMES.get(name) or SANITY.get(name) or f"PGD-{pgd_steps(name)}"


def white_box(name):
    """Gradient attacks of the threat model (AutoAttack, which contains Square, is not one)."""
    return name in ("fgsm", "pgd10rs", "cw", "mtpgd", "apgd-ce", "apgd-t") or pgd_steps(name) is not None


def restartable(name):
    return name in ("cw", "mtpgd", "pgd10rs") or pgd_steps(name) is not None


def settings_for(dataset, eps=None, alpha=None, cw_steps=None, mt_steps=None, restarts=1, queries=5000, seed=0,
                 batch_size=500):
    """Every number that defines one row of the evaluation of `dataset`; saved in the JSON.
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
    after the `bits` already known (a resumed run). Each batch's random starts come from the seed
    and its first image alone, so a resumed run gives the bits of an uninterrupted one.
    on_batch(bits, seconds) runs after each batch."""
    size = s["batch_size"]
    assert len(bits) % size == 0, "a resumed attack continues at a batch boundary"
    for x, y in data.batches(split, size, start=len(bits) // size):
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


# ============================================================================ progress

def say(text):
    """One line on stdout at once (the progress thread writes too)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Progress:
    """A line every `every` seconds while an attack runs, written by a background thread, since
    one batch of an attack can take many minutes: the attack, test images done out of the total,
    robust accuracy so far and the ETA."""

    def __init__(self, every, log=say):
        self.every, self.log = every, log

    @contextlib.contextmanager
    def running(self, what, total, done=0, n_correct=0):
        self.what, self.total, self.state = what, total, (done, n_correct)
        self.start, self.t0, stop = done, time.time(), threading.Event()
        thread = threading.Thread(target=self._loop, args=(stop,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def update(self, done, n_correct):
        self.state = (done, n_correct)

    def _loop(self, stop):
        while not stop.wait(self.every):
            self.log(self.line())

    def line(self):
        (done, n_correct), elapsed = self.state, time.time() - self.t0
        new = done - self.start           # images done in this run (a resumed one starts later)
        so_far = f"{100 * n_correct / done:.2f}% robust so far" if done else "first batch running"
        eta = f"ETA {elapsed / new * (self.total - done):.0f} s" if new else "ETA after the first batch"
        return f"  {self.what}: {done}/{self.total} images, {so_far}, {elapsed:.0f} s, {eta}"


@contextlib.contextmanager
def autoattack_log(log, notes):
    """AutoAttack's own progress (its logger's debug lines) shown as it runs, and its warnings
    (the authors' checks: zero gradients, Square beating APGD, randomness) added to `notes`."""
    logger, handler = logging.getLogger("auto-attack"), logging.Handler(logging.DEBUG)

    def emit(record):
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            log(f"    AutoAttack: {message}")
        elif message not in notes:
            notes.append(message)

    handler.emit, level = emit, logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ============================================================================ numbers and flags

def pct(correct):
    return round(100 * correct.float().mean().item(), 2) if len(correct) else float("nan")


def accuracies(correct, names):
    """{attack: %} for the requested columns, "avg" and, for two or more attacks, "worst"."""
    acc = {n: pct(correct[n]) for n in names}
    # "Avg" as in the paper's Tables 2-3: the mean of natural and each attack's accuracy. It
    # leaves out "worst" (not an attack, and already counted in its parts) and the sanity runs.
    acc["avg"] = round(sum(acc.values()) / len(acc), 2)
    if len(names) >= 2:
        acc["worst"] = pct(worst_correct(correct, names))
    return acc


def worst_correct(correct, names):
    """Bool (N,): correct under every attack in `names` and natural (x itself lies in every
    eps-ball, so a misclassified natural example is never robust)."""
    return torch.stack([correct[n] for n in {"natural", *names}]).all(0)


def order_violation(strong, weak):
    """(b, c) when the bool (N,) `strong` (correct after the attack that should win) scores
    higher than `weak` by more than noise, else None. Noise, paired on the same n images
    (McNemar): b examples survive `strong` but not `weak`, c the other way. Were the two
    attacks equally strong, each of the b + c disagreements would fall either way with
    probability 1/2, so b - c has standard deviation sqrt(b + c). We flag b - c > 3 sqrt(b + c):
    with ~20 pairs checked per model, 3 sigma (one-sided 0.13% each) keeps false alarms rare;
    it takes at least 10 examples."""
    b = (strong & ~weak).sum().item()
    c = (~strong & weak).sum().item()
    return (b, c) if b - c > NOISE_Z * math.sqrt(b + c) else None


def stronger_pairs(names, s):
    """(stronger, weaker) attacks among `names`: the first must not score higher than the
    second beyond noise. Square is judged against the white-box attacks apart (square_flags)."""
    pgds = sorted((pgd_steps(a), a) for a in names if pgd_steps(a))
    pairs = [(a, "natural") for a in names if a != "natural"]
    pairs += [(a, "fgsm") for a in names if (white_box(a) or a == "autoattack") and a != "fgsm"]
    pairs += [(b, a) for n, a in pgds for m, b in pgds if m > n]
    pairs += [("mtpgd", a) for n, a in pgds if n <= s["mt_steps"]]           # MT-PGD: that many steps per target
    pairs += [(p, a) for p in ("apgd-ce", "apgd-t") for n, a in pgds if n <= 100]   # APGD: 100 iterations
    pairs += [("autoattack", a) for a in names if white_box(a) and a != "fgsm"]
    return [(a, b) for a, b in pairs if a in names and b in names]


def evidence(hits):
    """The counts behind one or more order violations, for the flag line."""
    counts = ", ".join(f"{b}/{c}" for b, c in hits)
    noise = ", ".join(f"{NOISE_Z * math.sqrt(b + c):.1f}" for b, c in hits)
    return f"examples surviving it but not the other / the other way: {counts}; noise 3 sqrt(b+c): {noise}"


WHY_NATURAL = "an attack cannot raise accuracy; the predictions are not deterministic or the evaluation is broken"
WHY_DEFAULT = ("the stronger attack should not score higher: too few steps, a wrong step size, or gradients "
               "that mislead it (gradient masking)")
WHY_MASKING = ("black-box Square beats the strongest white-box attacks, APGD included, so their gradients are "
               "uninformative (gradient masking); trust Square, AutoAttack and Worst, not the gradient attacks")
WHY_MASKING_OR_WEAK = ("black-box Square beats every white-box attack that ran: gradient masking, or fixed-step "
                       "attacks too weak for this model; add apgd-ce,apgd-t to tell which")
WHY_WEAK = ("fixed-step PGD is weak on this model (an optimizer problem, not gradient masking): quote APGD, "
            "Square and Worst, not these")


def order_flags(correct, s=COMMON):
    """One line per attack that some stronger attack (see stronger_pairs) scores above, beyond noise."""
    pairs, lines = stronger_pairs([a for a in correct if known(a)], s), []
    for weak in dict.fromkeys(w for _, w in pairs):
        hits = [(a, order_violation(correct[a], correct[weak])) for a, w in pairs if w == weak]
        hits = [(a, bc) for a, bc in hits if bc]
        if hits:
            above = ", ".join(f"{title(a)} {pct(correct[a]):.2f}%" for a, _ in hits)
            lines.append(f"{above} above {title(weak)} {pct(correct[weak]):.2f}% ({evidence([bc for _, bc in hits])}): "
                         + (WHY_NATURAL if weak == "natural" else WHY_DEFAULT))
    return lines


def square_flags(correct):
    """Black-box Square against the white-box attacks. Gradient masking only when Square beats
    all of them together (an example counts as broken if any one broke it; APGD included when it
    ran) beyond noise. When it beats some of them but not all together, those are weak optimizers."""
    white = [a for a in correct if white_box(a)]
    if "square" not in correct or not white:
        return []
    together = torch.stack([correct[a] for a in white]).all(0)
    square = f"Square {pct(correct['square']):.2f}%"
    listed = f"white-box attacks together ({', '.join(title(a) for a in white)}) {pct(together):.2f}%"
    bc = order_violation(together, correct["square"])
    if bc:
        apgd = any(a.startswith("apgd") for a in white)
        return [f"{listed} above {square} ({evidence([bc])}): " + (WHY_MASKING if apgd else WHY_MASKING_OR_WEAK)]
    hits = [(a, order_violation(correct[a], correct["square"])) for a in white if a != "fgsm"]
    hits = [(a, bc) for a, bc in hits if bc]
    if not hits:
        return []
    above = ", ".join(f"{title(a)} {pct(correct[a]):.2f}%" for a, _ in hits)
    return [f"{above} above {square} ({evidence([bc for _, bc in hits])}), but the {listed} match Square within "
            f"noise: {WHY_WEAK}"]


def sanity_flags(correct, s):
    """Lines for the --sanity runs: eps 0 must reproduce natural, eps 0.5 must reach ~0%."""
    lines = []
    if "eps0" in correct:
        differ = (correct["eps0"] != correct["natural"]).sum().item()
        if differ:
            lines.append(f"PGD-20 at eps 0 gives {pct(correct['eps0']):.2f}% but natural "
                         f"{pct(correct['natural']):.2f}% ({differ} examples differ): the predictions are not "
                         "deterministic (dropout or batch norm in train mode? a randomised model?) or the evaluation "
                         "pipeline is broken")
    if "large_eps" in correct and pct(correct["large_eps"]) > LARGE_EPS_MAX:
        lines.append(f"PGD-100 at eps {s['large_eps']} leaves {pct(correct['large_eps']):.2f}% (> {LARGE_EPS_MAX}%): "
                     "at this budget every image can be made mid-grey, so a working attack reaches ~0%; "
                     "the gradients are masked or vanish (saturated softmax: try apgd-t, square)")
    return lines


def all_flags(correct, s, notes=()):
    """Every flag for one row: attack order, Square against white-box, sanity runs, AutoAttack's warnings."""
    return (order_flags(correct, s) + square_flags(correct) + sanity_flags(correct, s)
            + [f"AutoAttack: {m}" for m in dict.fromkeys(notes)])


# ============================================================================ masks (Figure 2)

def mask_report(f, g, split, cfg, batch_size, n_images=8):
    """Mask statistics and the Figure-2 grid for a CAT checkpoint.

    delta = PGD-20(f, x) - x at the checkpoint's training eps and step (no random start), and
    M = sigmoid(g(x + delta)) as in train.train_step. Returns ({mean, mean_bright, mean_dark, ...}, grid
    images): "bright" pixels have x > 0.5 (per channel). The grid rows are x, x + delta, M and
    the calibrated x + M * delta (Eq. 10) of the first `n_images` examples."""
    sums = torch.zeros(4, dtype=torch.float64)      # sum M, sum M on bright, count bright, count all
    rows = None
    for x, y in data.batches(split, batch_size):
        delta = attacks.pgd(f, x, y, cfg["eps"], cfg["alpha"], 20) - x
        with torch.no_grad(), attacks.eval_mode(g):
            mask = cat.mask_of(g(x + delta))
        bright = (x > 0.5).float()
        sums += torch.tensor([mask.sum().item(), (mask * bright).sum().item(), bright.sum().item(), mask.numel()],
                             dtype=torch.float64)
        if rows is None:
            k = slice(0, n_images)
            rows = torch.cat([x[k], (x + delta)[k], mask[k], cat.calibrate(x, delta, mask)[k]]).cpu()
    m_all, m_bright, n_bright, n = sums.tolist()
    stats = {"mean": m_all / n, "mean_bright": m_bright / max(n_bright, 1),
             "mean_dark": (m_all - m_bright) / max(n - n_bright, 1), "bright_fraction": n_bright / n}
    stats = {k: round(v, 4) for k, v in stats.items()}
    return {**stats, "eps": cfg["eps"], "alpha": cfg["alpha"], "steps": 20}, rows


def save_grid(rows, path):
    """Four rows (natural, adversarial, mask, calibrated) as one PNG, written atomically."""
    from torchvision.utils import make_grid, save_image
    grid = make_grid(rows, nrow=len(rows) // 4, padding=2, pad_value=1.0)
    common.write_atomic(path, lambda tmp: save_image(grid, tmp, format="png"))


# ============================================================================ one row: a model at one eps

def new_row(m, s, n, runs, previous):
    """The JSON record of model `m` under settings `s` on n test images, to run the attacks `runs`
    (natural and sanity runs included); the finished batches of an earlier run of the same model
    file, settings and images are taken over from `previous`."""
    row = {"model": m["label"], "source": m["source"], "kind": m["kind"], "sha256": m["sha256"],
           "dataset": m["dataset"], "arch": m["arch"], "method": m["method"], "epoch": m["epoch"], "eps": s["eps"],
           "n_test": n, "seed": s["seed"], "settings": s, "accuracy": {}, "stderr": {}, "seconds": {}, "flags": [],
           "complete": False, "runs": runs, "notes": [], "correct": {}}
    key = ("source", "sha256", "n_test", "settings")
    old = next((r for r in previous if all(r.get(k) == row[k] for k in key)), None)
    if old:
        row.update(seconds=old.get("seconds", {}), notes=old.get("notes", []), correct=old.get("correct", {}))
        if "masks" in old:
            row["masks"] = old["masks"]
    return row


def evaluate_row(m, split, row, names, progress, save):
    """Run every attack of `names` that `row` has not finished; its bits grow batch by batch and
    save() writes them after each batch."""
    s, n = row["settings"], len(split)
    with autoattack_log(progress.log, row["notes"]):
        for name in names:
            bits = row["correct"].get(name, "")
            if len(bits) == n:
                continue

            def on_batch(bits, seconds, name=name):
                row["correct"][name] = bits
                row["seconds"][name] = round(row["seconds"].get(name, 0.0) + seconds, 1)
                save()

            what = f"{row['model']} eps {row['eps']:.4g} {title(name)}"
            with progress.running(what, n, len(bits), bits.count("1")):
                bits = attack_split(name, m["f"], split, s, bits, on_batch, progress)
            progress.log(f"  {title(name)}: {pct(from_bits(bits)):.2f}% ({row['seconds'][name]:.1f} s)")


def summarise(row, shown):
    """Accuracy and standard error of each finished attack; Avg, Worst and the flags once all ran."""
    n, s = row["n_test"], row["settings"]
    correct = {a: from_bits(b) for a, b in row["correct"].items() if len(b) == n}
    done = [a for a in shown if a in correct]
    row["accuracy"] = {a: pct(correct[a]) for a in done}
    # binomial standard error of each accuracy, in points: sqrt(p (100 - p) / n)
    row["stderr"] = {a: round(math.sqrt(p * (100 - p) / n), 2) for a, p in row["accuracy"].items()}
    row["complete"] = all(a in correct for a in row["runs"])
    if row["complete"]:
        row["accuracy"] = accuracies(correct, shown)
        row["flags"] = all_flags(correct, s, row["notes"])
        if "eps0" in correct:
            row["sanity"] = {"eps0": pct(correct["eps0"]), "large_eps": pct(correct["large_eps"]),
                             "large_eps_value": s["large_eps"]}
    row["correct"] = row.pop("correct")              # the long strings last in the JSON
    return row


# ============================================================================ report

def row_label(row, rows):
    """The model's label, with the eps when the table has more than one eps for it."""
    several = sum(r["source"] == row["source"] for r in rows) > 1
    return f"{row['model']} eps {row['eps']:.4g}" if several else row["model"]


def columns(names):
    return list(names) + ["avg"] + (["worst"] if len(names) >= 2 else [])


def table(rows, names):
    """The paper's Table 2 layout, one row per model and eps, then Worst, then the noise level,
    sanity numbers and flags."""
    cols = columns(names)
    heads = {"avg": "Avg", "worst": "Worst"}
    lines = [f"{'model':<28}{'eps':>9}" + "".join(f"{heads.get(c) or title(c):>9}" for c in cols)]
    for r in rows:
        cells = "".join(f"{r['accuracy'][c]:>9.2f}" if c in r["accuracy"] else f"{'-':>9}" for c in cols)
        lines.append(f"{r['model']:<28}{r['eps']:>9.4g}" + cells)
    lines.append(f"accuracy in % on n = {', '.join(str(n) for n in dict.fromkeys(r['n_test'] for r in rows))} "
                 f"test images; binomial standard error <= {50 / math.sqrt(min(r['n_test'] for r in rows)):.2f} "
                 "points. Avg: mean of the columns before it; Worst: survives every attack run, natural included")
    for r in rows:
        if "sanity" in r:
            lines.append(f"sanity {r['model']}: PGD-20 at eps 0 {r['sanity']['eps0']:.2f}% (natural must match), "
                         f"PGD-100 at eps {r['sanity']['large_eps_value']} {r['sanity']['large_eps']:.2f}% (must be ~0)")
        if "masks" in r:
            mk = r["masks"]
            lines.append(f"mask {r['model']}: mean {mk['mean']:.3f}, bright pixels {mk['mean_bright']:.3f}, "
                         f"dark pixels {mk['mean_dark']:.3f} (PGD-20 at eps {mk['eps']:.4f})")
    flags = [f"  {row_label(r, rows)}: {line}" for r in rows for line in r["flags"]]
    lines.append("flags: none" if not flags else "FLAGS (check before trusting the table):")
    return "\n".join(lines + flags)


def write_csv(rows, names, path):
    """The table as CSV: one line per model and eps, accuracy in %; empty where an attack did not finish."""
    cols = columns(names)

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["model", "source", "dataset", "eps", "n_test", *cols])
            for r in rows:
                out.writerow([r["model"], r["source"], r["dataset"], r["eps"], r["n_test"],
                              *[r["accuracy"].get(c, "") for c in cols]])
    common.write_atomic(path, write)


def plot_curve(rows, names, path):
    """Accuracy against eps, one line per attack (and Worst) and model, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sources = list(dict.fromkeys(r["source"] for r in rows))
    for source in sources:
        mine = sorted((r for r in rows if r["source"] == source), key=lambda r: r["eps"])
        for c in [*names, "worst"]:
            points = [(r["eps"], r["accuracy"][c]) for r in mine if c in r["accuracy"]]
            if points:
                name = "Worst" if c == "worst" else title(c)
                ax.plot(*zip(*points), marker="o", linestyle="--" if c == "worst" else "-",
                        label=f"{mine[0]['model']}: {name}" if len(sources) > 1 else name)
    ax.set(xlabel="eps (L-inf, pixel units in [0, 1])", ylabel="test accuracy (%)", ylim=(-2, 102),
           title=f"{', '.join(str(n) for n in dict.fromkeys(r['n_test'] for r in rows))} test images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


# ============================================================================ models

def load_model(source, args, device):
    """One positional argument -> checkpoints.load_model's dict, with the file's sha256."""
    m = checkpoints.load_model(source, args.dataset, args.arch, device)
    if args.save_masks and m["g"] is None:
        die(f"{source} has no mask network (not a CAT checkpoint, or trained with --no-mask); "
            "--save-masks needs one: drop it or pass a CAT checkpoint")
    return {**m, "sha256": checkpoints.sha256(source.rsplit(":", 1)[0] if m["kind"] == "factory" else source)}


def check_output(m, split):
    x, _ = next(data.batches(split.take(torch.arange(min(2, len(split)))), 2))
    with attacks.eval_mode(m["f"]):
        checkpoints.check_output(m, x)


# ============================================================================ command line

def eps_list(text):
    """'0.3' or '0.1,0.2,0.3' or '2/255,8/255' -> sorted list of distinct budgets in (0, 1]."""
    values = sorted({fraction(t.strip()) for t in text.split(",") if t.strip()})
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each eps must lie in (0, 1], in pixel units (8/255 on CIFAR)")
    return values


def build_parser():
    p = OneLineParser(prog="evaluate.py", description="Evaluate classifiers under white- and black-box "
                      "L-inf attacks (accuracy in %), with checks for gradient masking.")
    a = p.add_argument
    a("models", nargs="+", metavar="MODEL", help="train.py checkpoints (best.pt / last.pt), state_dict files "
      "(with --dataset and --arch) or path/to/file.py:function factories; several give one table")
    a("--attacks", default="natural,fgsm,pgd20,pgd100,cw", help=f"comma list of {', '.join(NAMES)}, or pgdN "
      "(PGD with N steps)")
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
    a("--save-masks", metavar="PNG", help="CAT checkpoint only: Figure-2 grid of x, x + delta, mask, x_cali")
    a("--dataset", choices=sorted(common.TEST_ATTACK), help="the dataset of a state_dict or factory; refuses "
      "checkpoints trained on another")
    a("--arch", help="the models.py architecture of a state_dict; refuses checkpoints of another")
    a("--subset", type=int, help="evaluate on the first N test images")
    a("--batch-size", type=int, default=500, help="test images per batch (restarts attack the survivors only)")
    a("--json", help="every number, the settings and per-image results, rewritten after each batch; running "
      "the same command again resumes from it")
    a("--csv", help="write the table here as CSV")
    a("--plot", metavar="PNG", help="accuracy against eps, one line per attack and model (two or more --eps)")
    a("--progress", type=float, default=30.0, help="seconds between progress lines while an attack runs")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--data-dir", default="data", help="folder holding the datasets (see data.py)")
    return p


def parse_args(argv=None):
    """Flags -> namespace, or exit 2 with one line naming the problem and the fix."""
    p = build_parser()
    args = p.parse_args(argv)
    args.attacks = list(dict.fromkeys(a.strip() for a in args.attacks.split(",") if a.strip()))
    unknown = [a for a in args.attacks if not known(a)]
    used = lambda test: any(test(a) for a in args.attacks)
    outputs = [o for o in (args.json, args.csv, args.plot, args.save_masks) if o]
    checks = [
        (not unknown, f"unknown attack {', '.join(unknown)} in --attacks; choose from {', '.join(NAMES)}, pgdN"),
        (args.attacks, f"--attacks is empty; choose from {', '.join(NAMES)}"),
        (args.restarts is None or args.restarts >= 1, f"--restarts {args.restarts} must be >= 1"),
        (args.restarts is None or used(restartable), "--restarts applies to pgdN, cw, mtpgd, pgd10rs: add one"),
        (args.queries is None or args.queries >= 1, f"--queries {args.queries} must be >= 1"),
        (args.queries is None or "square" in args.attacks, "--queries applies to square: add it to --attacks"),
        (args.alpha is None or args.alpha > 0, f"--alpha {args.alpha} must be > 0"),
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
        *[(os.path.isdir(os.path.dirname(os.path.abspath(o))), f"{o}: its folder does not exist; create it first")
          for o in outputs],
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


def read_previous(path):
    """The rows of an earlier run's --json, to resume from; [] when there is none."""
    if not path or not os.path.exists(path):
        return []
    try:
        with open(path) as fh:
            rows = json.load(fh).get("models", [])
    except (ValueError, AttributeError):
        die(f"{path} is not a JSON written by evaluate.py; delete it or choose another --json")
    return [r for r in rows if isinstance(r, dict)]


def run_key_settings(args):
    return dict(alpha=args.alpha, cw_steps=args.cw_steps, mt_steps=args.mt_steps, restarts=args.restarts or 1,
                queries=args.queries or 5000, seed=args.seed, batch_size=args.batch_size)


def load_everything(args, device):
    """Every model and test split, checked before any evaluation starts: a bad one costs no compute."""
    try:
        loaded = [load_model(source, args, device) for source in args.models]
        splits = {}
        for dataset in dict.fromkeys(m["dataset"] for m in loaded):
            test = data.load(dataset, args.data_dir)[2]
            splits[dataset] = test.take(torch.arange(min(args.subset or len(test), len(test)))).to(device)
        for m in loaded:
            check_output(m, splits[m["dataset"]])
    except (checkpoints.CheckpointError, data.DataError) as e:
        die(str(e))
    return loaded, splits


def evaluate_all(loaded, splits, args, previous, rows, save):
    """Every model at every eps, each row appended to `rows` as it starts; returns the Figure-2
    grid of the first model (for --save-masks, which takes one)."""
    progress, grid = Progress(args.progress), None
    for m in loaded:
        split = splits[m["dataset"]]
        for k, eps in enumerate(args.eps or [None]):
            s = settings_for(m["dataset"], eps, **run_key_settings(args))
            runs = ["natural", *args.attacks, *(SANITY if args.sanity and k == 0 else ())]
            rows.append(new_row(m, s, len(split), list(dict.fromkeys(runs)), previous))
            resumed = sum(len(b) == len(split) for b in rows[-1]["correct"].values())
            say(f"evaluating {m['source']} ({m['kind']}, {m['dataset']}, {m['arch']}, {m['method']}, epoch "
                f"{m['epoch']}) at eps {s['eps']:.4g} on {len(split)} test images, {split.labels.device}"
                + (f"; {resumed} attacks already finished in {args.json}" if resumed else ""))
            say(f"settings: {json.dumps(s)}")
            evaluate_row(m, split, rows[-1], rows[-1]["runs"], progress, save)
            if k == 0 and m["g"] is not None and (args.save_masks or "masks" not in rows[-1]):
                rows[-1]["masks"], grid = mask_report(m["f"], m["g"], split, m["config"], args.batch_size)
            save()
    return grid


def main(argv=None):
    t_start = time.time()
    args = parse_args(argv)
    device = common.pick_device(args.device)
    torch.backends.fp32_precision = "ieee"            # full fp32: no TF32 in matmuls or convolutions
    need_packages(args)
    loaded, splits = load_everything(args, device)
    previous, rows = read_previous(args.json), []

    def save():
        if args.json:
            common.write_json({"models": [summarise(r, args.attacks) for r in rows], "attacks": args.attacks,
                               "command": ["evaluate.py", *(sys.argv[1:] if argv is None else argv)],
                               "wall_seconds": round(time.time() - t_start, 1)}, args.json)

    try:
        grid = evaluate_all(loaded, splits, args, previous, rows, save)
    except KeyboardInterrupt:
        save()
        die("interrupted; " + (f"every finished batch is in {args.json}: run the same command again to resume"
                               if args.json else "nothing kept (no --json)"), code=130)
    print(table([summarise(r, args.attacks) for r in rows], args.attacks))
    if args.save_masks:
        save_grid(grid, args.save_masks)
        print(f"masks: {args.save_masks}")
    if args.csv:
        write_csv(rows, args.attacks, args.csv)
        print(f"csv: {args.csv}")
    if args.plot:
        plot_curve(rows, args.attacks, args.plot)
        print(f"curve: {args.plot}")


if __name__ == "__main__":
    main()
