"""L-inf attacks in [0, 1] pixel space: FGSM, PGD (CE, CW-inf margin or KL loss), CW-inf.

Every attack has the shape `attack(model, x, y, eps, ...) -> x_adv` and guarantees
    |x_adv - x| <= eps  and  0 <= x_adv <= 1  elementwise,
whatever the model does. Normalisation belongs inside the model, so eps means pixels.

The model is run in eval mode during the attack (batch-norm statistics are used, not
updated, as in the TRADES/MART/CAT reference code) and every submodule's train/eval flag
is restored on return. Gradients are taken with respect to the input only, so no
parameter's .grad is touched. Autocast, if the caller enabled it, applies to the model's
forward passes; the perturbation itself is kept in x's dtype.

This file imports torch and nothing else, so it can be copied alone into another project.
"""
import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def eval_mode(model):
    """Put `model` in eval mode and restore each submodule's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def project(x_adv, x, eps):
    """Project onto the intersection of the eps-ball around x and the [0, 1] box."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def cw_margin(logits, y, kappa):
    """Per-example CW-inf loss to maximise: -max(z_y - max_{j != y} z_j + kappa, 0).

    It grows until some wrong class beats the true class by kappa, then stays at 0.
    """
    logits = logits.float()
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -(z_y - z_other + kappa).clamp(min=0.0)


def _loss_per_example(logits, y, loss, kappa, log_p_nat):
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, reduction="none")
    if loss == "cw":
        return cw_margin(logits, y, kappa)
    if loss == "kl":   # TRADES' inner loss: KL(P(.|x) || P(.|x_adv)), needs no label
        log_q = F.log_softmax(logits.float(), dim=1)
        return (log_p_nat.exp() * (log_p_nat - log_q)).sum(1)
    raise ValueError(f"unknown attack loss {loss!r}: use 'ce', 'cw' or 'kl'")


def input_grad(model, x_adv, y, loss="ce", kappa=50.0, log_p_nat=None):
    """Gradient of the summed per-example loss with respect to x_adv (not the parameters)."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        value = _loss_per_example(model(x_adv), y, loss, kappa, log_p_nat).sum()
        (grad,) = torch.autograd.grad(value, x_adv)
    return grad


def fgsm(model, x, y, eps):
    """FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps on the CE loss."""
    with eval_mode(model):
        grad = input_grad(model, x, y)
        return project(x + eps * grad.sign(), x, eps).detach()


def pgd(model, x, y, eps, alpha, steps, random_start=False, loss="ce", kappa=50.0):
    """L-inf PGD (Madry et al. 2018): `steps` signed-gradient steps of size `alpha`.

    loss: "ce" cross-entropy, "cw" CW-inf margin with confidence `kappa`, or "kl"
    (KL from the natural prediction, TRADES' inner maximisation; `y` is then unused).
    random_start: start from x + U(-eps, eps) (clipped to the box) instead of x.
    """
    with eval_mode(model):
        log_p_nat = None
        if loss == "kl":
            with torch.no_grad():
                log_p_nat = F.log_softmax(model(x).float(), dim=1)
        x_adv = x.detach()
        if random_start:
            x_adv = project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
        for _ in range(steps):
            grad = input_grad(model, x_adv, y, loss, kappa, log_p_nat)
            x_adv = project(x_adv + alpha * grad.sign(), x, eps)
        return x_adv.detach()


def cw_inf(model, x, y, eps, alpha, steps=30, kappa=50.0, random_start=True):
    """CW-inf attack as used by FAT/TRADES evaluations: PGD on the CW margin loss."""
    return pgd(model, x, y, eps, alpha, steps, random_start=random_start, loss="cw", kappa=kappa)


def pgd_early_stop(model, x, y, eps, alpha, steps, tau, loss="kl", kappa=50.0, random_start=True):
    """Early-stopped PGD of FAT (Zhang et al. 2020, "friendly" adversarial data).

    Like `pgd`, but an example stops moving once it has been misclassified and `tau` further
    steps have been taken on it: the step at which f(x_adv) != y for the (tau+1)-th time
    freezes it. tau = 0 stops at the first misclassified iterate.
    """
    with eval_mode(model):
        log_p_nat = None
        if loss == "kl":
            with torch.no_grad():
                log_p_nat = F.log_softmax(model(x).float(), dim=1)
        x_adv = project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps) if random_start else x.detach()
        budget = torch.full_like(y, tau)                  # steps still allowed after misclassification
        active = torch.ones_like(y, dtype=torch.bool)
        for _ in range(steps):
            x_in = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(x_in)
                value = _loss_per_example(logits, y, loss, kappa, log_p_nat).sum()
                (grad,) = torch.autograd.grad(value, x_in)
            wrong = logits.argmax(1) != y
            active &= ~(wrong & (budget == 0))
            budget -= (wrong & active).long()
            if not active.any():
                break
            step = alpha * grad.sign() * active.view(-1, *[1] * (x.dim() - 1))
            x_adv = project(x_adv + step, x, eps)
        return x_adv.detach()
