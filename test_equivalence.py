"""train.train_step pinned to the authors' step, and the defaults taken from the authors' code.

The authors' per-batch update of CAT, in words (both networks stay in train mode throughout,
so every forward of f or g_phi normalises with its batch's statistics and moves batch norm's
running statistics):
  1. delta: PGD on f from a uniform random start, T signed-gradient steps on the attack loss,
     each projected onto the eps-ball and the [0, 1] box; then f(x + delta) once more (the CE
     that picks the best restart; one restart).
  2. M = sigmoid(g_phi(x + delta)), g_phi reading x + delta in raw pixels.
  3. f takes one optimizer step on Eq. 13, M detached, f(x_cali) computed before f(x):
     mean CE(f(x), y) (1 - p_y(x))  +  beta KL(P(x) || P(x + M delta)).
  4. g_phi runs forward again on x + delta (same output: g_phi has not changed).
  5. g_phi takes one optimizer step on Eq. 14 through the updated f, whose parameters are not
     stepped: KL(P(x + delta) || P(x_cali)) + beta1 CE(f(x_cali), y), f(x + delta) a fixed
     target, computed first.
  6. f(x) once more (the logged training loss).
The order of f's and g_phi's forwards decides their running statistics.
`authors_step` writes this out in plain torch, using nothing of attacks.py, cat.py or train.py.
Deliberate differences, each a row of the README's "Where the paper leaves room", are left
out of the reference: the start radius is --start (eps by default; the authors' MNIST code
uses 0.1), adversarial examples are clipped to the box (the authors' MNIST code does not),
and x_cali is clipped to [0, 1] (a no-op in exact arithmetic, so the reference does not).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import config
import models
import train

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
        attacks.pgd_early_stop(model, x, y, 0.1, 0.05, 6, tau=0, loss="ce", random_start=False, train_mode=train_mode)
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
