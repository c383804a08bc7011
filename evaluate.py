"""Robust accuracy of trained checkpoints on the test set, with the paper's attack settings.

    python evaluate.py runs/demo/best.pt --attacks natural,fgsm,pgd20,pgd100,cw --json eval.json

Test settings (Sec. 5.1.1): PGD without random start, step 0.015 (MNIST, eps 0.3) or 0.003
(CIFAR, eps 8/255); CW-inf as in FAT: eps 0.031, step 0.003, 30 steps, kappa 50 (on MNIST
eps 0.3, step 0.015); FGSM one step of eps. The model is in eval mode and runs in fp32.
Accuracies are in %. "Avg" is the mean of every column, as in the paper's Tables 2-3.
"""
import argparse
import json
import os
import sys
import time

import torch

import attacks
import data
import models

NAMES = {"natural": "NATURAL", "fgsm": "FGSM", "pgd20": "PGD-20", "pgd100": "PGD-100", "cw": "CW-inf"}

SETTINGS = {
    "mnist": dict(eps=0.3, alpha=0.015, cw_eps=0.3, cw_alpha=0.015, cw_steps=30, kappa=50.0),
    "cifar10": dict(eps=8 / 255, alpha=0.003, cw_eps=0.031, cw_alpha=0.003, cw_steps=30, kappa=50.0),
}
SETTINGS["cifar100"] = SETTINGS["cifar10"]


def run_attack(name, f, x, y, s):
    """x_adv for attack `name` with settings `s`."""
    if name == "natural":
        return x
    if name == "fgsm":
        return attacks.fgsm(f, x, y, s["eps"])
    if name in ("pgd20", "pgd100"):
        return attacks.pgd(f, x, y, s["eps"], s["alpha"], int(name[3:]))
    if name == "cw":
        return attacks.cw_inf(f, x, y, s["cw_eps"], s["cw_alpha"], s["cw_steps"], s["kappa"])
    raise ValueError(name)


def robust_flags(f, split, names, settings, batch_size):
    """{attack: bool tensor (N,)}, True where the example is still classified correctly."""
    flags = {name: [] for name in names}
    for x, y in data.batches(split, batch_size):
        for name in names:
            x_adv = run_attack(name, f, x, y, settings)
            with torch.no_grad():
                flags[name].append((f(x_adv).argmax(1) == y).cpu())
    return {name: torch.cat(v) for name, v in flags.items()}


def evaluate_checkpoint(path, args, device, log=print):
    ckpt = models.load_checkpoint(path, device)
    cfg = ckpt["config"]
    f, _ = models.from_checkpoint(ckpt, device)
    _, _, test = data.load(cfg["dataset"], args.data_dir, log=log)
    if args.subset:
        test = test.take(torch.arange(min(args.subset, len(test))))
    test = test.to(device)
    settings = SETTINGS[cfg["dataset"]]
    t0 = time.time()
    flags = robust_flags(f, test, args.attacks, settings, args.batch_size)
    acc = {name: round(100 * v.float().mean().item(), 2) for name, v in flags.items()}
    acc["avg"] = round(sum(acc.values()) / len(acc), 2)
    return {**acc, "checkpoint": path, "dataset": cfg["dataset"], "arch": cfg["arch"], "epoch": ckpt["epoch"],
            "n_test": len(test), "settings": settings, "seconds": round(time.time() - t0, 1)}


def table(results, names):
    head = f"{'model':<28}" + "".join(f"{NAMES[n]:>9}" for n in names) + f"{'Avg':>9}"
    rows = [head]
    for r in results:
        label = os.path.basename(os.path.dirname(os.path.abspath(r["checkpoint"]))) + "/" + os.path.basename(r["checkpoint"])
        rows.append(f"{label[-28:]:<28}" + "".join(f"{r[n]:>9.2f}" for n in names) + f"{r['avg']:>9.2f}")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate checkpoints under white-box attacks (accuracy in %).")
    p.add_argument("checkpoints", nargs="+", help="best.pt / last.pt files written by train.py")
    p.add_argument("--attacks", default="natural,fgsm,pgd20,pgd100,cw", help=f"comma list of {', '.join(NAMES)}")
    p.add_argument("--subset", type=int, help="evaluate on the first N test images")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", help="write every number, the settings and the wall time here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", default="data")
    args = p.parse_args(argv)
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in args.attacks if a not in NAMES]
    if unknown:
        p.exit(2, f"evaluate.py: error: unknown attack {', '.join(unknown)}; choose from {', '.join(NAMES)}\n")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    try:
        results = [evaluate_checkpoint(path, args, device) for path in args.checkpoints]
    except (models.CheckpointError, data.DataError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    print(table(results, args.attacks))
    if args.json:
        out = results[0] if len(results) == 1 else {"models": results}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
