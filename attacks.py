"""L-inf attacks in [0, 1] pixel space: FGSM, PGD (CE, CW-inf margin or KL loss), CW-inf,
FAT's early-stopped PGD and multi-targeted PGD.

Every attack has the shape `attack(model, x, y, eps, ...) -> x_adv` and guarantees
    |x_adv - x| <= eps  and  0 <= x_adv <= 1  elementwise,
whatever the model does. Normalisation belongs inside the model, so eps means pixels.

The model is run in eval mode during the attack (batch norm uses its running statistics
and does not update them; dropout is off), as TRADES' and MART's reference code do and as
every evaluation should. `pgd` and `pgd_early_stop` take `train_mode=True` to run it in
train mode instead, as the CAT authors' and Madry et al.'s training code do: batch norm
then normalises with each forward's batch statistics and updates its running statistics
at every forward of the attack. Either way every submodule's train/eval flag is restored
on return. Gradients are taken with respect to the input only, so no parameter's .grad
is touched. Autocast, if the caller enabled it, applies to the model's
forward passes; the perturbation itself is kept in x's dtype.

This file imports torch and cat.py (the KL and the margin are written once, there): copy the two
together into another project.
"""
import contextlib

import torch
import torch.nn.functional as F

import cat


@contextlib.contextmanager
def set_mode(model, train_mode):
    """Put `model` in train (True) or eval (False) mode; restore each submodule's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train_mode)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def eval_mode(model):
    """Put `model` in eval mode and restore each submodule's own flag afterwards."""
    return set_mode(model, False)


@contextlib.contextmanager
def frozen(model):
    """The parameters of `model` do not require grad inside, restored afterwards: wrap an attack (which
    needs input gradients only) or a frozen forward in it, so that no weight gradient is computed."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def project(x_adv, x, eps):
    """Project onto the intersection of the eps-ball around x and the [0, 1] box."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def margin(logits, y):
    """z_y - max_{j != y} z_j per example, in fp32: negative exactly when x is misclassified."""
    logits = logits.float()
    return logits.gather(1, y[:, None]).squeeze(1) - cat.max_other(logits, y)


def cw_margin(logits, y, kappa):
    """Per-example CW-inf loss to maximise: -max(z_y - max_{j != y} z_j + kappa, 0).

    It grows until some wrong class beats the true class by kappa, then stays at 0.
    """
    return -(margin(logits, y) + kappa).clamp(min=0.0)


def loss_fn(y, loss="cent", kappa=50.0, logits_nat=None):
    """The per-example loss an attack ascends, as a function of the logits at x_adv: "cent" (cross-entropy), "cw" (CW-inf
    margin with confidence kappa) or "kl" (TRADES' inner loss KL(P(.|x) || P(.|x_adv)), from logits_nat)."""
    if loss == "cent":
        return lambda logits: F.cross_entropy(logits.float(), y, reduction="none")
    if loss == "cw":
        return lambda logits: cw_margin(logits, y, kappa)
    if loss == "kl":
        return lambda logits: cat.kl_per_example(logits_nat, logits)
    raise ValueError(f"unknown attack loss {loss!r}: use 'cent', 'cw' or 'kl'")


def natural_logits(model, x, loss):
    """f(x), the fixed reference of the "kl" loss (None for the other losses)."""
    if loss != "kl":
        return None
    with torch.no_grad():
        return model(x).float()


def grad_and_logits(model, x_adv, per_example):
    """(gradient of sum(per_example(model(x_adv))) w.r.t. x_adv, not the parameters; logits at x_adv)."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        (grad,) = torch.autograd.grad(per_example(logits).sum(), x_adv)
    return grad, logits.detach()


def random_init(x, eps, random_start):
    """x itself (random_start False), or x + U(-r, r) projected: r = eps for True, else the number."""
    if random_start is False or random_start is None:
        return x.detach()
    r = eps if random_start is True else float(random_start)
    return project(x + torch.empty_like(x).uniform_(-r, r), x, eps)


def fgsm(model, x, y, eps):
    """FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps on the CE loss."""
    with eval_mode(model):
        grad, _ = grad_and_logits(model, x, loss_fn(y))
        return project(x + eps * grad.sign(), x, eps).detach()


def pgd(model, x, y, eps, alpha, steps, random_start=False, loss="cent", kappa=50.0, train_mode=False):
    """L-inf PGD (Madry et al. 2018): `steps` signed-gradient steps of size `alpha`.

    loss: "cent" cross-entropy, "cw" CW-inf margin with confidence `kappa`, or "kl"
    (KL from the natural prediction, TRADES' inner maximisation; `y` is then unused).
    random_start: start from x + U(-r, r), projected, instead of x; r = eps for True, or the
    number given (the authors' MNIST code starts from r = 0.1).
    train_mode: run the model in train mode (batch statistics; batch norm's running
    statistics are updated by each of the `steps` forwards, and by the natural forward of
    "kl"), as training code that attacks in train mode does. Default: eval mode.
    """
    with set_mode(model, train_mode):
        per_example = loss_fn(y, loss, kappa, natural_logits(model, x, loss))
        x_adv = random_init(x, eps, random_start)
        for _ in range(steps):
            grad, _ = grad_and_logits(model, x_adv, per_example)
            x_adv = project(x_adv + alpha * grad.sign(), x, eps)
        return x_adv.detach()


def cw_inf(model, x, y, eps, alpha, steps=30, kappa=50.0, random_start=True):
    """CW-inf attack as used by FAT/TRADES evaluations: PGD on the CW margin loss."""
    return pgd(model, x, y, eps, alpha, steps, random_start=random_start, loss="cw", kappa=kappa)


def pgd_early_stop(model, x, y, eps, alpha, steps, tau, loss="kl", kappa=50.0, random_start=True,
                   train_mode=False):
    """Early-stopped PGD of FAT (Zhang et al. 2020, "friendly" adversarial data).

    Like `pgd`, but an example stops moving once it has been misclassified and `tau` further
    steps have been taken on it: the step at which f(x_adv) != y for the (tau+1)-th time
    freezes it. tau = 0 stops at the first misclassified iterate.
    In eval mode the loop ends once every example is frozen. With `train_mode` it always runs
    `steps` forwards, so batch norm's running statistics get the same number of updates
    whatever the batch, and processes that synchronise batch norm stay in step.
    """
    with set_mode(model, train_mode):
        per_example = loss_fn(y, loss, kappa, natural_logits(model, x, loss))
        x_adv = random_init(x, eps, random_start)
        budget = torch.full_like(y, tau)                  # steps still allowed after misclassification
        active = torch.ones_like(y, dtype=torch.bool)
        for _ in range(steps):
            grad, logits = grad_and_logits(model, x_adv, per_example)
            wrong = logits.argmax(1) != y
            active &= ~(wrong & (budget == 0))
            budget -= (wrong & active).long()
            if not active.any() and not train_mode:
                break
            step = alpha * grad.sign() * active.view(-1, *[1] * (x.dim() - 1))
            x_adv = project(x_adv + step, x, eps)
        return x_adv.detach()


def _keep_stronger(best, x_adv, logits, y):
    """Per example, keep x_adv where its true-class margin z_y - max_{j != y} z_j is lower than
    the best so far. A margin < 0 means misclassified, so a success always beats a failure.
    best: (x (N, ...), margin (N,)); returns the updated pair."""
    m = margin(logits, y)
    better = m < best[1]
    x_best = torch.where(better.view(-1, *[1] * (x_adv.dim() - 1)), x_adv, best[0])
    return x_best, torch.where(better, m, best[1])


def mtpgd(model, x, y, eps, alpha, steps, num_targets=None, random_start=False):
    """Multi-targeted PGD (Gowal et al. 2019): `steps` signed-gradient steps of size `alpha`
    ascending the margin z_t - z_y, run once towards each wrong class t in turn.

    Targets: the `num_targets` wrong classes with the highest clean logits (all of them when
    None: 9 for 10 classes). Cost: num_targets * (steps + 1) forward, num_targets * steps
    backward passes. Per example the strongest iterate over all targets and steps is returned
    (see _keep_stronger): misclassified if any target succeeded, else the one closest to it.
    x itself is the first candidate, so the result is never weaker than no attack.
    random_start: each target's run starts from x + U(-eps, eps) (clipped to the box).
    """
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x).float()
        n_wrong = logits.shape[1] - 1
        k = n_wrong if num_targets is None else max(1, min(num_targets, n_wrong))
        targets = cat.wrong_classes(logits, y).topk(k, 1).indices
        best = _keep_stronger((x.detach(), torch.full_like(y, float("inf"), dtype=logits.dtype)), x, logits, y)
        towards = lambda t: lambda z: (z.float().gather(1, t[:, None]) - z.float().gather(1, y[:, None])).squeeze(1)
        for t in targets.unbind(1):                      # t: (N,), one target class per example; ascend z_t - z_y
            x_adv = project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps) if random_start else x.detach()
            for _ in range(steps):
                grad, logits = grad_and_logits(model, x_adv, towards(t))
                best = _keep_stronger(best, x_adv, logits, y)
                x_adv = project(x_adv + alpha * grad.sign(), x, eps)
            with torch.no_grad():
                best = _keep_stronger(best, x_adv, model(x_adv).float(), y)
        return best[0].detach()
