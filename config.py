"""train.py's configuration: the flags, the paper's settings they default to per dataset, classifier and
method, and the checks that refuse an impossible or idle flag in one line.

    cfg = config.parse_config(["--dataset", "cifar10", "--attack", "cw"])   # a plain dict, every default filled
"""
import argparse
import math
import os

import common
import models

# The paper's settings per dataset (Sec. 5.1.1) and, where it is silent, the authors' code's.
DEFAULTS = {
    "mnist": dict(arch="mnist_cnn", eps=0.3, alpha=None, steps=20, beta=1.0, beta1=0.3, kappa=150.0,
                  epochs=40, batch_size=100, optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
                  milestones=[30], tau_milestones=[], augment=False, attack_bn="train"),
    "cifar10": dict(arch="preact18", eps=8 / 255, alpha=2 / 255, steps=10, beta=5.0, beta1=0.05, kappa=50.0,
                    epochs=140, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                    milestones=[100, 120], tau_milestones=[], augment=True, attack_bn="train"),
}
DEFAULTS["cifar100"] = dict(DEFAULTS["cifar10"], epochs=120, milestones=[100, 110])
# The authors' schedules that depend on the classifier, over DEFAULTS[dataset]: (dataset, arch) -> settings.
ARCH_DEFAULTS = {("cifar10", "wrn34_10"): dict(milestones=[100, 110])}

# Each baseline's own paper's (or public code's) training settings, over the dataset defaults.
# MART and FAT published no MNIST setting: there they keep the dataset defaults above.
# attack_bn: TRADES', MART's and FAT's code attack in eval mode; Madry et al.'s AT code, like CAT's, in train mode.
METHOD_DEFAULTS = {
    ("at", "mnist"): dict(attack="cent", steps=40, alpha=0.01, lr=1e-4, batch_size=50, epochs=100, milestones=[]),
    ("at", "cifar"): dict(attack="cent", steps=7, alpha=2 / 255, weight_decay=2e-4, epochs=205, milestones=[102, 154]),
    ("trades", "mnist"): dict(attack="kl", steps=40, alpha=0.01, beta=1.0, optimizer="sgd", lr=0.01,
                              momentum=0.9, batch_size=128, epochs=100, milestones=[54, 74, 89], attack_bn="eval"),
    ("trades", "cifar"): dict(attack="kl", eps=0.031, steps=10, alpha=0.007, beta=6.0, weight_decay=2e-4,
                              epochs=76, milestones=[74], attack_bn="eval"),
    ("mart", "mnist"): dict(attack="cent", attack_bn="eval"),
    ("mart", "cifar"): dict(attack="cent", steps=10, alpha=2 / 255, beta=5.0, lr=0.01, weight_decay=3.5e-3,
                            epochs=100, milestones=[75, 90], attack_bn="eval"),
    ("fat", "mnist"): dict(attack="kl", attack_bn="eval"),
    ("fat", "cifar"): dict(attack="kl", eps=0.031, steps=10, alpha=0.007, beta=6.0, weight_decay=2e-4,
                           epochs=120, milestones=[59, 89, 109], tau_milestones=[50, 90], attack_bn="eval"),
    ("cat", "mnist"): dict(attack="cent"),
    ("cat", "cifar"): dict(attack="cent"),
}

METHODS = sorted({method for method, _ in METHOD_DEFAULTS})        # each has its loss in train.LOSSES
ATTACKS = ("cent", "cw", "kl")             # the training attack's loss: attacks.pgd(loss=...)
# Flags a resumed run may change when typed; any other typed flag must match the run being resumed, and an
# untyped one keeps the run's saved value. ALWAYS come from the command line, typed or not.
RESUMABLE = {"epochs", "device", "data_dir", "out", "resume", "overwrite", "stop_on_collapse", "compile"}
ALWAYS = {"out", "resume", "overwrite"}


def build_parser():
    p = common.OneLineParser(description="Calibrated Adversarial Training (Huang et al. 2021) and baselines. "
                             "Flags left unset take the paper's value for --dataset and --method.")
    a = p.add_argument
    a("--dataset", default="mnist", choices=sorted(DEFAULTS))
    a("--method", default="cat", choices=METHODS, help="cat (this paper), at (Madry et al.), trades (Zhang et "
      "al. 2019), mart (Wang et al. 2020), fat (FAT for TRADES, Zhang et al. 2020); each baseline defaults to its own "
      "paper's settings")
    a("--arch", help="classifier: mnist_cnn (mnist); preact18 or wrn34_10 (cifar). default: mnist_cnn / preact18")
    a("--attack", choices=ATTACKS, help="loss of the training perturbation: cent = cross-entropy "
      "(CAT_cent), cw = CW-inf margin (CAT_cw), kl = KL from the natural prediction (TRADES; Figure 5). "
      "default: cent (kl for trades and fat)")
    a("--no-mask", dest="mask", action="store_false", help="CAT ablation A2: train on x + delta, no g_phi")
    a("--no-weighted-ce", dest="weighted_ce", action="store_false",
      help="CAT ablation A1 (with --no-mask): plain CE(f(x), y) in place of Eq. 8")
    a("--beta", type=float, help="weight of the robust term (beta of Eq. 13; TRADES' beta; MART's lambda). "
      "default: 1 (mnist), 5 (cifar)")
    a("--beta1", type=float, help="weight of the CE term in Eq. 14. default: 0.3 (mnist), 0.05 (cifar)")
    a("--eps", type=common.fraction, help="L-inf budget in [0,1] pixel units; '8/255' is accepted. "
      "default: 0.3 (mnist), 8/255 (cifar)")
    a("--alpha", type=common.fraction, help="PGD step size, pixel units. default: eps/20 (mnist), 2/255 (cifar)")
    a("--steps", type=int, help="PGD steps T of the training attack. default: 20 (mnist), 10 (cifar)")
    a("--kappa", type=float, help="CW confidence for --attack cw, in logits. default: 150 (mnist), 50 (cifar)")
    a("--start", type=common.fraction, help="radius of the uniform random start of the training attack, pixel "
      "units, at most eps; 0 starts at x, as the paper's test attack. default: eps (the paper); the authors' MNIST "
      "code uses 0.1")
    a("--attack-bn", choices=["train", "eval"], help="mode of f's batch norm and dropout in the training attack and "
      "in CAT's g_phi update (Eq. 14): train = batch statistics, running statistics updated by each forward (the CAT "
      "authors' and Madry et al.'s code); eval = running statistics, frozen (TRADES', MART's and FAT's code). "
      "default: train (cat, at), eval (trades, mart, fat)")
    a("--tau-milestones", type=int, nargs="*", help="FAT: tau (steps allowed after misclassification) grows by 1 "
      "after each of these epochs. default: 50 90 (cifar)")
    a("--epochs", type=int, help="default: 40 (mnist), 140 (cifar10), 120 (cifar100); with --resume, the run's "
      "own (type a larger one to lengthen the run)")
    a("--batch-size", type=int, help="global batch (split across DDP processes). default: 100 (mnist), 128 (cifar)")
    a("--optimizer", choices=["adam", "sgd"], help="for both networks. default: adam (mnist), sgd (cifar)")
    a("--lr", type=float, help="initial learning rate of both networks. default: 1e-3 (mnist), 0.1 (cifar)")
    a("--momentum", type=float, help="SGD momentum. default: 0.9 (cifar)")
    a("--weight-decay", type=float, help="SGD weight decay. default: 5e-4 (cifar)")
    a("--milestones", type=int, nargs="*", help="epochs after which lr is divided by 10. default: 30 (mnist), "
      "100 120 (cifar10 preact18), 100 110 (cifar10 wrn34_10, cifar100)")
    a("--paper-exact", action="store_true", help="CAT without the logit wall this repository adds to Eq. 14 "
      "against the mask collapse (see README, 'Where the paper leaves room')")
    a("--wall-bound", type=float, default=5.0, help="where the logit wall starts, in logits of g_phi: M stays in "
      "[sigmoid(-b), sigmoid(b)] at no cost (5: [0.0067, 0.9933]). default: 5")
    a("--seed", type=int, default=0)
    a("--subset", type=int, help="train on the first N examples of a seeded shuffle of the training split")
    a("--val-size", type=int, default=1000, help="held-out training examples used to pick best.pt, at most "
      "what the validation split holds (10,000 on MNIST)")
    a("--out", default="runs/cat", help="output folder: last.pt, best.pt, metrics.jsonl, config.json")
    a("--resume", action="store_true", help="continue the run in --out exactly where it stopped, with its own "
      "settings: flags left out keep the run's values; only --epochs, --device, --data-dir, --compile and "
      "--stop-on-collapse may differ")
    a("--overwrite", action="store_true", help="replace a run already in --out")
    a("--stop-on-collapse", action="store_true",
      help="stop when validation PGD-20 accuracy falls below half its best (catastrophic overfitting)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--amp", default="auto", choices=["auto", "bf16", "fp32"],
      help="bf16 autocast for training, or IEEE fp32 (never TF32); validation is always IEEE fp32. auto = bf16 on a "
      "GPU that has it or a CPU with native bf16 (avx512_bf16 / amx_bf16); config.json records the choice")
    a("--channels-last", default=True, action=argparse.BooleanOptionalAction, help="NHWC memory format")
    a("--compile", action="store_true", help="torch.compile both networks (checkpoints hold the plain ones)")
    a("--sync-bn", action="store_true", help="SyncBatchNorm across DDP processes")
    a("--data-dir", default="data", help="folder holding the datasets (see data.py)")
    return p


def parse_config(argv=None):
    """Flags -> a plain dict with every default filled in, or exit 2 with one line."""
    parser = build_parser()
    cfg = vars(parser.parse_args(argv))
    for action in parser._actions:          # parse again with no defaults: what was typed
        action.default = argparse.SUPPRESS
    cfg["explicit"] = sorted(vars(parser.parse_args(argv)))
    group = "mnist" if cfg["dataset"] == "mnist" else "cifar"
    arch = cfg["arch"] or DEFAULTS[cfg["dataset"]]["arch"]
    for key, value in {**DEFAULTS[cfg["dataset"]], **ARCH_DEFAULTS.get((cfg["dataset"], arch), {}),
                       **METHOD_DEFAULTS[cfg["method"], group]}.items():
        if cfg.get(key) is None:
            cfg[key] = value
    if cfg["alpha"] is None:
        cfg["alpha"] = cfg["eps"] / 20
    if cfg["start"] is None:                # the paper's random start: the whole eps-ball
        cfg["start"] = cfg["eps"]
    problem = check_config(cfg)
    if problem:
        parser.error(problem)
    return cfg


def check_config(cfg):
    """The first impossible value, or typed flag that would do nothing, as a sentence with its fix; or None."""
    flag, typed = (lambda key: "--" + key.replace("_", "-")), cfg.get("explicit", ())
    bad = [key for key, v in cfg.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        return f"{flag(bad[0])} {cfg[bad[0]]} must be a finite number"
    if cfg["arch"] not in models.CLASSIFIERS[cfg["dataset"]]:
        return (f"--arch {cfg['arch']} does not fit --dataset {cfg['dataset']}: use "
                f"{' or '.join(models.CLASSIFIERS[cfg['dataset']])}")
    if not 0 < cfg["eps"] <= 1:
        return f"--eps {cfg['eps']} must be in (0, 1] pixel units, e.g. 0.3 or 8/255"
    for keys, ok, rule in [(("alpha", "lr", "wall_bound"), lambda v: v > 0, "> 0"),
                           (("start", "beta", "beta1", "kappa", "momentum", "weight_decay"), lambda v: v >= 0, ">= 0"),
                           (("steps", "epochs", "batch_size", "subset", "val_size"), lambda v: v >= 1, ">= 1")]:
        bad = [key for key in keys if cfg[key] is not None and not ok(cfg[key])]
        if bad:
            return f"{flag(bad[0])} {cfg[bad[0]]} must be {rule}"
    for key in ("milestones", "tau_milestones"):
        bad = [m for m in cfg[key] if m < 1]
        if bad:
            return f"{flag(key)} {bad[0]} must be >= 1 (the epochs after which the change happens)"
    for key, why in (("alpha", "one PGD step"), ("start", "the random start")):
        if cfg[key] is not None and cfg[key] > cfg["eps"]:
            return (f"{flag(key)} {cfg[key]:g} is larger than --eps {cfg['eps']:g}: {why} would reach past the "
                    f"eps-ball; pass a {flag(key)} of at most {cfg['eps']:g}")
    if cfg["method"] != "cat" and not (cfg["mask"] and cfg["weighted_ce"]):
        return "--no-mask and --no-weighted-ce are ablations of --method cat"
    if cfg["resume"] and cfg["overwrite"]:
        return "--resume and --overwrite exclude each other; pick one"
    if cfg["dataset"] == "mnist" and "attack_bn" in typed:
        return "--attack-bn does nothing here: the MNIST networks have no batch norm or dropout"
    # a typed flag that would do nothing here is refused, not ignored: (flag, acts here, where it acts)
    sgd, mask = f"with --optimizer sgd (here {cfg['optimizer']})", uses_mask(cfg)
    idle = [("beta1", mask, "with --method cat and its mask network (no --no-mask)"),
            ("momentum", cfg["optimizer"] == "sgd", sgd), ("weight_decay", cfg["optimizer"] == "sgd", sgd),
            ("kappa", cfg["attack"] == "cw", f"with --attack cw (here {cfg['attack']})"),
            ("tau_milestones", cfg["method"] == "fat", "with --method fat"),
            ("paper_exact", mask, "with --method cat and its mask network"),
            ("wall_bound", mask and not cfg["paper_exact"], "with the mask network and its wall (no --paper-exact)"),
            ("sync_bn", int(os.environ.get("WORLD_SIZE", "1")) > 1, "under torchrun with 2 or more processes")]
    return next((f"{flag(key)} does nothing here: it acts only {where}"
                 for key, acts, where in idle if key in typed and not acts), None)


def resumed(cfg, saved):
    """The config of a resumed run: `saved` (its checkpoint's) for every flag left untyped, so that the run
    keeps its own length, dataset and schedule; a typed RESUMABLE flag replaces the saved value, and any
    other typed flag must agree with it, or one line and exit 2. A saved "amp": "auto" agrees with any --amp,
    and a typed --amp auto with any saved precision."""
    old = saved_settings(saved)
    for key in cfg["explicit"]:
        if key not in RESUMABLE and not (cfg[key] == old.get(key) or key == "amp" and "auto" in (cfg[key], old["amp"])):
            common.die(f"--{key.replace('_', '-')} {cfg[key]} differs from the run being resumed ({old.get(key)}); "
                       "drop the flag, or start a new run with another --out")
    typed = {k: cfg[k] for k in cfg["explicit"] if not (k == "amp" and cfg[k] == "auto")}
    return {**cfg, **old, **typed, **{k: cfg[k] for k in ALWAYS}, "explicit": cfg["explicit"]}


def saved_settings(saved):
    """A saved config (config.json, a checkpoint's) with two settings that some runs did not save filled in:
    "start": null is the whole eps-ball, and an absent "wall_bound" is 5, the only bound any run has used
    (results/README.md says which runs). "amp": "auto" stays: what it chose was not saved."""
    old = {"wall_bound": 5.0, **saved}
    if old.get("start") is None and "eps" in old:
        old["start"] = old["eps"]
    return old


def uses_mask(cfg):
    return cfg["method"] == "cat" and cfg["mask"]


def tau_at(cfg, epoch):
    """FAT's tau for epoch `epoch`: one more per tau milestone passed."""
    return sum(epoch > m for m in cfg["tau_milestones"])
