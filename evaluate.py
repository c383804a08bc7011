"""Robust accuracy of trained checkpoints on the test set, with the paper's attack settings,
and the checks a careful reviewer runs before believing the numbers.

    python evaluate.py runs/cat/best.pt --attacks natural,fgsm,pgd20,pgd100,cw,mtpgd,square,autoattack --json eval.json
    python evaluate.py runs/cat/best.pt runs/at/best.pt --attacks natural,pgd20,autoattack   # one table
    python evaluate.py runs/cat/best.pt --sanity --save-masks masks.png                      # Figure 2

Test settings (Sec. 5.1.1): PGD without random start, step 0.015 (MNIST, eps 0.3) or 0.003
(CIFAR, eps 8/255); CW-inf as in FAT: eps 0.031, step 0.003, 30 steps, kappa 50 (on MNIST
eps 0.3, step 0.015); FGSM one step of eps; MT-PGD 20 steps of the PGD step towards each of
the 9 most likely wrong classes; Square (black-box, 5000 queries) and AutoAttack (APGD-CE,
APGD-T, FAB-T, Square) from the authors' package pyautoattack. Every attack result is checked
to lie in the eps-ball and the [0, 1] box before it is scored. The model is in eval mode and
runs in full fp32 (no autocast, no TF32). Accuracies are in %.

Columns: one per attack, "Avg" = mean of those columns (as in the paper's Tables 2-3), and
"Worst" = examples that survive every attack that ran (natural included). Under the table,
flags point at numbers that look like gradient masking or a broken evaluation.
"""
import contextlib
import json
import logging
import math
import os
import sys
import time

import torch

import attacks
import cat
import common
import data
import models
from common import OneLineParser

# ============================================================================ settings

NAMES = {"natural": "NATURAL", "fgsm": "FGSM", "pgd20": "PGD-20", "pgd100": "PGD-100", "cw": "CW-inf",
         "mtpgd": "MT-PGD", "square": "Square", "autoattack": "AA", "pgd10rs": "PGD-10rs"}
RESTARTABLE = {"pgd20", "pgd100", "cw", "mtpgd", "pgd10rs"}   # --restarts applies to these
EXTERNAL = {"square", "autoattack"}                       # from pyautoattack, imported only when asked for
SANITY = ("eps0", "large_eps")                            # --sanity: not attacks of the threat model

# Test-time settings per dataset, in [0, 1] pixel units (Sec. 5.1.1; CW-inf as in FAT).
SETTINGS = {
    "mnist": dict(eps=0.3, alpha=0.015, cw_eps=0.3, cw_alpha=0.015, cw_steps=30, kappa=50.0),
    "cifar10": dict(eps=8 / 255, alpha=0.003, cw_eps=0.031, cw_alpha=0.003, cw_steps=30, kappa=50.0),
}
SETTINGS["cifar100"] = SETTINGS["cifar10"]
# Shared by all datasets. MT-PGD: PGD-20's steps per target, the 9 top wrong classes (all of
# them for 10 classes, as APGD-T). Large-eps check: at eps >= 0.5 the mid-grey image (0.5
# everywhere) lies in every ball, so every test image can be turned into the same input: no
# classifier can stay above the largest class share (~10%), and a PGD-100 that works (steps of
# eps/10, ten times across the ball) drives a model to ~0%. Survivors mean the gradients lie.
COMMON = dict(mt_steps=20, mt_targets=9, large_eps=0.5, large_alpha=0.05, large_steps=100)
LARGE_EPS_MAX = 1.0     # %: more survivors than this at eps 0.5 is flagged
NOISE_Z = 3.0           # flag an order violation beyond 3 standard deviations (see order_violation)
TOL = 1e-6              # fp32 rounding of |x_adv - x| near eps; anything beyond is an attack bug

# (stronger, weaker): the first must not score higher than the second by more than noise.
ORDER = ([(a, "natural") for a in NAMES if a != "natural"]
         + [("pgd20", "fgsm"), ("pgd100", "fgsm"), ("pgd100", "pgd20"), ("cw", "fgsm"), ("mtpgd", "fgsm"),
            ("mtpgd", "pgd20")]
         + [("autoattack", a) for a in ("fgsm", "pgd20", "pgd100", "cw", "mtpgd")]
         + [(a, "square") for a in ("pgd20", "pgd100", "cw", "mtpgd")])   # white-box must beat black-box


def settings_for(dataset, args):
    """Every number that defines the evaluation of `dataset`; saved in the JSON."""
    return {**SETTINGS[dataset], **COMMON, "pgd_steps": {"pgd20": 20, "pgd100": 100}, "restarts": args.restarts,
            "queries": args.queries, "seed": args.seed}


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
        if name in ("pgd20", "pgd100"):
            return attacks.pgd(f, x, y, s["eps"], s["alpha"], s["pgd_steps"][name], random_start)
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
    """Square (l_inf, s['queries'] queries, AutoAttack's own configuration of it) or standard
    AutoAttack, both from the authors' package. Both reseed torch's global RNG; fork_rng keeps
    that from changing the random starts of the attacks that run after them."""
    from pyautoattack import AutoAttack
    from pyautoattack.square import SquareAttack
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        if name == "square":
            square = SquareAttack(f, norm="Linf", n_queries=s["queries"], eps=s["eps"], p_init=0.8, n_restarts=1,
                                  seed=s["seed"], verbose=False, resc_schedule=False, device=x.device)
            return square.perturb(x, y)
        aa = AutoAttack(f, norm="Linf", eps=s["eps"], version="standard", seed=s["seed"], device=x.device)
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
    for run in range(s["restarts"] if name in RESTARTABLE else 1):
        idx = correct.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        x_adv = run_attack(name, f, x[idx], y[idx], s, random_start=run > 0)
        x_adv = in_threat_model(x_adv, x[idx], attack_eps(name, s), name)
        with torch.no_grad(), attacks.eval_mode(f):
            correct[idx] = f(x_adv).argmax(1) == y[idx]
    return correct


def evaluate_split(f, split, names, s, batch_size, log=print):
    """({name: bool (N,) correct after that attack}, {name: seconds}) over the whole split."""
    correct, seconds = {n: [] for n in names}, dict.fromkeys(names, 0.0)
    n_batches, t_start, t_print = math.ceil(len(split) / batch_size), time.time(), time.time()
    for i, (x, y) in enumerate(data.batches(split, batch_size)):
        for name in names:
            t0 = time.time()
            correct[name].append(attack_correct(name, f, x, y, s).cpu())   # .cpu() syncs the device
            seconds[name] += time.time() - t0
        if time.time() - t_print > 30 and i + 1 < n_batches:
            t_print = time.time()
            log(f"  batch {i + 1}/{n_batches} ({time.time() - t_start:.0f} s): " +
                " ".join(f"{n} {pct(torch.cat(correct[n])):.2f}" for n in names))
    return {n: torch.cat(v) for n, v in correct.items()}, {n: round(t, 1) for n, t in seconds.items()}


@contextlib.contextmanager
def collect_warnings(logger_name):
    """Collect the warnings a library logs (AutoAttack's own checks) instead of printing them."""
    messages, logger = [], logging.getLogger(logger_name)
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


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


def order_violation(strong, weak, correct):
    """(b, c) when `strong` (the attack that should win) scores higher than `weak` by more than
    noise, else None. Noise, paired on the same n images (McNemar): b examples survive `strong`
    but not `weak`, c the other way. Were the two attacks equally strong, each of the b + c
    disagreements would fall either way with probability 1/2, so b - c has standard deviation
    sqrt(b + c). We flag b - c > 3 sqrt(b + c): with ~20 pairs checked per model, 3 sigma
    (one-sided 0.13% each) keeps false alarms rare; it takes at least 10 examples."""
    b = (correct[strong] & ~correct[weak]).sum().item()
    c = (~correct[strong] & correct[weak]).sum().item()
    return (b, c) if b - c > NOISE_Z * math.sqrt(b + c) else None


WHY = {"natural": "an attack cannot raise accuracy; the predictions are not deterministic or the evaluation is broken",
       "square": "black-box Square beats white-box attacks, so their gradients are uninformative (gradient "
                 "masking); trust Square/AutoAttack, not the gradient attacks"}
WHY_DEFAULT = ("the stronger attack should not score higher: too few steps, a wrong step size, or gradients "
               "that mislead it (gradient masking)")


def order_flags(correct):
    """One line per attack that some stronger attack (see ORDER) scores above, beyond noise."""
    lines = []
    for weak in NAMES:
        stronger = [a for a, w in ORDER if w == weak and a in correct and w in correct]
        hits = [(a, bc) for a, bc in ((a, order_violation(a, weak, correct)) for a in stronger) if bc]
        if hits:
            above = ", ".join(f"{NAMES[a]} {pct(correct[a]):.2f}%" for a, _ in hits)
            counts = ", ".join(f"{b}/{c}" for _, (b, c) in hits)
            noise = ", ".join(f"{NOISE_Z * math.sqrt(b + c):.1f}" for _, (b, c) in hits)
            lines.append(f"{above} above {NAMES[weak]} {pct(correct[weak]):.2f}% (examples surviving it but not "
                         f"{NAMES[weak]} / the other way: {counts}; noise 3 sqrt(b+c): {noise}): "
                         + WHY.get(weak, WHY_DEFAULT))
    return lines


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
                     "the gradients are masked or vanish (saturated softmax: try cw/mtpgd, square)")
    return lines


def all_flags(correct, s, notes=()):
    """Every flag for one model: attack-order violations, sanity runs, AutoAttack's own warnings."""
    return order_flags(correct) + sanity_flags(correct, s) + [f"AutoAttack: {m}" for m in dict.fromkeys(notes)]


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
    tmp = f"{path}.tmp{os.getpid()}"
    save_image(make_grid(rows, nrow=len(rows) // 4, padding=2, pad_value=1.0), tmp, format="png")
    os.replace(tmp, path)


# ============================================================================ one checkpoint

def evaluate_model(m, split, args, log=print):
    """The full report of one loaded model `m` (see load_models) on the test `split`."""
    s = settings_for(m["dataset"], args)
    names = list(dict.fromkeys(["natural", *args.attacks, *(SANITY if args.sanity else ())]))
    torch.manual_seed(args.seed)                     # the same random starts for every model
    t0 = time.time()
    with collect_warnings("auto-attack") as notes:
        correct, seconds = evaluate_split(m["f"], split, names, s, args.batch_size, log)
    n = len(split)
    result = {**accuracies(correct, args.attacks), "checkpoint": m["path"], "dataset": m["dataset"],
              "arch": m["arch"], "method": m["method"], "epoch": m["epoch"], "n_test": n, "seed": args.seed,
              # binomial standard error of each accuracy, in points: sqrt(p (100 - p) / n)
              "stderr": {a: round(math.sqrt(pct(correct[a]) * (100 - pct(correct[a])) / n), 2) for a in args.attacks},
              "settings": s, "attack_seconds": seconds, "flags": all_flags(correct, s, notes)}
    if args.sanity:
        result["sanity"] = {"eps0": pct(correct["eps0"]), "large_eps": pct(correct["large_eps"]),
                            "large_eps_value": s["large_eps"]}
    rows = None
    if m["g"] is not None:
        result["masks"], rows = mask_report(m["f"], m["g"], split, m["config"], args.batch_size)
    result["seconds"] = round(time.time() - t0, 1)
    return result, rows


# ============================================================================ report

def label(path):
    return (os.path.basename(os.path.dirname(os.path.abspath(path))) + "/" + os.path.basename(path))[-28:]


def table(results, names):
    """The paper's Table 2 layout, then Worst, then the noise level, sanity numbers and flags."""
    cols = list(names) + ["avg"] + (["worst"] if len(names) >= 2 else [])
    heads = {**NAMES, "avg": "Avg", "worst": "Worst"}
    rows = [f"{'model':<28}" + "".join(f"{heads[c]:>9}" for c in cols)]
    rows += [f"{label(r['checkpoint']):<28}" + "".join(f"{r[c]:>9.2f}" for c in cols) for r in results]
    n = min(r["n_test"] for r in results)
    rows.append(f"accuracy in % on n = {', '.join(str(r['n_test']) for r in results)} test images; binomial "
                f"standard error <= {50 / math.sqrt(n):.2f} points. Avg: mean of the columns before it; "
                "Worst: survives every attack run, natural included")
    for r in results:
        if "sanity" in r:
            rows.append(f"sanity {label(r['checkpoint'])}: PGD-20 at eps 0 {r['sanity']['eps0']:.2f}% "
                        f"(natural must match), PGD-100 at eps {r['sanity']['large_eps_value']} "
                        f"{r['sanity']['large_eps']:.2f}% (must be ~0)")
        if "masks" in r:
            mk = r["masks"]
            rows.append(f"mask {label(r['checkpoint'])}: mean {mk['mean']:.3f}, bright pixels {mk['mean_bright']:.3f}, "
                        f"dark pixels {mk['mean_dark']:.3f} (PGD-20 at eps {mk['eps']:.4f})")
    flags = [f"  {label(r['checkpoint'])}: {line}" for r in results for line in r["flags"]]
    rows.append("flags: none" if not flags else "FLAGS (check before trusting the table):")
    return "\n".join(rows + flags)


def write_json(obj, path):
    """json.dump to a temporary file in the same folder, then rename: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


# ============================================================================ command line

def die(message):
    """One line on stderr, no traceback, exit 2 (bad input)."""
    print(f"evaluate.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def build_parser():
    p = OneLineParser(prog="evaluate.py", description="Evaluate checkpoints under white- and black-box "
                      "L-inf attacks (accuracy in %), with checks for gradient masking.")
    a = p.add_argument
    a("checkpoints", nargs="+", help="best.pt / last.pt files written by train.py; several give one table")
    a("--attacks", default="natural,fgsm,pgd20,pgd100,cw", help=f"comma list of {', '.join(NAMES)}")
    a("--restarts", type=int, default=1, help="runs of pgd20, pgd100, cw, mtpgd; the first is the paper's, "
      "the others start at random points; an example is robust only if it survives all")
    a("--queries", type=int, default=5000, help="queries of the square attack (autoattack keeps its own 5000)")
    a("--seed", type=int, default=0, help="seeds the random starts and pyautoattack")
    a("--sanity", action="store_true", help="also run PGD-20 at eps 0 (must equal natural) and PGD-100 at "
      "eps 0.5 (must reach ~0%%)")
    a("--save-masks", metavar="PNG", help="CAT checkpoint only: Figure-2 grid of x, x + delta, mask, x_cali")
    a("--dataset", choices=sorted(SETTINGS), help="refuse checkpoints trained on another dataset")
    a("--arch", help="refuse checkpoints of another classifier architecture")
    a("--subset", type=int, help="evaluate on the first N test images")
    a("--batch-size", type=int, default=500, help="test images per batch (restarts attack the survivors only)")
    a("--json", help="write every number, the settings, the seed and the wall time here")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--data-dir", default="data", help="folder holding the datasets (see data.py)")
    return p


def parse_args(argv=None):
    """Flags -> namespace, or exit 2 with one line naming the problem and the fix."""
    p = build_parser()
    args = p.parse_args(argv)
    args.attacks = list(dict.fromkeys(a.strip() for a in args.attacks.split(",") if a.strip()))
    unknown = [a for a in args.attacks if a not in NAMES]
    outputs = [o for o in (args.json, args.save_masks) if o]
    checks = [
        (not unknown, f"unknown attack {', '.join(unknown)} in --attacks; choose from {', '.join(NAMES)}"),
        (args.attacks, f"--attacks is empty; choose from {', '.join(NAMES)}"),
        (args.restarts >= 1, f"--restarts {args.restarts} must be >= 1"),
        (args.queries >= 1, f"--queries {args.queries} must be >= 1"),
        (args.subset is None or args.subset >= 1, f"--subset {args.subset} must be >= 1"),
        (args.batch_size >= 1, f"--batch-size {args.batch_size} must be >= 1"),
        (not args.save_masks or len(args.checkpoints) == 1, "--save-masks takes one checkpoint; run once per model"),
        *[(os.path.isdir(os.path.dirname(os.path.abspath(o))), f"{o}: its folder does not exist; create it first")
          for o in outputs],
    ]
    problem = next((msg for ok, msg in checks if not ok), None)
    if problem:
        p.error(problem)
    return args


def pick_device(choice):
    if choice == "cuda" and not torch.cuda.is_available():
        die("--device cuda but no CUDA device is visible; use --device cpu")
    device = torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")
    torch.backends.fp32_precision = "ieee"            # full fp32: no TF32 in matmuls or convolutions
    return device


def load_models(args, device):
    """Every checkpoint, checked before any evaluation starts: a bad one costs no compute."""
    loaded = []
    for path in args.checkpoints:
        ckpt = common.load_checkpoint(path, device)
        cfg = ckpt["config"]
        for flag in ("dataset", "arch"):
            wanted = getattr(args, flag)
            if wanted is not None and cfg.get(flag) != wanted:
                die(f"{path} was trained with {flag} {cfg.get(flag)}, not --{flag} {wanted}; "
                    f"drop --{flag} or pass a {wanted} checkpoint")
        if cfg.get("dataset") not in SETTINGS:
            raise common.CheckpointError(f"{path}: unknown dataset {cfg.get('dataset')!r} in its config")
        f, g = common.from_checkpoint(ckpt, device)
        if args.save_masks and g is None:
            die(f"{path} has no mask network (not a CAT checkpoint, or trained with --no-mask); "
                "--save-masks needs one: drop it or pass a CAT checkpoint")
        loaded.append({"path": path, "f": f.float(), "g": g, "config": cfg, "dataset": cfg["dataset"],
                       "arch": cfg.get("arch"), "method": cfg.get("method"), "epoch": ckpt["epoch"]})
    return loaded


def need_pyautoattack(args):
    if EXTERNAL & set(args.attacks):
        try:
            import pyautoattack  # noqa: F401
        except ImportError:
            die("--attacks square/autoattack use the authors' implementation: pip install pyautoattack==0.2.0")


def main(argv=None):
    t_start = time.time()
    args = parse_args(argv)
    device = pick_device(args.device)
    need_pyautoattack(args)
    try:
        loaded = load_models(args, device)
        splits = {}
        for dataset in dict.fromkeys(m["dataset"] for m in loaded):
            test = data.load(dataset, args.data_dir)[2]
            splits[dataset] = test.take(torch.arange(min(args.subset or len(test), len(test)))).to(device)
    except (common.CheckpointError, data.DataError) as e:
        die(str(e))
    results, grids = [], []
    for m in loaded:
        print(f"evaluating {m['path']} ({m['dataset']}, {m['arch']}, {m['method']}, epoch {m['epoch']}) on {device}")
        result, rows = evaluate_model(m, splits[m["dataset"]], args)
        results.append(result)
        grids.append(rows)
    print(table(results, args.attacks))
    # Outputs only now that everything succeeded.
    if args.save_masks:
        save_grid(grids[0], args.save_masks)
        print(f"masks: {args.save_masks}")
    if args.json:
        wall = round(time.time() - t_start, 1)
        write_json({**results[0], "wall_seconds": wall} if len(results) == 1 else
                   {"models": results, "attacks": args.attacks, "wall_seconds": wall}, args.json)


if __name__ == "__main__":
    main()
