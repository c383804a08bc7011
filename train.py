"""Calibrated Adversarial Training: the training loop.

    python train.py --dataset mnist --attack cent --beta1 0.3 --epochs 1 --subset 3000 --out runs/demo
    python train.py --dataset cifar10 --arch preact18 --attack cw --beta1 0.05

Per batch (Sec. 4.4 of the paper; the order is the authors' code's):
  1. perturb   delta = PGD(f, x, y) - x, T steps, random start          (Eq. 9)
  2. mask      M = g_phi(x + delta); x_cali = x + M * delta               (Eq. 10-11)
  3. update f  on Eq. 13 with M fixed (detached)
  4. update g  on Eq. 14 with the *updated* f fixed, reusing M's graph from step 2
Step 4 runs g_phi's forward only once per batch (step 2) and computes no gradient for f.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import attacks
import cat
import data
import models

# ----------------------------------------------------------------------------- configuration

# The paper's settings per dataset (Sec. 5.1.1) and, where it is silent, the authors' code's.
DEFAULTS = {
    "mnist": dict(arch="mnist_cnn", eps=0.3, alpha=0.3 / 20, steps=20, beta=1.0, beta1=0.3, kappa=150.0,
                  epochs=40, batch_size=100, optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
                  milestones=[30], augment=False, val_size=1000,
                  eval_eps=0.3, eval_alpha=0.015),
    "cifar10": dict(arch="preact18", eps=8 / 255, alpha=2 / 255, steps=10, beta=5.0, beta1=0.05, kappa=50.0,
                    epochs=130, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                    milestones=[100, 120], augment=True, val_size=1000,
                    eval_eps=8 / 255, eval_alpha=0.003),
}
DEFAULTS["cifar100"] = dict(DEFAULTS["cifar10"])
ATTACK_LOSS = {"cent": "ce", "cw": "cw"}     # --attack name -> attacks.pgd(loss=...)


def fraction(text):
    """A float that may be written as a fraction: '0.3', '8/255'."""
    num, _, den = text.partition("/")
    try:
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line on stderr and exits with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    p = OneLineParser(description="Calibrated Adversarial Training (Huang et al. 2021). "
                      "Unset flags take the paper's value for --dataset.")
    p.add_argument("--dataset", default="mnist", choices=sorted(DEFAULTS))
    p.add_argument("--arch", help="classifier: mnist_cnn (mnist); preact18 or wrn34_10 (cifar). default: mnist_cnn / preact18")
    p.add_argument("--attack", default="cent", choices=sorted(ATTACK_LOSS),
                   help="training perturbation: cent = PGD on cross-entropy (CAT_cent), cw = PGD on the CW-inf margin (CAT_cw)")
    p.add_argument("--beta", type=float, help="weight of the KL term in Eq. 13. default: 1 (mnist), 5 (cifar)")
    p.add_argument("--beta1", type=float, help="weight of the CE term in Eq. 14. default: 0.3 (mnist), 0.05 (cifar)")
    p.add_argument("--eps", type=fraction, help="L-inf budget in [0,1] pixel units; '8/255' is accepted. default: 0.3 (mnist), 8/255 (cifar)")
    p.add_argument("--alpha", type=fraction, help="PGD step size, pixel units. default: eps/20 (mnist), 2/255 (cifar)")
    p.add_argument("--steps", type=int, help="PGD steps T of the training attack. default: 20 (mnist), 10 (cifar)")
    p.add_argument("--kappa", type=float, help="CW confidence for --attack cw. default: 150 (mnist), 50 (cifar)")
    p.add_argument("--epochs", type=int, help="default: 40 (mnist), 130 (cifar)")
    p.add_argument("--batch-size", type=int, help="default: 100 (mnist), 128 (cifar)")
    p.add_argument("--lr", type=float, help="initial learning rate of both networks; /10 at each milestone. "
                   "default: 1e-3 Adam (mnist), 0.1 SGD (cifar)")
    p.add_argument("--milestones", type=int, nargs="*", help="epochs after which lr is divided by 10. default: 30 (mnist), 100 120 (cifar)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, help="train on the first N examples of a seeded shuffle of the training split")
    p.add_argument("--val-size", type=int, help="held-out training examples used to pick best.pt. default: 1000")
    p.add_argument("--out", default="runs/cat", help="output folder: last.pt, best.pt, metrics.jsonl, config.json")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", default="data", help="folder holding the datasets (see data.py)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    return p


def parse_config(argv=None):
    """Flags -> a plain dict with every dataset default filled in, or exit 2 with one line."""
    parser = build_parser()
    cfg = vars(parser.parse_args(argv))
    for key, value in DEFAULTS[cfg["dataset"]].items():
        if cfg.get(key) is None:
            cfg[key] = value
    if cfg["alpha"] is None or "alpha" not in cfg:
        cfg["alpha"] = cfg["eps"] / 20
    problem = check_config(cfg)
    if problem:
        parser.error(problem)
    return cfg


def check_config(cfg):
    """The first impossible value in cfg, as a sentence with its fix, or None."""
    allowed = models.CLASSIFIERS[cfg["dataset"]]
    if cfg["arch"] not in allowed:
        return f"--arch {cfg['arch']} does not fit --dataset {cfg['dataset']}: use {' or '.join(allowed)}"
    checks = [
        (0 < cfg["eps"] <= 1, f"--eps {cfg['eps']} must be in (0, 1] pixel units, e.g. 0.3 or 8/255"),
        (cfg["alpha"] > 0, f"--alpha {cfg['alpha']} must be > 0"),
        (cfg["steps"] >= 1, f"--steps {cfg['steps']} must be >= 1"),
        (cfg["beta"] >= 0, f"--beta {cfg['beta']} must be >= 0"),
        (cfg["beta1"] >= 0, f"--beta1 {cfg['beta1']} must be >= 0"),
        (cfg["epochs"] >= 1, f"--epochs {cfg['epochs']} must be >= 1"),
        (cfg["batch_size"] >= 1, f"--batch-size {cfg['batch_size']} must be >= 1"),
        (cfg["lr"] > 0, f"--lr {cfg['lr']} must be > 0"),
        (cfg["subset"] is None or cfg["subset"] >= 1, f"--subset {cfg['subset']} must be >= 1"),
        (cfg["val_size"] >= 1, f"--val-size {cfg['val_size']} must be >= 1"),
    ]
    return next((msg for ok, msg in checks if not ok), None)


def lr_at(cfg, epoch):
    """Learning rate of epoch `epoch` (1-based): lr / 10 per milestone already passed."""
    return cfg["lr"] * 0.1 ** sum(epoch > m for m in cfg["milestones"])


# ----------------------------------------------------------------------------- one training step

def perturb(f, x, y, cfg):
    """Step 1: the training attack (random start), f in eval mode. Returns delta."""
    x_adv = attacks.pgd(f, x, y, cfg["eps"], cfg["alpha"], cfg["steps"], random_start=True,
                        loss=ATTACK_LOSS[cfg["attack"]], kappa=cfg["kappa"])
    return x_adv - x


def train_step(f, g, opt_f, opt_g, x, y, cfg):
    """One CAT step on a batch; returns a dict of detached scalar tensors for logging."""
    delta = perturb(f, x, y, cfg)
    # Step 2: one forward of g_phi; its graph is kept for step 4.
    g.train()
    mask = g(x + delta)                                           # (N, C, H, W) in (0, 1)
    # Step 3: classifier update, Eq. 13, mask fixed.
    f.train()
    logits_nat = f(x)
    logits_cali = f(cat.calibrate(x, delta, mask.detach()))
    loss_f, nat, rob = cat.classifier_loss(logits_nat, logits_cali, y, cfg["beta"])
    opt_f.zero_grad(set_to_none=True)
    loss_f.backward()
    opt_f.step()
    # Step 4: mask update, Eq. 14, with the updated f fixed: eval mode, no parameter gradients.
    with attacks.eval_mode(f), frozen(f):
        with torch.no_grad():
            logits_adv = f(x + delta)
        loss_g, kl, ce = cat.mask_loss(logits_adv, f(cat.calibrate(x, delta, mask)), y, cfg["beta1"])
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return {"loss_f": loss_f.detach(), "nat": nat, "rob": rob, "loss_g": loss_g.detach(),
            "kl_g": kl, "ce_g": ce, "mask": mask.detach().mean()}


class frozen:
    """Context manager: parameters of `model` do not require grad inside."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- validation

def accuracy(f, split, cfg, batch_size=500):
    """(natural, PGD-20) accuracy in % on `split` with the paper's test attack settings."""
    correct_nat = correct_pgd = 0
    with attacks.eval_mode(f):
        for x, y in data.batches(split, batch_size):
            with torch.no_grad():
                correct_nat += (f(x).argmax(1) == y).sum().item()
            x_adv = attacks.pgd(f, x, y, cfg["eval_eps"], cfg["eval_alpha"], 20)
            with torch.no_grad():
                correct_pgd += (f(x_adv).argmax(1) == y).sum().item()
    return 100 * correct_nat / len(split), 100 * correct_pgd / len(split)


# ----------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def make_optimizer(params, cfg):
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"])
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.py: error: --device cuda but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def prepare_out(cfg):
    """Refuse an --out that already holds a run unless --overwrite."""
    if os.path.exists(os.path.join(cfg["out"], "last.pt")) and not cfg["overwrite"]:
        raise SystemExit(f"train.py: error: {cfg['out']} already holds a run; pass --overwrite "
                         "to replace it or choose another --out")
    os.makedirs(cfg["out"], exist_ok=True)


# ----------------------------------------------------------------------------- main loop

def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv=None):
    cfg = parse_config(argv)
    device = pick_device(cfg["device"])
    try:
        train, val, _ = data.load(cfg["dataset"], cfg["data_dir"], cfg["val_size"])
    except data.DataError as e:
        raise SystemExit(f"train.py: error: {e}")
    prepare_out(cfg)
    torch.manual_seed(cfg["seed"])
    if cfg["subset"]:
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg["seed"]))[:cfg["subset"]]
        train = train.take(pick)
    train, val = train.to(device), val.to(device)
    print("config:", json.dumps(cfg, sort_keys=True), flush=True)
    with open(os.path.join(cfg["out"], "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1, sort_keys=True)

    f = models.build(cfg["arch"], cfg["dataset"]).to(device)
    g = models.build(models.MASKS[cfg["dataset"]], cfg["dataset"]).to(device)
    opt_f, opt_g = make_optimizer(f.parameters(), cfg), make_optimizer(g.parameters(), cfg)
    best = {"score": -1.0, "epoch": 0}
    augment_fn = data.augment if cfg["augment"] else None
    n_batches = math.ceil(len(train) / cfg["batch_size"])
    run_start = time.time()

    for epoch in range(1, cfg["epochs"] + 1):
        for opt in (opt_f, opt_g):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, epoch)
        order = torch.Generator().manual_seed(cfg["seed"] * 100003 + epoch)   # data order = f(seed, epoch)
        sums, t0, last_print = {}, time.time(), time.time()
        for i, (x, y) in enumerate(data.batches(train, cfg["batch_size"], True, order, augment_fn), 1):
            logs = train_step(f, g, opt_f, opt_g, x, y, cfg)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            if time.time() - last_print > 30 or i == n_batches:
                last_print = time.time()
                rate = i * cfg["batch_size"] / (last_print - t0)
                eta = (n_batches - i) * (last_print - t0) / i
                print(f"epoch {epoch} [{i}/{n_batches}] {rate:.0f} img/s, epoch ETA {fmt_time(eta)}, "
                      f"loss_f {sums['loss_f'].item() / i:.4f} loss_g {sums['loss_g'].item() / i:.4f} "
                      f"mask {sums['mask'].item() / i:.3f}", flush=True)
        seconds = time.time() - t0
        nat, rob = accuracy(f, val, cfg)
        record = {"epoch": epoch, "lr": lr_at(cfg, epoch), **{k: round(v.item() / n_batches, 5) for k, v in sums.items()},
                  "val_natural": nat, "val_pgd20": rob, "seconds": round(seconds, 1),
                  "images_per_s": round(len(train) / seconds, 1)}
        print(f"epoch {epoch}: val natural {nat:.2f}% PGD-20 {rob:.2f}% ({fmt_time(seconds)})", flush=True)
        with open(os.path.join(cfg["out"], "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")
        ckpt = {"model": f.state_dict(), "mask": g.state_dict(), "opt_f": opt_f.state_dict(),
                "opt_g": opt_g.state_dict(), "config": cfg, "epoch": epoch, "metrics": record}
        if nat + rob > best["score"]:
            best = {"score": nat + rob, "epoch": epoch}
            save_atomic(ckpt, os.path.join(cfg["out"], "best.pt"))
        save_atomic({**ckpt, "best": best}, os.path.join(cfg["out"], "last.pt"))
    print(f"done in {fmt_time(time.time() - run_start)}; best epoch {best['epoch']} "
          f"(val natural + PGD-20 = {best['score']:.2f}) -> {os.path.join(cfg['out'], 'best.pt')}")


if __name__ == "__main__":
    main()
