"""The verdicts of an evaluation: the attacks' names and titles, accuracy, Avg and Worst, and the flags
that point at numbers that look like gradient masking or a broken evaluation. evaluate.py judges each
table with these; report.py titles its columns with them. Tensors in, numbers and lines out.

    flags = verdicts.all_flags({"natural": correct_nat, "pgd20": correct_pgd}, settings)   # bool (N,) each
"""
import math
import re

import torch

NAMES = {"natural": "NATURAL", "fgsm": "FGSM", "pgd20": "PGD-20", "pgd100": "PGD-100", "cw": "CW-inf",
         "mtpgd": "MT-PGD", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "square": "Square", "autoattack": "AA",
         "pgd10rs": "PGD-10rs"}                           # and pgdN for any N: PGD with N steps
EXTERNAL = {"apgd-ce", "apgd-t", "square", "autoattack"}  # from pyautoattack, imported only when asked for
SANITY = {"eps0": "PGD-20 at eps 0", "large_eps": "PGD-100 at eps 0.5"}   # --sanity: not attacks of the threat model

LARGE_EPS_MAX = 1.0     # %: more survivors than this at eps 0.5 is flagged
NOISE_Z = 3.0           # flag an order violation beyond 3 standard deviations (see order_violation)


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


# ============================================================================ numbers

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


# ============================================================================ comparing two methods over seeds

def seeds_and_images(a, b, draws=10000, seed=0):
    """Method A against method B when each was trained with several seeds and every model was tested on the
    same n images: a, b are lists (one per seed) of bool (n,) tensors, correct or not per test image.
    Returns (difference of mean accuracy A - B in points, its 95% interval, two-sided p) from a two-level
    bootstrap: each draw resamples A's seeds and B's seeds (the training noise) and one set of test images
    shared by every model (the test noise, paired as the images are). With 3 seeds a side the seed level
    has few distinct draws, so the interval is wide where the seeds disagree, as it should be."""
    gen, diffs = torch.Generator().manual_seed(seed), []
    acc = lambda models, imgs: torch.stack([m.float()[imgs].mean(-1) for m in models]).T    # (draws, seeds)
    pick = lambda k, d: torch.randint(0, k, (d, k), generator=gen)
    for d in [500] * (draws // 500) + [draws % 500] * (draws % 500 > 0):           # 500 draws at a time
        imgs = torch.randint(0, len(a[0]), (d, len(a[0])), generator=gen)
        diffs.append(acc(a, imgs).gather(1, pick(len(a), d)).mean(1) - acc(b, imgs).gather(1, pick(len(b), d)).mean(1))
    diff = 100 * torch.cat(diffs)
    observed = 100 * (torch.stack(a).float().mean() - torch.stack(b).float().mean()).item()
    low, high = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=diff.dtype)).tolist()
    p = min(1.0, 2 * min((diff <= 0).float().mean().item(), (diff >= 0).float().mean().item()))
    return observed, (low, high), p


# ============================================================================ flags

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


def stronger_pairs(names, mt_steps=20):
    """(stronger, weaker) attacks among `names`: the first must not score higher than the
    second beyond noise. Square is judged against the white-box attacks apart (square_flags)."""
    pgds = sorted((pgd_steps(a), a) for a in names if pgd_steps(a))
    pairs = [(a, "natural") for a in names if a != "natural"]
    pairs += [(a, "fgsm") for a in names if (white_box(a) or a == "autoattack") and a != "fgsm"]
    pairs += [(b, a) for n, a in pgds for m, b in pgds if m > n]
    pairs += [("mtpgd", a) for n, a in pgds if n <= mt_steps]           # MT-PGD: that many steps per target
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


def order_flags(correct, mt_steps=20):
    """One line per attack that some stronger attack (see stronger_pairs) scores above, beyond noise."""
    pairs, lines = stronger_pairs([a for a in correct if known(a)], mt_steps), []
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
    return (order_flags(correct, s["mt_steps"]) + square_flags(correct) + sanity_flags(correct, s)
            + [f"AutoAttack: {m}" for m in dict.fromkeys(notes)])
