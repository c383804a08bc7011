"""The losses of Calibrated Adversarial Training (Huang et al., ACML 2021), as pure functions.

Tensors in, a scalar (or a tensor) out: no model, optimizer or device lives here, so this
file can be copied alone into another project. It imports torch and nothing else.

Notation follows the paper (Sec. 4.4):
    x        natural images in [0, 1], shape (N, C, H, W)
    y        labels, shape (N,)
    delta    adversarial perturbation, |delta| <= eps, x + delta in [0, 1]   (Eq. 9)
    mask     soft mask M = g_phi(...) in (0, 1), shape of x                  (Eq. 10-11)
    x_cali   calibrated adversarial example x + M * delta                   (Eq. 10)
    beta     weight of the robust KL term for the classifier f              (Eq. 13)
    beta1    weight of the cross-entropy term for the mask network g_phi    (Eq. 14)

Direction of the KL terms. The paper writes KL(P(.|x_cali) || P(.|x)) in Eq. 13 and
KL(P(.|x_cali) || P(.|x')) in Eq. 14. The authors' code, like TRADES, computes the other
direction: KL(P(.|x) || P(.|x_cali)) and KL(P(.|x') || P(.|x_cali)), i.e. the clean (or
uncalibrated) prediction is the reference distribution. The published numbers come from
that code, so `kl_div` is called in the code's direction below, and `kl_div` itself takes
its two arguments in the mathematical order KL(P || Q) so a reader can flip it in one place.
The KL is summed over classes and averaged over the batch (TRADES' "batchmean").
"""
import torch
import torch.nn.functional as F


def kl_per_example(logits_p, logits_q):
    """KL(P || Q) = sum_k P_k (log P_k - log Q_k) per example, P = softmax(logits_p), Q = softmax(logits_q).

    Shape (N,). Gradients flow into both arguments; detach one at the call site if it is meant to be
    a fixed target.
    """
    log_p = F.log_softmax(logits_p.float(), dim=1)
    log_q = F.log_softmax(logits_q.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def kl_div(logits_p, logits_q):
    """KL(P || Q) summed over classes and averaged over the batch (TRADES' "batchmean")."""
    return kl_per_example(logits_p, logits_q).mean()


def wrong_classes(t, y):
    """Logits or probabilities t of shape (N, K) with each example's true class y set to -inf."""
    return t.masked_fill(F.one_hot(y, t.shape[1]).bool(), float("-inf"))


def max_other(t, y):
    """max_{j != y} t_j per example: the strongest wrong class."""
    return wrong_classes(t, y).amax(1)


def weighted_ce(logits, y):
    """Eq. 8: CE(f(x), y) * (1 - P(y|x)), averaged over the batch.

    The weight (1 - p_y) is part of the loss, not a constant: its gradient is kept, as in
    Eq. 8 read as a function of theta. Well-classified examples (p_y -> 1) contribute little,
    so the natural term concentrates on the misclassified ones.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    log_p_y = log_p.gather(1, y[:, None]).squeeze(1)      # (N,)
    return (-log_p_y * (1.0 - log_p_y.exp())).mean()


def mask_of(z):
    """Eq. 11's sigmoid: M = sigmoid(z) from g_phi's logits z, always in fp32.

    Under bf16 autocast a bf16 sigmoid rounds to exactly 1.0 for z above ~6 and its gradient
    is then 0, so a mask near 1 could never move again; in fp32 it keeps a gradient."""
    with torch.autocast(z.device.type, enabled=False):
        return torch.sigmoid(z.float())


def logit_wall(z, bound=5.0):
    """A soft wall on the mask logits: mean(relu(|z| - bound)^2), 0 while |z| <= bound.

    Not in the paper; added to Eq. 14 by default (see train.py's `mask_step`). Eq. 14 pulls
    M towards 0 in the first steps, while f is weak and delta raises the CE; without a wall
    z runs to about -15, where sigmoid'(z) ~ 3e-7 and g_phi cannot come back when Eq. 14's
    gradient turns (the mask collapse). Inside the wall (M in [0.0067, 0.9933] for bound 5)
    Eq. 14 is untouched."""
    return (z.float().abs() - bound).clamp(min=0.0).pow(2).mean()


def calibrate(x, delta, mask):
    """Eq. 10: x_cali = x + M * delta, clipped to the [0, 1] box.

    Since x and x + delta both lie in [0, 1] and M in (0, 1), x_cali lies on the segment
    between them, so in exact arithmetic the clip changes nothing; it guards against
    rounding. It can still cut the gradient to the mask: clamp's gradient is 0 where its
    input equals a bound exactly, and fp32 rounding lands x + M * delta on 0 or 1 (e.g.
    x = 0.99, delta = 0.01, M = 0.9999999 gives exactly 1.0; so does any M once x + delta
    = 1 and M rounds to 1), so such pixels send g_phi no gradient.
    |x_cali - x| <= |delta| <= eps elementwise.
    """
    return (x + mask * delta).clamp(0.0, 1.0)


def classifier_loss(logits_nat, logits_cali, y, beta, weighted=True):
    """Eq. 13, the objective of the classifier f (mask fixed):

        CE(f(x), y) * (1 - P(y|x))  +  beta * KL(P(.|x) || P(.|x_cali))

    with the KL in the code's (TRADES') direction, see the module docstring.
    `weighted=False` drops the (1 - p_y) factor (ablation A1 of the paper).
    Returns (loss, natural_term, robust_term); the last two are detached, for logging.
    """
    nat = weighted_ce(logits_nat, y) if weighted else F.cross_entropy(logits_nat.float(), y)
    rob = kl_div(logits_nat, logits_cali)
    return nat + beta * rob, nat.detach(), rob.detach()


def mask_loss(logits_adv, logits_cali, y, beta1):
    """Eq. 14, the objective of the mask network g_phi (classifier f fixed):

        KL(P(.|x') || P(.|x_cali))  +  beta1 * CE(f(x_cali), y),    x' = x + delta

    The KL keeps x_cali close to the adversarial example in the classifier's eyes
    (constraint 1 of Sec. 4.4); the CE pushes x_cali towards the true class (constraint 2).
    `logits_adv` is a fixed target (computed without gradient).
    Returns (loss, kl_term, ce_term); the last two are detached, for logging.
    """
    kl = kl_div(logits_adv.detach(), logits_cali)
    ce = F.cross_entropy(logits_cali.float(), y)
    return kl + beta1 * ce, kl.detach(), ce.detach()


# ----------------------------------------------------------------------------- baselines
# The methods the paper compares against (its Appendix H), in the same shape as
# classifier_loss: logits in, (loss, natural_term, robust_term) out. Each differs from CAT
# only here and in its perturbation; train.py shares everything else.

def at_loss(logits_nat, logits_adv, y, beta=None):
    """Standard adversarial training (Madry et al. 2018): CE(f(x'), y). Needs no f(x)."""
    ce = F.cross_entropy(logits_adv.float(), y)
    return ce, torch.zeros_like(ce), ce.detach()


def trades_loss(logits_nat, logits_adv, y, beta):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(P(.|x) || P(.|x')). Also FAT's outer loss."""
    nat = F.cross_entropy(logits_nat.float(), y)
    rob = kl_div(logits_nat, logits_adv)
    return nat + beta * rob, nat.detach(), rob.detach()


def mart_loss(logits_nat, logits_adv, y, beta):
    """MART (Wang et al. 2020): BCE(f(x'), y) + beta * KL(P(.|x) || P(.|x')) * (1 - P(y|x)).

    BCE(p', y) = -log p'_y - log(1 - max_{k != y} p'_k), the "boosted" CE on the adversarial
    example; the KL is weighted per example by how badly x itself is classified.
    """
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    wrong = max_other(log_p_adv.exp(), y)                                             # max_{k != y} p'_k
    bce = F.nll_loss(log_p_adv, y) - torch.log1p(-wrong.clamp(max=1 - 1e-6)).mean()
    p_y = F.softmax(logits_nat.float(), dim=1).gather(1, y[:, None]).squeeze(1)      # P(y|x), (N,)
    rob = (kl_per_example(logits_nat, logits_adv) * (1.0 - p_y)).mean()
    return bce + beta * rob, bce.detach(), rob.detach()
