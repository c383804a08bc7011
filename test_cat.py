"""The specification of the method, as fast tests: the equations, the attacks, the networks, one
training step. The data files are in test_data.py, the training runs and command lines in test_train.py.

    python -m pytest -q -m "not slow"        # this file and the fast checks of the others
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import cat
import config
import models
import train
from conftest import METHOD_FLAGS, logits_of, small_setup, tiny_cnn


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


# ============================================================================ attacks

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
    with torch.no_grad():
        wrong_at = torch.stack([model(p).argmax(1) != y for p in path])      # (steps + 1, 64)
    checked = 0
    for i in range(64):
        wrong = wrong_at[:, i].nonzero().flatten().tolist()
        # stop at the iterate where the example is seen misclassified for the (tau + 1)-th time
        stop = wrong[tau] if len(wrong) > tau and wrong[tau] < steps else steps
        assert torch.allclose(out[i], path[stop][i], atol=1e-6), (i, wrong, stop)
        checked += stop < steps
    assert checked > 5                                           # the early stop was exercised


# ============================================================================ models

@pytest.mark.parametrize("dataset,arch", [("mnist", "mnist_cnn"), ("cifar10", "preact18"),
                                          ("cifar100", "preact18"), ("cifar10", "wrn34_10")])
def test_classifier_shapes(dataset, arch):
    f = models.build(arch, dataset).eval()
    with torch.no_grad():
        assert f(torch.rand(2, *models.SHAPES[dataset])).shape == (2, models.CLASSES[dataset])


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_mask_shape_and_range(dataset):
    g = models.build(models.MASKS[dataset], dataset)
    x = torch.rand(3, *models.SHAPES[dataset])
    with torch.no_grad():
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


# ============================================================================ the training step

def test_one_mask_update_lowers_eq14():
    cfg, nets, x, y = small_setup()
    f, g = nets.f, nets.g
    with torch.no_grad():       # a fresh f barely depends on x, so Eq. 14 barely depends on the mask:
        f[-1].weight.mul_(30)   # sharper logits make one step's effect ~300x fp32's resolution
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


def test_f_gradient_is_eq13_only():
    """Eq. 14's backward must add nothing to f's gradients, and g's forward is reused, not rerun (MNIST's g_phi has no
    batch norm, so no forward for its running statistics either)."""
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


@pytest.mark.parametrize("flags", METHOD_FLAGS, ids=" ".join)
def test_every_method_takes_a_step(flags):
    cfg, nets, x, y = small_setup(*flags)
    f0 = [p.clone() for p in nets.f.parameters()]
    g0 = nets.g and [p.clone() for p in nets.g.parameters()]
    logs = train.train_step(nets, x, y, cfg)
    assert all(torch.isfinite(v) for v in logs.values())
    assert all(not torch.equal(a, b) for a, b in zip(f0, nets.f.parameters()))
    assert all(p.requires_grad for p in nets.f.parameters())              # the attack's freeze is undone
    assert (nets.g is not None) == ("--no-mask" not in flags and flags[1] == "cat")
    if nets.g is not None:
        assert all(not torch.equal(a, b) for a, b in zip(g0, nets.g.parameters())) and 0 < logs["mask"].item() < 1


def test_ablation_a1_uses_plain_ce():
    cfg, nets, x, y = small_setup("--no-mask", "--no-weighted-ce")
    logits = nets.f(x)
    assert train.LOSSES["cat"](logits, logits, y, cfg)[1].item() == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-6)


def test_logit_wall_joins_eq14_unless_paper_exact():
    """A mask network whose logits sit at -10 (past the wall at -5): Eq. 14 gains (10 - 5)^2 = 25."""
    losses = {}
    for flags in ([], ["--paper-exact"]):
        cfg, nets, x, y = small_setup(*flags)
        last = [m for m in nets.g.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(-10.0)
        torch.manual_seed(0)
        logs = train.train_step(nets, x, y, cfg)
        losses[bool(flags)] = logs["loss_g"].item()
        assert logs["z_q50"].item() == pytest.approx(-10.0) and logs["mask_lo"].item() == 1.0
    assert losses[False] - losses[True] == pytest.approx(25.0, rel=1e-4)


def test_the_wall_bound_reaches_eq14():
    """Logits at -10: the wall at 5 adds (10 - 5)^2 = 25, at 8 it adds (10 - 8)^2 = 4, at 12 nothing."""
    losses = {}
    for bound in ("5", "8", "12"):
        cfg, nets, x, y = small_setup("--wall-bound", bound)
        last = [m for m in nets.g.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(-10.0)
        torch.manual_seed(0)
        losses[bound] = train.train_step(nets, x, y, cfg)["loss_g"].item()
    assert losses["5"] - losses["12"] == pytest.approx(25.0, rel=1e-4)
    assert losses["8"] - losses["12"] == pytest.approx(4.0, rel=1e-4)


# ============================================================================ batch norm's running statistics

def authors_forwards(steps):
    """The train-mode forwards of one CAT step in the authors' CIFAR code, in order: f's inputs and g_phi's."""
    return {"f": ["x + delta_t"] * steps + ["x + delta",        # the attack; the CE that picks the best restart
                                            "x_cali", "x",       # Eq. 13
                                            "x + delta", "x_cali",   # Eq. 14
                                            "x"],                # the logged training loss
            "g": ["x + delta", "x + delta"]}                    # one forward per update


def step_with_deltas(nets, x, y, cfg, monkeypatch):
    """train_step on (x, y); returns the delta its attack made."""
    deltas, real = [], train.perturb
    monkeypatch.setattr(train, "perturb", lambda *a, **kw: deltas.append(real(*a, **kw)) or deltas[-1])
    train.train_step(nets, x, y, cfg)
    return deltas[0]


@pytest.mark.parametrize("dataset, flags", [("cifar10", []), ("cifar10", ["--paper-exact"]), ("mnist", [])],
                         ids=["cifar-default", "cifar-paper-exact", "mnist"])
def test_cat_step_makes_the_authors_train_mode_forwards(dataset, flags, monkeypatch):
    """Forward hooks on f and g_phi (the real nets, batch 4, T = 2) label each forward's input: x, x + delta,
    x_cali = x + M delta, or an attack iterate x + delta_t. On CIFAR, default and --paper-exact alike, the
    sequence is the authors' (train_step's docstring); MNIST's nets, which have no batch norm, skip the forwards
    that exist only for its running statistics."""
    cfg = config.parse_config(["--dataset", dataset, "--steps", "2", *flags])
    torch.manual_seed(0)
    nets = train.build_nets(cfg)
    x, y = torch.rand(4, *models.SHAPES[dataset]), torch.randint(0, 10, (4,))
    calls = {"f": [], "g": []}                                 # (input, train mode, output) per forward
    for name, net in (("f", nets.f), ("g", nets.g)):
        net.register_forward_hook(lambda m, i, o, n=name: calls[n].append((i[0].detach(), m.training, o.detach())))
    delta = step_with_deltas(nets, x, y, cfg, monkeypatch)
    z = calls["g"][0][2]                                       # g_phi's logits in step 2
    known = {"x": x, "x + delta": x + delta, "x_cali": cat.calibrate(x, delta, cat.mask_of(z))}

    def label(inp):
        return next((k for k, v in known.items() if torch.allclose(inp, v, atol=1e-6)), "x + delta_t")
    seen = {name: [(label(inp), train_mode) for inp, train_mode, _ in c] for name, c in calls.items()}
    expected = authors_forwards(2)
    if dataset == "mnist":
        expected = {"f": ["x + delta_t"] * 2 + ["x_cali", "x", "x + delta", "x_cali"], "g": ["x + delta"]}
    assert seen == {name: [(label, True) for label in labels] for name, labels in expected.items()}


def test_running_statistics_after_one_step_follow_the_authors_sequence(monkeypatch):
    """Batch norm on the input of f and of g_phi: after one CAT step (T = 1) its running mean and variance are
    those of momentum-0.1 updates, from 0 and 1, by the batch statistics of the authors' sequence of inputs,
    computed here by hand. A large eps makes x, x + delta and x_cali far apart, so that any other order shows."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    g = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, padding=1))
    g0 = copy.deepcopy(g)
    nets = train.Nets(f, g, torch.optim.SGD(f.parameters(), lr=0.1), torch.optim.SGD(g.parameters(), lr=0.1))
    cfg = config.parse_config(["--dataset", "cifar10", "--steps", "1", "--eps", "0.5", "--alpha", "0.5"])
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 10, (8,))
    torch.manual_seed(1)
    delta = step_with_deltas(nets, x, y, cfg, monkeypatch)
    torch.manual_seed(1)
    x_0 = attacks.random_init(x, cfg["eps"], cfg["start"])             # the attack's one forward: its random start
    with torch.no_grad():
        x_cali = cat.calibrate(x, delta, cat.mask_of(g0(x + delta)))    # g_phi before its update, batch statistics

    def running(inputs, momentum=0.1):
        mean, var = torch.zeros(3), torch.ones(3)
        for t in inputs:            # per channel over (N, H, W); the variance unbiased
            mean = (1 - momentum) * mean + momentum * t.mean((0, 2, 3))
            var = (1 - momentum) * var + momentum * t.var((0, 2, 3))
        return mean, var
    x_adv = x + delta
    sequence = {f[0]: [x_0, x_adv, x_cali, x, x_adv, x_cali, x], g[0]: [x_adv, x_adv]}
    for bn, inputs in sequence.items():
        mean, var = running(inputs)
        assert bn.num_batches_tracked.item() == len(inputs)
        assert torch.allclose(bn.running_mean, mean, atol=1e-6) and torch.allclose(bn.running_var, var, atol=1e-6)
    for other in ([x_0, x_adv, x, x_cali, x_adv, x_cali, x],                  # f(x) before f(x_cali)
                  [x_0, x, x_cali, x_adv, x_cali]):          # no statistics-only forwards, f(x) first
        mean, var = running(other)
        assert (f[0].running_mean - mean).abs().max() > 1e-5                   # 10x the tolerance above
