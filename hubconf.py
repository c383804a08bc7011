"""torch.hub entry points: the MNIST models under results/, one entry each.

    f = torch.hub.load("path/to/this/repo", "mnist_trades_03", source="local")     # classifier, eval mode
    f, g = torch.hub.load("path/to/this/repo", "mnist_cat_cw_03", source="local", mask=True)   # and g_phi

Each entry returns the classifier f (images (N, 1, 28, 28) in [0, 1] -> logits (N, 10)) in eval mode,
or with mask=True the pair (f, g_phi); g_phi returns the mask's logits z, M = cat.mask_of(z). Only the
CAT entries have a mask network. device is torch.load's map_location and where the models end up.
source="local" runs no download and needs no trust_repo. Weights load through checkpoints.py, with
weights_only=True. Adding a model is one line of MODELS; every entry there is tested in tests/test_hub.py.
"""
import os

import checkpoints

dependencies = ["torch", "torchvision"]

HERE = os.path.dirname(os.path.abspath(__file__))

# entry name -> (best.pt relative to this file, what it is; seed 0 throughout). The CAT entries
# with plain names were trained under today's default (logit wall on); `_paper` marks the paper's
# algorithm (`--paper-exact`). Left out on purpose: the collapsed paper-exact CAT_cent runs under
# results/mnist_cat_cent_0.3 and _0.4 (mask 0, 0% PGD-20) and AT(0.4) (failed to train, 11% natural).
# Numbers: README's Results, RESULTS.md.
MODELS = {
    "mnist_at_03": ("results/mnist_at_0.3/best.pt", "AT(0.3), 10 epochs: the README's Results table"),
    "mnist_trades_03": ("results/mnist_trades_0.3/best.pt", "TRADES(0.3), 10 epochs: the README's Results table"),
    "mnist_cat_cent_03": ("results/table1/cat_cent_0.3/best.pt",
                          "CAT_cent(0.3) under today's default, 10 epochs (best.pt from epoch 9): the README's "
                          "Results table"),
    "mnist_cat_cw_03": ("results/table1/cat_cw_0.3/best.pt",
                        "CAT_cw(0.3) under today's default, 10 epochs: the README's Results table"),
    "mnist_cat_cent_04": ("results/table1/cat_cent_0.4/best.pt",
                          "CAT_cent(0.4) under today's default, trained at eps 0.4, 10 epochs (best.pt from "
                          "epoch 9): the README's Results table"),
    "mnist_cat_cw_04": ("results/table1/cat_cw_0.4/best.pt",
                        "CAT_cw(0.4) under today's default, trained at eps 0.4, 10 epochs: the README's Results "
                        "table"),
    "mnist_trades_04": ("results/table1/trades_0.4/best.pt",
                        "TRADES(0.4), beta 1, trained at eps 0.4, 10 epochs: the README's Results table"),
    "mnist_cat_cw_03_paper": ("results/mnist_cat_cw_0.3/best.pt",
                              "CAT_cw(0.3) as the paper writes it (--paper-exact), 10 epochs (best.pt from "
                              "epoch 9): RESULTS.md, MNIST 10 epochs"),
}


def _load(name, mask=False, device="cpu"):
    path, about = MODELS[name]
    full = os.path.join(HERE, path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{name}: {path} is not in this checkout; it is {about}")
    ckpt = checkpoints.load_checkpoint(full, device)
    f, g = checkpoints.from_checkpoint(ckpt, device)
    if not mask:
        return f
    if g is None:
        raise ValueError(f"{name} is {ckpt['config'].get('method', '?').upper()}, which has no mask network; "
                         "only CAT entries do: drop mask=True")
    return f, g


def _entry(name):
    def entry(mask=False, device="cpu"):
        return _load(name, mask, device)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{MODELS[name][1]}.\n\nReturns the classifier in eval mode; with mask=True the pair "
                     "(classifier, mask network), CAT only. device: torch.load's map_location.")
    return entry


for _name in MODELS:
    globals()[_name] = _entry(_name)
