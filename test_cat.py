"""The specification of this repository, as tests. Run: python -m pytest -q test_cat.py"""
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import cat
import common
import data
import models
import train

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


def run_cli(*args, check=True):
    """Run one of the repository's scripts in a subprocess; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def logits_of(probs):
    """Logits whose softmax is `probs` (log-probabilities)."""
    return torch.tensor(probs, dtype=torch.float64).log()


# ============================================================================ the equations (cat.py)

def test_kl_div_matches_hand_computation():
    p, q = [[0.5, 0.5]], [[0.25, 0.75]]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert cat.kl_div(logits_of(p), logits_of(q)).item() == pytest.approx(expected, abs=1e-6)
    # batch mean, and KL(P || P) = 0
    both = cat.kl_div(logits_of(p + [[0.1, 0.9]]), logits_of(q + [[0.1, 0.9]]))
    assert both.item() == pytest.approx(expected / 2, abs=1e-6)


def test_weighted_ce_eq8():
    # p_y = 0.8 -> CE = -ln 0.8, weight 0.2; p_y = 0.25 -> CE = ln 4, weight 0.75
    logits = logits_of([[0.8, 0.2], [0.25, 0.75]])
    y = torch.tensor([0, 0])
    expected = (-math.log(0.8) * 0.2 + math.log(4) * 0.75) / 2
    assert cat.weighted_ce(logits, y).item() == pytest.approx(expected, abs=1e-6)


def test_weighted_ce_keeps_gradient_of_weight():
    # d/dz of -log p * (1 - p) at p = sigmoid(z) differs from the detached-weight gradient
    z = torch.zeros(1, 2, requires_grad=True)
    cat.weighted_ce(z, torch.tensor([0])).backward()
    # two classes, z = 0: p = 0.5; L(p) = -ln p (1-p); dL/dp = -(1-p)/p + ln p; dp/dz0 = p(1-p)
    dl_dp = -(1 - 0.5) / 0.5 + math.log(0.5)
    assert z.grad[0, 0].item() == pytest.approx(dl_dp * 0.25, abs=1e-6)


def test_calibrate_eq10():
    x = torch.tensor([0.5, 0.9, 0.1])
    delta = torch.tensor([0.2, 0.1, -0.1])
    mask = torch.tensor([0.25, 1.0, 0.5])
    assert torch.allclose(cat.calibrate(x, delta, mask), torch.tensor([0.55, 1.0, 0.05]))
    # the box clip: out-of-box input sums are cut to [0, 1]
    assert cat.calibrate(torch.tensor([0.95]), torch.tensor([0.2]), torch.tensor([1.0])).item() == 1.0


def test_classifier_loss_eq13():
    nat, cali = logits_of([[0.8, 0.2]]), logits_of([[0.4, 0.6]])
    y = torch.tensor([0])
    w_ce = -math.log(0.8) * 0.2
    kl = 0.8 * math.log(0.8 / 0.4) + 0.2 * math.log(0.2 / 0.6)    # KL(P(x) || P(x_cali))
    loss, n, r = cat.classifier_loss(nat, cali, y, beta=5.0)
    assert loss.item() == pytest.approx(w_ce + 5 * kl, abs=1e-6)
    assert (n.item(), r.item()) == (pytest.approx(w_ce, abs=1e-6), pytest.approx(kl, abs=1e-6))
    plain, _, _ = cat.classifier_loss(nat, cali, y, beta=5.0, weighted=False)     # ablation A1
    assert plain.item() == pytest.approx(-math.log(0.8) + 5 * kl, abs=1e-6)


def test_mask_loss_eq14():
    adv, cali = logits_of([[0.3, 0.7]]), logits_of([[0.6, 0.4]])
    y = torch.tensor([0])
    kl = 0.3 * math.log(0.3 / 0.6) + 0.7 * math.log(0.7 / 0.4)     # KL(P(x') || P(x_cali))
    loss, k, ce = cat.mask_loss(adv, cali, y, beta1=0.3)
    assert loss.item() == pytest.approx(kl + 0.3 * -math.log(0.6), abs=1e-6)
    assert k.item() == pytest.approx(kl, abs=1e-6) and ce.item() == pytest.approx(-math.log(0.6), abs=1e-6)


# ============================================================================ attacks

def tiny_cnn(channels=1, classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
                         nn.Flatten(), nn.LazyLinear(classes))


ATTACKS = {
    "fgsm": lambda m, x, y, eps: attacks.fgsm(m, x, y, eps),
    "pgd_ce": lambda m, x, y, eps: attacks.pgd(m, x, y, eps, eps / 4, 5, random_start=True),
    "pgd_cw": lambda m, x, y, eps: attacks.pgd(m, x, y, eps, eps / 4, 5, loss="cw", kappa=5.0),
    "pgd_kl": lambda m, x, y, eps: attacks.pgd(m, x, y, eps, eps / 4, 5, random_start=True, loss="kl"),
    "cw_inf": lambda m, x, y, eps: attacks.cw_inf(m, x, y, eps, eps / 4, steps=5),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_invariants(name):
    model = tiny_cnn()
    model(torch.zeros(1, 1, 8, 8))
    model.train()
    model[1].eval()                                  # a mixed mode must come back as it was
    x = torch.rand(6, 1, 8, 8)
    x[0] = 0.0
    x[1] = 1.0                                       # images on the box edges
    y = torch.randint(0, 10, (6,))
    eps = 0.1
    x_adv = ATTACKS[name](model, x, y, eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad
    assert (x_adv != x).any()                        # it moved
    assert model.training and not model[1].training and model[3].training
    assert all(p.grad is None for p in model.parameters())


def test_project_stays_in_ball_and_box():
    x = torch.rand(1000)
    x_adv = attacks.project(x + torch.randn(1000), x, 0.05)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1


def test_cw_margin_hand_case():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 0])
    # example 0: z_y - max other = 1 -> -(1 + kappa); example 1: -5 + kappa < 0 for kappa 2 -> 0
    assert attacks.cw_margin(logits, y, 2.0).tolist() == [-3.0, -0.0]


@pytest.fixture(scope="module")
def mnist_small():
    train_split, val, test = data.load("mnist", os.path.join(HERE, "data"), log=lambda *_: None)
    return train_split.take(torch.arange(3000)), test.take(torch.arange(500))


@pytest.fixture(scope="module")
def natural_model(mnist_small):
    """A small MNIST classifier trained naturally for ~2 epochs on 3000 images (a few seconds)."""
    train_split, _ = mnist_small
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 49, 10))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for epoch in range(3):
        for x, y in data.batches(train_split, 100, True, torch.Generator().manual_seed(epoch)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_attacks_weaken_a_natural_model_and_more_steps_are_not_weaker(natural_model, mnist_small):
    x, y = data.to_float(mnist_small[1].images), mnist_small[1].labels
    nat = acc(natural_model, x, y)
    fgsm = acc(natural_model, attacks.fgsm(natural_model, x, y, 0.1), y)
    pgd5 = acc(natural_model, attacks.pgd(natural_model, x, y, 0.1, 0.01, 5), y)
    pgd20 = acc(natural_model, attacks.pgd(natural_model, x, y, 0.1, 0.01, 20), y)
    cw = acc(natural_model, attacks.cw_inf(natural_model, x, y, 0.1, 0.01, 20, kappa=50.0), y)
    assert nat > 0.85
    assert fgsm < nat - 0.2
    assert pgd20 <= pgd5 + 0.01 and pgd20 < fgsm
    assert cw < nat - 0.3


# ============================================================================ models

@pytest.mark.parametrize("dataset,arch", [("mnist", "mnist_cnn"), ("cifar10", "preact18"),
                                          ("cifar100", "preact18"), ("cifar10", "wrn34_10")])
def test_classifier_shapes(dataset, arch):
    f = models.build(arch, dataset).eval()
    x = torch.rand(2, *models.SHAPES[dataset])
    assert f(x).shape == (2, models.CLASSES[dataset])


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_mask_shape_and_range(dataset):
    g = models.build(models.MASKS[dataset], dataset)
    x = torch.rand(3, *models.SHAPES[dataset])
    mask = cat.mask_of(g(x))
    assert mask.shape == x.shape and mask.dtype == torch.float32
    assert (mask > 0).all() and (mask < 1).all()


def test_mask_near_one_keeps_a_gradient_under_bf16():
    # a bf16 sigmoid rounds to exactly 1 for z > ~6 and its gradient vanishes; cat.mask_of stays fp32
    z = torch.full((2, 1, 4, 4), 8.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = torch.sigmoid(z.bfloat16())
        mask = cat.mask_of(z.bfloat16())
    assert (bf16 == 1).all()                              # the trap the fp32 sigmoid avoids
    assert mask.dtype == torch.float32 and (mask < 1).all()
    mask.sum().backward()
    assert (z.grad > 1e-4).all()


def test_logit_wall_is_zero_inside_and_grows_outside():
    z = torch.tensor([-7.0, -5.0, 0.0, 4.0, 6.0], requires_grad=True)
    cat.logit_wall(z, 5.0).backward()
    assert cat.logit_wall(z, 5.0).item() == pytest.approx((4 + 0 + 0 + 0 + 1) / 5)
    assert z.grad.tolist() == pytest.approx([-4 / 5, 0, 0, 0, 2 / 5])


def test_build_rejects_arch_of_other_dataset():
    with pytest.raises(ValueError, match="does not fit"):
        models.build("preact18", "mnist")


def test_mnist_cnn_matches_the_authors_layout():
    f = models.build("mnist_cnn", "mnist")
    convs = [m for m in f if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(1, 32, 1), (32, 32, 2), (32, 64, 1), (64, 64, 2)]
    assert [(l.in_features, l.out_features) for l in f if isinstance(l, nn.Linear)] == [(3136, 100), (100, 10)]


# ============================================================================ the training step

def small_setup(*flags):
    cfg = train.parse_config(["--dataset", "mnist", "--steps", "3", *flags])
    torch.manual_seed(0)
    nets = train.build_nets(cfg)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    return cfg, nets, x, y


def test_one_mask_update_lowers_eq14():
    cfg, nets, x, y = small_setup()
    f, g = nets.f, nets.g
    delta = train.perturb(f, x, y, cfg)
    opt = torch.optim.SGD(g.parameters(), lr=0.05)

    def eq14():
        with torch.no_grad():
            logits_adv = f(x + delta)
        return cat.mask_loss(logits_adv, f(cat.calibrate(x, delta, cat.mask_of(g(x + delta)))), y, cfg["beta1"])[0]

    before = eq14()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert eq14().item() < before.item()


def test_one_step_changes_both_networks():
    cfg, nets, x, y = small_setup()
    f0 = [p.clone() for p in nets.f.parameters()]
    g0 = [p.clone() for p in nets.g.parameters()]
    logs = train.train_step(nets, x, y, cfg)
    assert all(not torch.equal(a, b) for a, b in zip(f0, nets.f.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(g0, nets.g.parameters()))
    assert all(p.requires_grad for p in nets.f.parameters())
    assert all(torch.isfinite(v) for v in logs.values())
    assert 0 < logs["mask"].item() < 1


def test_f_gradient_is_eq13_only():
    """Eq. 14's backward must add nothing to f's gradients, and g's forward is reused, not rerun."""
    cfg, nets, x, y = small_setup("--lr", "1e-30")        # f and g practically unchanged by the step
    f, g = nets.f, nets.g
    calls = []
    g.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    train.train_step(nets, x, y, cfg)
    assert len(calls) == 1
    grads = [p.grad.clone() for p in f.parameters()]
    torch.manual_seed(1)                                   # same random start -> same delta
    delta = train.perturb(f, x, y, cfg)
    mask = cat.mask_of(g(x + delta)).detach()
    f.zero_grad()
    cat.classifier_loss(f(x), f(cat.calibrate(x, delta, mask)), y, cfg["beta"])[0].backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, f.parameters()))


# ============================================================================ data

def write_fake_cifar(root, n_per_batch=12, seed=0):
    """Files in the genuine CIFAR-10 python format: pickled dicts with bytes keys."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n_per_batch).tolist(),
                 b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"img{i}.png".encode() for i in range(n_per_batch)]}
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return folder


def test_cifar_loader_reads_the_python_format(tmp_path):
    folder = write_fake_cifar(str(tmp_path))
    with open(os.path.join(folder, "data_batch_1"), "rb") as fh:
        first = pickle.load(fh, encoding="bytes")
    train_split, val, test = data.load("cifar10", str(tmp_path), val_size=10, log=lambda *_: None)
    assert (len(train_split), len(val), len(test)) == (50, 10, 12)
    assert train_split.images.shape[1:] == (3, 32, 32) and train_split.images.dtype == torch.uint8
    # rows are 1024 red, 1024 green, 1024 blue values, each 32 x 32 row-major
    all_images = torch.cat([train_split.images, val.images])
    all_labels = torch.cat([train_split.labels, val.labels])
    img = torch.from_numpy(first[b"data"][3].reshape(3, 32, 32))
    hits = [i for i in range(len(all_images)) if torch.equal(all_images[i], img)]
    assert len(hits) == 1 and all_labels[hits[0]].item() == first[b"labels"][3]
    assert first[b"data"][3][1024 + 32 * 5 + 7] == img[1, 5, 7]


def test_cifar_missing_says_where_to_put_it(tmp_path):
    with pytest.raises(data.DataError, match="cifar-10-batches-py"):
        data.load("cifar10", str(tmp_path))


def test_cifar_loader_refuses_pickled_code(tmp_path):
    folder = write_fake_cifar(str(tmp_path))
    with open(os.path.join(folder, "data_batch_2"), "wb") as fh:
        pickle.dump({b"data": os.system}, fh)
    with pytest.raises(data.DataError, match="not a CIFAR python batch"):
        data.load("cifar10", str(tmp_path), val_size=5)


def test_augment_is_a_crop_and_flip():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    out = data.augment(x)
    assert out.shape == x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(64):        # each output is some 32x32 window of the padded image, maybe mirrored
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)       # (3, 9, 9, 32, 32)
        match = [(windows[:, a, b] == out[i]).all() or (windows[:, a, b].flip(-1) == out[i]).all()
                 for a in range(9) for b in range(9)]
        assert any(match)
    assert not torch.equal(out, x)


def test_mnist_offline_copy(mnist_small):
    train_split, test = mnist_small
    assert train_split.images.shape[1:] == (1, 28, 28) and test.labels.max() == 9
    assert data.to_float(train_split.images).max() == 1.0


def test_validation_split_is_disjoint_from_train(tmp_path):
    write_fake_cifar(str(tmp_path))
    tr, val, _ = data.load("cifar10", str(tmp_path), val_size=10, log=lambda *_: None)
    a, b = {bytes(t.numpy()) for t in tr.images}, {bytes(t.numpy()) for t in val.images}
    assert not a & b


# ============================================================================ command lines

def test_cli_train_and_evaluate_mnist(tmp_path):
    out = str(tmp_path / "run")
    run_cli("train.py", "--dataset", "mnist", "--subset", "200", "--epochs", "1", "--steps", "2",
            "--val-size", "50", "--out", out, "--device", "cpu")
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json"):
        assert os.path.isfile(os.path.join(out, name))
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert {"model", "mask", "config", "epoch"} <= set(ckpt) and ckpt["epoch"] == 1
    line = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[0])
    assert {"loss_f", "loss_g", "val_natural", "val_pgd20", "lr", "seconds", "images_per_s"} <= set(line)
    result = str(tmp_path / "eval.json")
    proc = run_cli("evaluate.py", os.path.join(out, "best.pt"), "--attacks", "natural,fgsm,pgd20,pgd10rs",
                   "--subset", "50", "--json", result, "--device", "cpu")
    numbers = json.load(open(result))
    assert {"natural", "fgsm", "pgd20", "pgd10rs", "avg"} <= set(numbers) and numbers["n_test"] == 50
    assert 0 <= numbers["pgd20"] <= numbers["natural"] <= 100
    assert "PGD-20" in proc.stdout and "Avg" in proc.stdout


def test_cli_train_cifar_on_generated_files(tmp_path):
    write_fake_cifar(str(tmp_path / "d"), n_per_batch=4)
    out = str(tmp_path / "run")
    run_cli("train.py", "--dataset", "cifar10", "--data-dir", str(tmp_path / "d"), "--val-size", "4",
            "--batch-size", "8", "--steps", "1", "--epochs", "1", "--out", out, "--device", "cpu")
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["config"]["arch"] == "preact18" and ckpt["config"]["eps"] == pytest.approx(8 / 255)


# ============================================================================ baselines and ablations (issue 3)

def test_at_loss_is_ce_on_adversarial():
    adv = logits_of([[0.2, 0.8]])
    loss, _, _ = cat.at_loss(None, adv, torch.tensor([1]))
    assert loss.item() == pytest.approx(-math.log(0.8), abs=1e-6)


def test_trades_loss_hand_case():
    nat, adv = logits_of([[0.9, 0.1]]), logits_of([[0.6, 0.4]])
    kl = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    loss, _, _ = cat.trades_loss(nat, adv, torch.tensor([0]), beta=6.0)
    assert loss.item() == pytest.approx(-math.log(0.9) + 6 * kl, abs=1e-6)


def test_mart_loss_hand_case():
    nat, adv = logits_of([[0.7, 0.2, 0.1]]), logits_of([[0.5, 0.3, 0.2]])
    bce = -math.log(0.5) - math.log(1 - 0.3)             # max wrong adversarial probability is 0.3
    kl = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    loss, _, _ = cat.mart_loss(nat, adv, torch.tensor([0]), beta=5.0)
    assert loss.item() == pytest.approx(bce + 5 * kl * (1 - 0.7), abs=1e-6)


METHOD_FLAGS = [["--method", m] for m in ("cat", "at", "trades", "mart", "fat")] + [
    ["--method", "cat", "--no-mask"], ["--method", "cat", "--no-mask", "--no-weighted-ce"],
    ["--method", "cat", "--attack", "cw"], ["--method", "cat", "--attack", "kl"]]


@pytest.mark.parametrize("flags", METHOD_FLAGS, ids=" ".join)
def test_every_method_takes_a_step(flags):
    cfg, nets, x, y = small_setup(*flags)
    f0 = [p.clone() for p in nets.f.parameters()]
    logs = train.train_step(nets, x, y, cfg)
    assert all(torch.isfinite(v) for v in logs.values())
    assert all(not torch.equal(a, b) for a, b in zip(f0, nets.f.parameters()))
    assert (nets.g is not None) == ("--no-mask" not in flags and flags[1] == "cat")


def test_ablation_a1_uses_plain_ce():
    cfg, nets, x, y = small_setup("--no-mask", "--no-weighted-ce")
    logits = nets.f(x)
    assert train.LOSSES["cat"](logits, logits, y, cfg)[1].item() == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-6)


def test_method_defaults_come_from_their_papers():
    trades = train.parse_config(["--dataset", "cifar10", "--method", "trades"])
    assert (trades["beta"], trades["eps"], trades["alpha"], trades["attack"]) == (6.0, 0.031, 0.007, "kl")
    mine = train.parse_config(["--dataset", "cifar10", "--method", "trades", "--beta", "1"])
    assert mine["beta"] == 1.0                                   # a flag always wins
    assert train.tau_at(train.parse_config(["--dataset", "cifar10", "--method", "fat"]), 60) == 1


@pytest.mark.parametrize("tau", [0, 2])
def test_fat_early_stop_stops_tau_steps_after_misclassification(tau):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,))
    eps, alpha, steps = 0.5, 0.02, 30
    path = [x]                                                   # the plain PGD trajectory, no random start
    for k in range(steps):
        path.append(attacks.pgd(model, x, y, eps, alpha, k + 1, loss="ce"))
    out = attacks.pgd_early_stop(model, x, y, eps, alpha, steps, tau, loss="ce", random_start=False)
    checked = 0
    for i in range(64):
        wrong = [k for k in range(steps + 1) if model(path[k][i:i + 1]).argmax().item() != y[i].item()]
        # stop at the iterate where the example is seen misclassified for the (tau + 1)-th time
        stop = wrong[tau] if len(wrong) > tau and wrong[tau] < steps else steps
        assert torch.allclose(out[i], path[stop][i], atol=1e-6), (i, wrong, stop)
        checked += stop < steps
    assert checked > 5                                           # the early stop was exercised


def in_process(argv, capsys):
    """Run train.main in this process; returns (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


TINY = ["--dataset", "mnist", "--subset", "100", "--steps", "1", "--val-size", "50", "--batch-size", "50", "--device", "cpu"]


@pytest.mark.parametrize("flags", METHOD_FLAGS[:7], ids=" ".join)
def test_every_method_trains_one_cli_epoch(flags, tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + flags + ["--epochs", "1", "--out", out])
    ckpt = common.load_checkpoint(os.path.join(out, "last.pt"))
    f, g = common.from_checkpoint(ckpt)
    assert (g is not None) == (ckpt["config"]["method"] == "cat" and ckpt["config"]["mask"])
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 1


# ============================================================================ reliability (issue 5)

def state_of(path):
    ckpt = torch.load(path, weights_only=True)
    return {**{f"f.{k}": v for k, v in ckpt["model"].items()}, **{f"g.{k}": v for k, v in (ckpt["mask"] or {}).items()}}


def assert_same_weights(a, b):
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_is_bit_identical(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.main(TINY + ["--epochs", "2", "--out", straight])
    train.main(TINY + ["--epochs", "1", "--out", split])
    train.main(TINY + ["--epochs", "2", "--out", split, "--resume"])
    assert_same_weights(os.path.join(straight, "last.pt"), os.path.join(split, "last.pt"))
    straight_ckpt = torch.load(os.path.join(straight, "last.pt"), weights_only=True)
    split_ckpt = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    for key in ("opt_f", "opt_g"):
        sa, sb = straight_ckpt[key]["state"], split_ckpt[key]["state"]
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert len(open(os.path.join(split, "metrics.jsonl")).readlines()) == 2


def test_ctrl_c_saves_and_resume_continues_exactly(tmp_path):
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    args = ["train.py", "--dataset", "mnist", "--subset", "2000", "--steps", "3", "--val-size", "50",
            "--batch-size", "50", "--device", "cpu", "--epochs", "1", "--amp", "fp32"]
    run_cli(*args, "--out", straight)
    proc = subprocess.Popen([sys.executable, *args, "--out", cut], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                     # interrupt as soon as training starts
        if line.startswith("device"):
            proc.send_signal(2)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "--resume" in out
    ckpt = torch.load(os.path.join(cut, "last.pt"), weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["step"] < 40
    run_cli(*args, "--out", cut, "--resume")
    assert_same_weights(os.path.join(straight, "last.pt"), os.path.join(cut, "last.pt"))


def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    train.save_atomic({"model": torch.ones(3)}, path)
    real_save = torch.save

    def broken_save(obj, f):                     # writes half a file, then dies
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        train.save_atomic({"model": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["model"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_out_with_a_run_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "1", "--out", out])
    before = open(os.path.join(out, "last.pt"), "rb").read()
    capsys.readouterr()
    code, err = in_process(TINY + ["--epochs", "1", "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    code, err = in_process(TINY + ["--epochs", "1", "--out", out, "--resume", "--beta1", "0.7"], capsys)
    assert code == 2 and len(err) == 1 and "--beta1" in err[0]


class Payload:
    """Unpickling this would create a marker file: the payload that must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_checkpoint_with_code(tmp_path, capsys):
    out, marker = tmp_path / "run", str(tmp_path / "pwned")
    out.mkdir()
    torch.save({"model": {}, "config": {}, "epoch": 1, "evil": Payload(marker)}, str(out / "last.pt"))
    code, err = in_process(TINY + ["--out", str(out), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "refused" in err[0]
    assert not os.path.exists(marker)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not a checkpoint at all"])
def test_resume_refuses_truncated_or_foreign_files(tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(content)
    code, err = in_process(TINY + ["--out", str(out), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "last.pt" in err[0]


def test_resume_refuses_a_foreign_dict(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"weights": torch.ones(2)}, str(out / "last.pt"))
    code, err = in_process(TINY + ["--out", str(out), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "not a train.py checkpoint" in err[0]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "1", "--out", out])
    before = open(os.path.join(out, "last.pt"), "rb").read()
    capsys.readouterr()
    code, err = in_process(TINY + ["--epochs", "1", "--out", out, "--overwrite", "--optimizer", "sgd",
                                   "--lr", "1e30", "--amp", "fp32"], capsys)
    assert code == 1 and len(err) == 1 and "non-finite loss at epoch 1 step" in err[0]
    assert open(os.path.join(out, "last.pt"), "rb").read() == before


def test_collapse_detection():
    assert not train.has_collapsed(5.0, 0.0)          # never robust yet: early epochs, no alarm
    assert not train.has_collapsed(40.0, 35.0)
    assert train.has_collapsed(40.0, 12.0)


def test_stop_on_collapse_keeps_best(tmp_path, monkeypatch, capsys):
    history = iter([[40, 30, 50], [45, 2, 50], [46, 1, 50]])     # PGD-20 falls from 60% to 4%
    monkeypatch.setattr(train, "accuracy_counts", lambda *a, **k: next(history))
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "3", "--out", out, "--stop-on-collapse"])
    printed = capsys.readouterr().out
    assert "collapsed" in printed and "--stop-on-collapse" in printed
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 2
    assert torch.load(os.path.join(out, "best.pt"), weights_only=True)["epoch"] == 1


BAD_FLAGS = [
    (["--dataset", "imagenet"], "--dataset"), (["--arch", "vgg"], "--arch vgg"),
    (["--arch", "preact18"], "does not fit"), (["--method", "free"], "--method"),
    (["--attack", "fgsm"], "--attack"), (["--eps", "0"], "--eps"), (["--eps", "8"], "--eps"),
    (["--eps", "-0.1"], "--eps"), (["--alpha", "0"], "--alpha"), (["--steps", "0"], "--steps"),
    (["--beta", "-1"], "--beta"), (["--beta1", "-0.1"], "--beta1"), (["--epochs", "0"], "--epochs"),
    (["--eps", "abc"], "--eps"), (["--method", "at", "--no-mask"], "--no-mask"),
]


@pytest.mark.parametrize("flags,needle", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_flags_get_one_line_and_exit_2(flags, needle, tmp_path, capsys):
    out = str(tmp_path / "never")
    code, err = in_process(["--dataset", "mnist", "--out", out] + flags, capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not os.path.exists(out)


def test_missing_and_corrupt_data_get_one_line(tmp_path, capsys):
    out = str(tmp_path / "never")
    code, err = in_process(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "cifar-10-batches-py" in err[0]
    folder = write_fake_cifar(str(tmp_path))
    with open(os.path.join(folder, "test_batch"), "wb") as fh:
        fh.write(b"\x80\x02garbage")
    code, err = in_process(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "test_batch" in err[0]
    assert not os.path.exists(out)


def test_bad_flag_from_the_shell_has_no_traceback(tmp_path):
    proc = run_cli("train.py", "--eps", "2", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ============================================================================ attack properties (hypothesis)

from hypothesis import given, settings, strategies as st

PROPERTY_ATTACKS = {
    "fgsm": lambda m, x, y, eps, alpha, steps: attacks.fgsm(m, x, y, eps),
    "pgd_ce": lambda m, x, y, eps, alpha, steps: attacks.pgd(m, x, y, eps, alpha, steps, random_start=True),
    "pgd_cw": lambda m, x, y, eps, alpha, steps: attacks.pgd(m, x, y, eps, alpha, steps, loss="cw"),
    "pgd_kl": lambda m, x, y, eps, alpha, steps: attacks.pgd(m, x, y, eps, alpha, steps, True, loss="kl"),
    "cw_inf": lambda m, x, y, eps, alpha, steps: attacks.cw_inf(m, x, y, eps, alpha, steps),
    "fat": lambda m, x, y, eps, alpha, steps: attacks.pgd_early_stop(m, x, y, eps, alpha, steps, tau=1, loss="ce"),
}


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(PROPERTY_ATTACKS)), n=st.integers(1, 4), c=st.integers(1, 3),
       hw=st.integers(4, 10), eps=st.floats(1e-3, 1.0), alpha=st.floats(1e-3, 0.5), steps=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16),
       train_mode=st.booleans())
def test_attack_properties(name, n, c, hw, eps, alpha, steps, dtype, seed, train_mode):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                          nn.Flatten(), nn.Linear(4 * hw * hw, 5)).to(dtype).train(train_mode)
    x = torch.rand(n, c, hw, hw, dtype=dtype)
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = 0.0, 1.0
    y = torch.randint(0, 5, (n,))
    x_adv = PROPERTY_ATTACKS[name](model, x, y, eps, alpha, steps)
    tol = 4 * torch.finfo(dtype).eps
    assert x_adv.shape == x.shape and x_adv.dtype == dtype
    assert not torch.isnan(x_adv).any()
    assert (x_adv - x).abs().max() <= eps + tol
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(m.training == train_mode for m in model.modules())


# ============================================================================ multi-process training (torchrun)

def test_ddp_two_cpu_processes(tmp_path):
    out = str(tmp_path / "ddp")
    proc = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                   "--dataset", "mnist", "--subset", "200", "--steps", "1", "--val-size", "50",
                   "--batch-size", "50", "--epochs", "1", "--device", "cpu", "--out", out)
    assert proc.stdout.count("epoch 1: val natural") == 1          # only rank 0 logs
    assert "processes 2" in proc.stdout
    ckpt = common.load_checkpoint(os.path.join(out, "last.pt"))     # loads in one process
    f, g = common.from_checkpoint(ckpt)
    assert g is not None and not any(k.startswith("module.") for k in ckpt["model"])
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 1
