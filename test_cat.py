"""The specification of the method, as tests: the equations, the attacks, the networks, one training
step, and that step pinned to the authors' (below). The platform's tests (data files, training runs
and command lines, evaluation, reports, torch.hub) are in tests/.

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
        path.append(attacks.pgd(model, x, y, eps, alpha, k + 1, loss="cent"))
    out = attacks.pgd_early_stop(model, x, y, eps, alpha, steps, tau, loss="cent", random_start=False)
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


# ============================================================================ the authors' step, pinned
#
# train.train_step pinned to the authors' step, and the defaults taken from the authors' code.
#
# The authors' per-batch update of CAT, in words (both networks stay in train mode throughout,
# so every forward of f or g_phi normalises with its batch's statistics and moves batch norm's
# running statistics):
#   1. delta: PGD on f from a uniform random start, T signed-gradient steps on the attack loss,
#      each projected onto the eps-ball and the [0, 1] box; then f(x + delta) once more (the CE
#      that picks the best restart; one restart).
#   2. M = sigmoid(g_phi(x + delta)), g_phi reading x + delta in raw pixels.
#   3. f takes one optimizer step on Eq. 13, M detached, f(x_cali) computed before f(x):
#      mean CE(f(x), y) (1 - p_y(x))  +  beta KL(P(x) || P(x + M delta)).
#   4. g_phi runs forward again on x + delta (same output: g_phi has not changed).
#   5. g_phi takes one optimizer step on Eq. 14 through the updated f, whose parameters are not
#      stepped: KL(P(x + delta) || P(x_cali)) + beta1 CE(f(x_cali), y), f(x + delta) a fixed
#      target, computed first.
#   6. f(x) once more (the logged training loss).
# The order of f's and g_phi's forwards decides their running statistics.
# `authors_step` writes this out in plain torch, using nothing of attacks.py, cat.py or train.py.
# Deliberate differences, each a row of the README's "Where the paper leaves room", are left
# out of the reference: the start radius is --start (eps by default; the authors' MNIST code
# uses 0.1), adversarial examples are clipped to the box (the authors' MNIST code does not),
# and x_cali is clipped to [0, 1] (a no-op in exact arithmetic, so the reference does not).

RTOL = 1e-5
STEPS = 2                     # attack steps T; enough to show the attack's batch-norm mode
SHARPEN = 30.0                # f's last layer is scaled by this, so that every break shows clearly


# ============================================================================ the authors' step

def authors_pgd(f, x, y, start, eps, alpha, steps):
    """Step 1 with f in train mode: CE attack from x + U(-start, start)."""
    x_adv = torch.min(torch.max(x + torch.empty_like(x).uniform_(-start, start), x - eps), x + eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(f(x_adv), y, reduction="none").sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv - x


def kl(logits_p, logits_q):
    """KL(P || Q), summed over classes, averaged over the batch."""
    log_p, log_q = F.log_softmax(logits_p, 1), F.log_softmax(logits_q, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def authors_step(f, g, opt_f, opt_g, x, y, cfg, old_order=False):
    """Steps 1-6 of the module docstring. old_order=True is train_step before it made the authors'
    forwards: no f(x + delta) after the attack, f(x) before f(x_cali), g_phi's second forward's
    update of the running statistics undone, no f(x) at the end."""
    f.train(), g.train()
    delta = authors_pgd(f, x, y, cfg["start"] or cfg["eps"], cfg["eps"], cfg["alpha"], cfg["steps"])
    if not old_order:
        with torch.no_grad():
            F.cross_entropy(f(x + delta), y)                     # picks the best restart; one here
    mask = torch.sigmoid(g(x + delta))
    x_cali = x + mask.detach() * delta
    if old_order:
        logits_nat, logits_cali = f(x), f(x_cali)
    else:
        logits_cali = f(x_cali)
        logits_nat = f(x)
    log_p_y = F.log_softmax(logits_nat, 1).gather(1, y[:, None]).squeeze(1)
    loss_f = (-log_p_y * (1 - log_p_y.exp())).mean() + cfg["beta"] * kl(logits_nat, logits_cali)
    opt_f.zero_grad()
    loss_f.backward()
    opt_f.step()
    stats = copy.deepcopy(dict(g.named_buffers()))
    mask = torch.sigmoid(g(x + delta))                          # step 4: forward again
    with torch.no_grad():
        logits_adv = f(x + delta)
    logits_cali = f(x + mask * delta)
    loss_g = kl(logits_adv, logits_cali) + cfg["beta1"] * F.cross_entropy(logits_cali, y)
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    if old_order:                 # after the backward, which checks that the saved buffers are unchanged
        for name, buf in g.named_buffers():
            buf.copy_(stats[name])
    else:
        with torch.no_grad():
            f(x)                                                 # the logged training loss
    return delta


def authors_optimizer(params, dataset):
    """MNIST: Adam 1e-3; CIFAR: SGD 0.1, momentum 0.9, weight decay 5e-4; the same for f and g_phi."""
    if dataset == "mnist":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


# ============================================================================ helpers

BATCH = {"mnist": 8, "cifar10": 4}


def setup(dataset, *flags):
    cfg = config.parse_config(["--dataset", dataset, "--steps", str(STEPS), "--paper-exact", *flags])
    torch.manual_seed(0)
    nets = train.build_nets(cfg)
    with torch.no_grad():
        # a fresh f barely depends on its input, and where P(x) ~ P(x_cali) the two KL directions
        # agree to second order: a sharper f makes a flipped KL or a swapped order show clearly
        [m for m in nets.f.modules() if isinstance(m, nn.Linear)][-1].weight.mul_(SHARPEN)
    shape = (BATCH[dataset],) + models.SHAPES[dataset]
    batches = [(torch.rand(shape), torch.randint(0, 10, shape[:1])) for _ in range(2)]
    return cfg, nets, batches


def run_ours(cfg, nets, batches, monkeypatch):
    """train_step on each batch; returns the deltas its attack made."""
    deltas, real_perturb = [], train.perturb
    monkeypatch.setattr(train, "perturb", lambda *a, **kw: deltas.append(real_perturb(*a, **kw)) or deltas[-1])
    for i, (x, y) in enumerate(batches):
        torch.manual_seed(100 + i)                         # the attack's random start
        train.train_step(nets, x, y, cfg)
    return deltas


def run_authors(cfg, f, g, batches, old_order=False):
    f, g = copy.deepcopy(f), copy.deepcopy(g)
    opt_f, opt_g = authors_optimizer(f.parameters(), cfg["dataset"]), authors_optimizer(g.parameters(), cfg["dataset"])
    deltas = []
    for i, (x, y) in enumerate(batches):
        torch.manual_seed(100 + i)
        deltas.append(authors_step(f, g, opt_f, opt_g, x, y, cfg, old_order))
    return f, g, deltas


def differences(ours, ref):
    """Names of the state_dict entries (parameters and buffers) that differ by more than RTOL
    relative to the entry's largest magnitude, with that relative difference."""
    out = {}
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        if a.is_floating_point():
            err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
        else:
            err = float(not torch.equal(a, b))
        if err > RTOL:
            out[name] = err
    return out


def worst(diff):
    """The 5 largest differences, batch counters last."""
    return sorted(diff.items(), key=lambda kv: (kv[0].endswith("num_batches_tracked"), -kv[1]))[:5]


# ============================================================================ the equivalence

@pytest.mark.parametrize("dataset", ["mnist", pytest.param("cifar10", marks=pytest.mark.slow)])
def test_train_step_is_the_authors_step(dataset, monkeypatch):
    """Same initial weights, same random start, 2 steps in fp32: the same parameters and
    batch-norm buffers in f and g_phi, to 1e-5 of each tensor's largest entry. CIFAR: the
    default PreAct-18 and ResNet-18 mask network, batch 4."""
    cfg, nets, batches = setup(dataset)
    f0, g0 = copy.deepcopy(nets.f), copy.deepcopy(nets.g)
    ours = run_ours(cfg, nets, batches, monkeypatch)
    f_ref, g_ref, ref = run_authors(cfg, f0, g0, batches)
    same_delta = [torch.allclose(a, b, atol=1e-7) for a, b in zip(ours, ref)]
    diff_f, diff_g = differences(nets.f, f_ref), differences(nets.g, g_ref)
    assert all(same_delta) and not diff_f and not diff_g, (
        f"not the authors' step: delta the same at steps {same_delta}; f differs in {worst(diff_f)}; "
        f"g_phi differs in {worst(diff_g)}")
    assert any(not torch.equal(a, b) for a, b in zip(f0.state_dict().values(), nets.f.state_dict().values()))
    if dataset != "mnist":
        # the step before it made the authors' forwards: the same parameters, other running statistics
        f_old, g_old, _ = run_authors(cfg, f0, g0, batches, old_order=True)
        for ours_net, old in ((nets.f, f_old), (nets.g, g_old)):
            names = set(differences(ours_net, old))
            assert names and all(n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in names)


def test_attack_and_mask_update_run_f_in_the_attack_bn_mode():
    """Which mode f's batch norm is in at each forward of one CAT step: the attack and the two
    frozen passes of step 4 in cfg['attack_bn'], the update of f in train mode; all restored."""
    f = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    g = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
    x, y = torch.rand(4, 3, 4, 4), torch.randint(0, 10, (4,))
    for flags, attack_mode in [([], True), (["--attack-bn", "eval"], False)]:
        cfg = config.parse_config(["--dataset", "cifar10", "--steps", "3", *flags])
        nets = train.Nets(f, g, torch.optim.SGD(f.parameters(), lr=0.01), torch.optim.SGD(g.parameters(), lr=0.01))
        modes = []
        hook = f[1].register_forward_pre_hook(lambda m, _: modes.append(m.training))
        try:
            train.train_step(nets, x, y, cfg)
        finally:
            hook.remove()
        # 3 attack forwards and f(x + delta), f(x_cali) and f(x) for Eq. 13, f(x + delta) and f(x_cali) for
        # Eq. 14, f(x) after both updates
        assert modes == [attack_mode] * 4 + [True] * 2 + [attack_mode] * 2 + [True]
        assert all(m.training for m in f.modules())


def test_attack_bn_is_refused_where_it_does_nothing(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_config(["--dataset", "mnist", "--attack-bn", "eval"])
    assert e.value.code == 2
    assert "--attack-bn does nothing here" in capsys.readouterr().err


# ============================================================================ the attacks' train mode

def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


@pytest.mark.parametrize("attack", [
    lambda m, x, y, train_mode: attacks.pgd(m, x, y, 0.1, 0.05, 4, True, train_mode=train_mode),
    lambda m, x, y, train_mode: attacks.pgd(m, x, y, 0.1, 0.05, 4, True, loss="kl", train_mode=train_mode),
    lambda m, x, y, train_mode: attacks.pgd_early_stop(m, x, y, 0.1, 0.05, 4, tau=0, train_mode=train_mode)],
    ids=["pgd", "pgd_kl", "pgd_early_stop"])
def test_attack_train_mode_updates_running_stats_and_restores_flags(attack):
    x, y = torch.rand(5, 1, 4, 4), torch.randint(0, 3, (5,))
    x[0] = 1.0
    for train_mode in (False, True):
        model = bn_net().eval()
        model[1].train()                                   # a mixed mode comes back as it was
        seen = []
        model[1].register_forward_pre_hook(lambda m, _: seen.append(m.training))
        stats = model[1].running_mean.clone()
        x_adv = attack(model, x, y, train_mode)
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
        assert seen and all(s == train_mode for s in seen)
        assert torch.equal(stats, model[1].running_mean) != train_mode
        assert model[1].training and not model.training and not model[0].training
        assert all(p.grad is None for p in model.parameters())


def test_early_stop_in_train_mode_runs_every_step():
    """Once every example is frozen, eval mode stops; train mode still runs `steps` forwards, so
    the running statistics get the same number of updates whatever the batch."""
    model = bn_net()
    x, y = torch.rand(4, 1, 4, 4), torch.randint(0, 3, (4,))
    with torch.no_grad():
        y = model.eval()(x).argmax(1).add(1) % 3                 # every example misclassified at x
    for train_mode, expected in ((False, 1), (True, 6)):
        calls = []
        hook = model.register_forward_hook(lambda *_: calls.append(1))
        attacks.pgd_early_stop(model, x, y, 0.1, 0.05, 6, tau=0, loss="cent", random_start=False, train_mode=train_mode)
        hook.remove()
        assert len(calls) == expected


# ============================================================================ the authors' other choices

def test_cifar_mask_network_reads_raw_pixels():
    g = models.build("resnet18_mask", "cifar10")
    assert not any(isinstance(m, models.Normalize) for m in g.modules())


def test_wide_resnet_init():
    """Convolutions kaiming-normal with fan_out (std sqrt(2 / (k k c_out))), linear bias 0."""
    torch.manual_seed(0)
    net = models.WideResNet(depth=10, widen=4)
    for conv in [m for m in net.modules() if isinstance(m, nn.Conv2d)]:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1 if conv.weight.numel() > 1000 else 0.5)
    assert torch.equal(net.linear.bias, torch.zeros_like(net.linear.bias))
