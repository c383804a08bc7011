"""The specification of evaluate.py and attacks.mtpgd, as tests. Run: python -m pytest -q test_eval.py"""
import argparse
import json
import os
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import attacks
import data
import evaluate
import models
from conftest import run_cli, tiny_cnn

torch.set_num_threads(min(2, torch.get_num_threads()))


def mnist_settings(**over):
    """evaluate's MNIST settings, one run per attack, 100 Square queries, with `over` applied."""
    s = evaluate.settings_for("mnist", argparse.Namespace(restarts=1, queries=100, seed=0))
    return {**s, **over}


def first_images(split, n):
    return next(data.batches(split.take(torch.arange(n)), n))


class Quantize(nn.Module):
    """Rounds pixels to 5 levels: the input gradient is exactly zero everywhere (gradient masking)."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class AlwaysDropout(nn.Module):
    """Dropout that ignores eval mode: a randomised model whose predictions are not reproducible."""

    def forward(self, x):
        return nn.functional.dropout(x, 0.5, training=True)


def assert_in_threat_model(x_adv, x, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def mixed_mode_model():
    """test_cat's tiny CNN on 8x8 images, in train mode except its batch norm."""
    model = tiny_cnn()
    model(torch.zeros(1, 1, 8, 8))
    model.train()
    model[1].eval()
    return model


def assert_mode_restored(model):
    assert model.training and not model[1].training and model[3].training
    assert all(p.grad is None for p in model.parameters())


# ============================================================================ mtpgd (attacks.py)

@pytest.mark.parametrize("num_targets,random_start", [(None, False), (2, True)])
def test_mtpgd_stays_in_the_threat_model(num_targets, random_start):
    model = mixed_mode_model()
    x = torch.rand(6, 1, 8, 8)
    x[0], x[1] = 0.0, 1.0                              # images on the box edges
    y = torch.randint(0, 10, (6,))
    x_adv = attacks.mtpgd(model, x, y, 0.1, 0.025, 5, num_targets, random_start)
    assert_in_threat_model(x_adv, x, 0.1)
    assert (x_adv != x).any()
    assert_mode_restored(model)
    with torch.no_grad(), attacks.eval_mode(model):   # x is the first candidate: never weaker than no attack
        wrong_before, wrong_after = model(x).argmax(1) != y, model(x_adv).argmax(1) != y
    assert (wrong_after >= wrong_before).all()


def test_mtpgd_at_least_as_strong_as_pgd(natural_model, mnist_small):
    x, y = first_images(mnist_small[1], 200)
    eps, alpha, steps = 0.1, 0.01, 10

    def acc(x_adv):
        with torch.no_grad():
            return (natural_model(x_adv).argmax(1) == y).float().mean().item()

    pgd = acc(attacks.pgd(natural_model, x, y, eps, alpha, steps))
    mt = acc(attacks.mtpgd(natural_model, x, y, eps, alpha, steps))
    assert mt <= pgd and mt < acc(x) - 0.3


# ============================================================================ pyautoattack through evaluate.run_attack

def test_square_stays_in_the_threat_model():
    model = mixed_mode_model()
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    x[0] = 1.0
    s = mnist_settings(eps=0.1)
    x_adv = evaluate.run_attack("square", model, x, y, s)
    assert_in_threat_model(x_adv, x, 0.1)
    assert (x_adv != x).any()
    assert_mode_restored(model)


def test_autoattack_stays_in_the_threat_model_and_breaks_a_natural_model(natural_model, mnist_small):
    x, y = first_images(mnist_small[1], 20)
    x_adv = evaluate.run_attack("autoattack", natural_model, x, y, mnist_settings())
    assert_in_threat_model(x_adv, x, 0.3)
    with torch.no_grad():
        assert (natural_model(x_adv).argmax(1) == y).sum() == 0


def test_threat_model_check_refuses_an_escaped_point():
    x = torch.full((2, 1, 4, 4), 0.5)
    evaluate.in_threat_model(x + 0.1, x, 0.1, "ok")           # exactly on the ball's edge: accepted
    for bad in (x + 0.11, x * 3, x + float("nan")):
        with pytest.raises(RuntimeError, match="threat model|NaN"):
            evaluate.in_threat_model(bad, x, 0.1, "broken")


# ============================================================================ worst and restarts

@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=2, max_size=5))
def test_worst_is_the_per_example_and_natural_included(rows):
    names = ["natural", "fgsm", "pgd20", "cw", "square"][:len(rows)]
    correct = {n: torch.tensor(r) for n, r in zip(names, rows)}
    shown = names[1:] if len(names) > 2 else names       # natural counts even when not a column
    worst = evaluate.worst_correct(correct, shown)
    assert torch.equal(worst, torch.stack(list(correct.values())).all(0))
    acc = evaluate.accuracies(correct, shown)
    assert all(acc["worst"] <= acc[n] for n in shown)


def test_worst_never_exceeds_any_attack(natural_model, mnist_small):
    names = ["natural", "fgsm", "pgd20", "mtpgd"]
    s = mnist_settings(eps=0.05, alpha=0.01, mt_steps=5)
    correct, _ = evaluate.evaluate_split(natural_model, mnist_small[1].take(torch.arange(100)), names, s, 50)
    worst, acc = evaluate.worst_correct(correct, names), evaluate.accuracies(correct, names)
    for n in names:
        assert (worst <= correct[n]).all() and acc["worst"] <= acc[n]
    assert acc["worst"] < acc["natural"]


class FirstPixel(nn.Module):
    """Two classes: class 0 iff pixel 0 is bright. Pixel 1 carries the example's id."""

    def forward(self, x):
        p = x.flatten(1)[:, 0]
        return torch.stack([p, 1 - p], 1)


def test_restarts_keep_the_worst_run(monkeypatch):
    breaks = [{0, 1}, {2}, {1, 4}]                     # examples that run 0, 1, 2 would break
    calls = []

    def fake_attack(name, f, x, y, s, random_start=False):
        calls.append((random_start, len(x)))
        x_adv = x.clone()
        for i, ident in enumerate((x[:, 0, 0, 1] * 10).round().long().tolist()):
            if ident in breaks[len(calls) - 1]:
                x_adv[i, 0, 0, 0] = 0.0
        return x_adv

    monkeypatch.setattr(evaluate, "run_attack", fake_attack)
    x = torch.ones(6, 1, 1, 2)
    x[:, 0, 0, 1] = torch.arange(6) / 10
    y = torch.zeros(6, dtype=torch.long)
    correct = evaluate.attack_correct("pgd20", FirstPixel(), x, y, {"restarts": 3, "eps": 1.0})
    assert correct.tolist() == [False, False, False, True, False, True]
    assert calls == [(False, 6), (True, 4), (True, 3)]       # paper's run first, then random starts on survivors


def test_restarts_never_raise_accuracy(natural_model, mnist_small):
    x, y = first_images(mnist_small[1], 100)
    once = evaluate.attack_correct("pgd20", natural_model, x, y, mnist_settings(eps=0.03, alpha=0.005))
    torch.manual_seed(0)
    thrice = evaluate.attack_correct("pgd20", natural_model, x, y, mnist_settings(eps=0.03, alpha=0.005, restarts=3))
    assert (thrice <= once).all() and once.any()


# ============================================================================ sanity flags

SANITY_NAMES = ["natural", "fgsm", "pgd20", "square", "eps0", "large_eps"]


def flags_of(model, split, names=SANITY_NAMES):
    s = mnist_settings()
    correct, _ = evaluate.evaluate_split(model, split, names, s, 500)
    return evaluate.all_flags(correct, s)


def test_flags_silent_on_a_normal_model(natural_model, mnist_small):
    assert flags_of(natural_model, mnist_small[1].take(torch.arange(50))) == []


def test_flags_fire_on_a_gradient_masked_model(natural_model, mnist_small):
    masked = nn.Sequential(Quantize(), natural_model).eval()
    flags = flags_of(masked, mnist_small[1].take(torch.arange(50)))
    assert any("PGD-20" in f and "above Square" in f and "gradient masking" in f for f in flags)
    assert any("PGD-100 at eps 0.5" in f for f in flags)


def test_eps0_flag_fires_on_a_randomised_model(natural_model, mnist_small):
    noisy = nn.Sequential(AlwaysDropout(), natural_model).eval()
    torch.manual_seed(0)
    flags = flags_of(noisy, mnist_small[1].take(torch.arange(50)), ["natural", "eps0"])
    assert len(flags) == 1 and "eps 0" in flags[0] and "not deterministic" in flags[0]


def test_order_flag_needs_more_than_noise():
    def flags(b, c, n=100):               # b: survive pgd100 only; c: survive pgd20 only
        strong, weak = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        strong[:b], weak[b:b + c] = True, True
        return evaluate.order_flags({"pgd100": strong, "pgd20": weak})

    assert flags(9, 0) == []                                    # 9 <= 3 * 3
    assert len(flags(10, 0)) == 1 and "PGD-100 10.00% above PGD-20 0.00%" in flags(10, 0)[0]   # 10 > 3 sqrt(10)
    assert flags(30, 20) == []                                  # 10 <= 3 * sqrt(50)
    assert evaluate.order_flags({"pgd20": torch.ones(50, dtype=torch.bool),   # the expected direction
                                 "pgd100": torch.zeros(50, dtype=torch.bool)}) == []


# ============================================================================ the command line

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CAT checkpoint from a one-epoch train.py run on 200 MNIST images."""
    out = str(tmp_path_factory.mktemp("cat") / "run")
    run_cli("train.py", "--dataset", "mnist", "--subset", "200", "--epochs", "1", "--steps", "2",
            "--val-size", "50", "--out", out, "--device", "cpu")
    return out


def test_cli_end_to_end(trained, tmp_path):
    result, png = str(tmp_path / "eval.json"), str(tmp_path / "masks.png")
    proc = run_cli("evaluate.py", os.path.join(trained, "best.pt"), "--attacks", "natural,fgsm,pgd20",
                   "--restarts", "2", "--subset", "50", "--json", result, "--save-masks", png, "--device", "cpu")
    numbers = json.load(open(result))
    assert {"natural", "fgsm", "pgd20", "avg", "worst", "flags", "seed", "seconds", "wall_seconds"} <= set(numbers)
    assert numbers["n_test"] == 50 and numbers["seed"] == 0
    assert {"eps", "alpha", "kappa", "restarts", "queries"} <= set(numbers["settings"])
    assert numbers["settings"]["restarts"] == 2
    assert numbers["worst"] <= min(numbers[a] for a in ("natural", "fgsm", "pgd20"))
    assert numbers["avg"] == pytest.approx((numbers["natural"] + numbers["fgsm"] + numbers["pgd20"]) / 3, abs=0.01)
    assert {"mean", "mean_bright", "mean_dark"} <= set(numbers["masks"]) and 0 <= numbers["masks"]["mean"] <= 1
    assert os.path.getsize(png) > 100 and open(png, "rb").read(4) == b"\x89PNG"
    assert "PGD-20" in proc.stdout and "Avg" in proc.stdout and "Worst" in proc.stdout


def test_cli_two_models_one_table(trained, tmp_path):
    result = str(tmp_path / "eval.json")
    proc = run_cli("evaluate.py", os.path.join(trained, "best.pt"), os.path.join(trained, "last.pt"),
                   "--attacks", "natural,fgsm", "--subset", "20", "--json", result, "--device", "cpu")
    numbers = json.load(open(result))
    assert [m["checkpoint"][-7:] for m in numbers["models"]] == ["best.pt", "last.pt"]
    assert all(m["n_test"] == 20 and "worst" in m for m in numbers["models"])
    assert "run/best.pt" in proc.stdout and "run/last.pt" in proc.stdout


def cifar_checkpoint(path):
    f = models.build("preact18", "cifar10")
    torch.save({"model": f.state_dict(), "mask": None, "config": {"dataset": "cifar10", "arch": "preact18"},
                "epoch": 1}, path)


class Payload:
    """Unpickling this would create the file `marker`: a checkpoint must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_input(case, ckpt, tmp):
    """(argv, words the error line must contain) for one kind of bad input."""
    best = os.path.join(ckpt, "best.pt")
    if case == "truncated":
        with open(best, "rb") as fh, open(tmp / "cut.pt", "wb") as out:
            out.write(fh.read()[:5000])
    elif case == "pickled object":
        torch.save({"model": {}, "config": {}, "epoch": 1, "extra": Payload(str(tmp / "marker"))}, tmp / "evil.pt")
    elif case == "foreign":
        torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")
    elif case == "not CAT":
        ck = torch.load(best, weights_only=True)
        torch.save({**ck, "mask": None}, tmp / "at.pt")
    elif case == "missing data":
        cifar_checkpoint(tmp / "cifar.pt")
    return {
        "unknown attack": ([best, "--attacks", "natural,pgd7"], "unknown attack pgd7"),
        "unknown flag": ([best, "--eps", "0.1"], "unrecognized arguments"),
        "bad subset": ([best, "--subset", "0"], "--subset 0"),
        "missing": ([str(tmp / "nope.pt")], "no such checkpoint"),
        "truncated": ([str(tmp / "cut.pt")], "truncated"),
        "pickled object": ([str(tmp / "evil.pt")], "refused"),
        "foreign": ([str(tmp / "foreign.pt")], "not a train.py checkpoint"),
        "dataset mismatch": ([best, "--dataset", "cifar10"], "dataset mnist"),
        "arch mismatch": ([best, "--arch", "preact18"], "arch mnist_cnn"),
        "not CAT": ([str(tmp / "at.pt"), "--save-masks", str(tmp / "m.png")], "no mask network"),
        "missing data": ([str(tmp / "cifar.pt"), "--data-dir", str(tmp / "empty")], "cifar10 not found"),
        "json folder": ([best, "--attacks", "natural", "--json", str(tmp / "no" / "e.json")], "does not exist"),
    }[case]


@pytest.mark.parametrize("case", ["unknown attack", "unknown flag", "bad subset", "missing", "truncated",
                                  "pickled object", "foreign", "dataset mismatch", "arch mismatch", "not CAT",
                                  "missing data", "json folder"])
def test_bad_input_one_line_exit_2_nothing_written(case, trained, tmp_path, capsys):
    argv, words = bad_input(case, trained, tmp_path)
    if "--json" not in argv:
        argv += ["--json", str(tmp_path / "eval.json")]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv + ["--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not os.path.exists(tmp_path / "eval.json") and not os.path.exists(tmp_path / "m.png")
    assert not os.path.exists(tmp_path / "marker")            # the pickled payload never ran


def test_missing_pyautoattack_says_how_to_install(trained, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)      # makes `import pyautoattack` fail
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([os.path.join(trained, "best.pt"), "--attacks", "natural,square"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "pip install pyautoattack==0.2.0" in err[0]


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = run_cli("evaluate.py", str(tmp_path / "nope.pt"), "--attacks", "natural,bogus", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "bogus" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line(trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([os.path.join(trained, "best.pt"), "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--device cpu" in err[0]
