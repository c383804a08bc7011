"""The specification of evaluate.py and attacks.mtpgd, as tests. Run: python -m pytest -q tests/test_eval.py"""
import copy
import csv
import errno
import json
import os
import re
import signal
import sys
import types

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import attacks
import checkpoints
import common
import data
import evaluate
import models
import report
import verdicts
from conftest import HERE, Payload, run_cli, tiny_cnn

torch.set_num_threads(min(2, torch.get_num_threads()))


def mnist_settings(**over):
    """evaluate's MNIST settings, one run per attack, 100 Square queries, with `over` applied."""
    return {**evaluate.settings_for("mnist", queries=100), **over}


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


@pytest.mark.slow
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
    worst = verdicts.worst_correct(correct, shown)
    assert torch.equal(worst, torch.stack(list(correct.values())).all(0))
    acc = verdicts.accuracies(correct, shown)
    assert all(acc["worst"] <= acc[n] for n in shown)


@pytest.mark.slow
def test_worst_never_exceeds_any_attack(natural_model, mnist_small):
    names = ["natural", "fgsm", "pgd20", "mtpgd"]
    s = mnist_settings(eps=0.05, alpha=0.01, mt_steps=5, batch_size=50)
    correct, _ = evaluate.evaluate_split(natural_model, mnist_small[1].take(torch.arange(100)), names, s)
    worst, acc = verdicts.worst_correct(correct, names), verdicts.accuracies(correct, names)
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
    correct, _ = evaluate.evaluate_split(model, split, names, s)
    return verdicts.all_flags(correct, s)


@pytest.mark.slow
def test_flags_silent_on_a_normal_model(natural_model, mnist_small):
    assert flags_of(natural_model, mnist_small[1].take(torch.arange(50))) == []


@pytest.mark.slow
def test_flags_fire_on_a_gradient_masked_model(natural_model, mnist_small):
    masked = nn.Sequential(Quantize(), natural_model).eval()
    flags = flags_of(masked, mnist_small[1].take(torch.arange(50)))
    assert any("PGD-20" in f and "above Square" in f and "gradient masking" in f for f in flags)
    assert any("add apgd-ce,apgd-t" in f for f in flags)            # APGD did not run: say how to tell
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
        return verdicts.order_flags({"pgd100": strong, "pgd20": weak})

    assert flags(9, 0) == []                                    # 9 <= 3 * 3
    assert len(flags(10, 0)) == 1 and "PGD-100 10.00% above PGD-20 0.00%" in flags(10, 0)[0]   # 10 > 3 sqrt(10)
    assert flags(30, 20) == []                                  # 10 <= 3 * sqrt(50)
    assert verdicts.order_flags({"pgd20": torch.ones(50, dtype=torch.bool),   # the expected direction
                                 "pgd100": torch.zeros(50, dtype=torch.bool)}) == []




# ============================================================================ Square against white-box: masking or a weak PGD

def survivors(n, broken):
    """Bool (n,): True except at the indices in `broken`."""
    correct = torch.ones(n, dtype=torch.bool)
    correct[list(broken)] = False
    return correct


def test_square_flag_says_weak_pgd_when_apgd_matches_square():
    # PGD-100 breaks 5 of 100; APGD-T and Square break ~20, mostly the same ones (CAT_cw's pattern)
    correct = {"natural": survivors(100, []), "pgd100": survivors(100, range(5)),
               "apgd-t": survivors(100, range(20)), "square": survivors(100, [*range(19), 25])}
    flags = verdicts.all_flags(correct, mnist_settings())
    assert len(flags) == 1 and "PGD-100 95.00% above Square 80.00%" in flags[0]
    assert "(PGD-100, APGD-T) 80.00%" in flags[0] and verdicts.WHY_WEAK in flags[0]
    assert not any(verdicts.WHY_MASKING in f or verdicts.WHY_MASKING_OR_WEAK in f for f in flags)


def test_square_flag_says_masking_when_square_beats_apgd_too():
    correct = {"natural": survivors(100, []), "pgd100": survivors(100, range(5)),
               "apgd-t": survivors(100, range(6)), "square": survivors(100, range(20))}
    flags = verdicts.square_flags(correct)
    assert len(flags) == 1 and "(PGD-100, APGD-T) 94.00% above Square 80.00%" in flags[0]
    assert verdicts.WHY_MASKING in flags[0] and "14/0" in flags[0]       # b = 14 only-Square breaks, c = 0


def test_square_flag_needs_more_than_noise():
    correct = {"apgd-t": survivors(100, range(10)), "square": survivors(100, range(16))}   # 6 <= 3 sqrt(6)
    assert verdicts.square_flags(correct) == []
    assert verdicts.square_flags({"square": survivors(100, range(50))}) == []               # no white-box ran


@pytest.mark.slow
def test_masking_flag_fires_on_the_masked_model_with_apgd(natural_model, mnist_small):
    masked = nn.Sequential(Quantize(), natural_model).eval()
    split = mnist_small[1].take(torch.arange(50))
    correct, _ = evaluate.evaluate_split(masked, split, ["natural", "pgd20", "apgd-ce", "square"],
                                         mnist_settings(queries=300))
    flags = verdicts.square_flags(correct)
    assert len(flags) == 1 and "(PGD-20, APGD-CE)" in flags[0] and verdicts.WHY_MASKING in flags[0]


@pytest.mark.slow
def test_masking_flag_silent_where_apgd_matches_square(natural_model, mnist_small):
    split = mnist_small[1].take(torch.arange(50))
    correct, _ = evaluate.evaluate_split(natural_model, split, ["natural", "pgd20", "apgd-ce", "square"],
                                         mnist_settings(eps=0.05, alpha=0.0025, queries=300))
    assert pct_of(correct["apgd-ce"]) <= pct_of(correct["square"]) + 4     # APGD matches Square here
    assert verdicts.all_flags(correct, mnist_settings()) == []


def pct_of(correct):
    return 100 * correct.float().mean().item()


# ============================================================================ any model: state_dicts and factories

FACTORY = """
import time

import torch
import torch.nn as nn


class Slow(nn.Module):
    def forward(self, x):
        time.sleep(SLEEP)
        return x


def build():
    net = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 49, 10))
    net.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return nn.Sequential(Slow(), net) if SLEEP else net


def broken():
    raise ValueError("no weights here")


def flat():
    return nn.Flatten()


def number():
    return 3
"""


def write_factory(folder, natural_model, sleep=0.0):
    """A RobustBench-style model file: build() returns the natural model (images in [0, 1], logits)."""
    weights = folder / "natural.pt"
    torch.save(natural_model.state_dict(), weights)
    path = folder / "zoo.py"
    path.write_text(FACTORY.replace("WEIGHTS", repr(str(weights))).replace("SLEEP", repr(sleep)))
    return str(path)


def stored(path):
    """The store of an evaluate.py JSON: {weights: {entry key: entry}}."""
    return json.load(open(path))["results"]


def bits_of(path, weights=None):
    """{attack: bits} of the entries in the store at `path` (of the one model there, or of `weights`)."""
    store = stored(path)
    mine = store[weights or next(iter(store))]
    return {key.split()[0]: e["bits"] for key, e in mine.items() if "bits" in e}


def evaluate_main(argv):
    """evaluate.main on the CPU with the repository's data folder."""
    evaluate.main([*argv, "--device", "cpu", "--data-dir", os.path.join(HERE, "data")])


@pytest.mark.slow
def test_a_factory_model_gets_every_attack_and_flag(natural_model, tmp_path, capsys):
    zoo, out = write_factory(tmp_path, natural_model), tmp_path / "eval.json"
    names = ["natural", "fgsm", "pgd20", "cw", "mtpgd", "pgd10rs", "apgd-ce", "apgd-t", "square", "autoattack"]
    evaluate_main([f"{zoo}:build", "--dataset", "mnist", "--attacks", ",".join(names), "--eps", "0.2,0.3",
                   "--subset", "10", "--restarts", "2", "--queries", "50", "--mt-steps", "3", "--cw-steps", "5",
                   "--sanity", "--json", str(out), "--csv", str(tmp_path / "t.csv"), "--plot", str(tmp_path / "c.png")])
    rows = json.load(open(out))["models"]
    assert [r["eps"] for r in rows] == [0.2, 0.3] and all(r["kind"] == "factory" and r["complete"] for r in rows)
    for r in rows:
        assert list(r["accuracy"]) == names + ["avg", "worst"] and set(r["stderr"]) == set(names)
        assert r["accuracy"]["worst"] <= min(r["accuracy"][a] for a in names) and isinstance(r["flags"], list)
        assert set(r["seconds"]) >= set(names) and r["test_set"].startswith("mnist test ")
    entries = stored(out)[rows[0]["weights"]]
    assert all(len(e["bits"]) == 10 for k, e in entries.items() if " on mnist test " in k and "bits" in e)
    s = rows[0]["settings"]
    assert (s["restarts"], s["queries"], s["mt_steps"], s["cw_steps"]) == (2, 50, 3, 5)
    assert s["alpha"] == pytest.approx(0.01) and s["cw_eps"] == 0.2        # the paper's step/eps ratio at eps 0.2
    assert "sanity" in rows[0] and "eps0" in rows[0]["runs"] and "sanity" not in rows[1]   # once per model
    stdout = capsys.readouterr().out
    assert "AutoAttack: robust accuracy after APGD-CE" in stdout and "AutoAttack: running apgd-t" in stdout
    assert len(list(csv.reader(open(tmp_path / "t.csv")))) == 3
    assert open(tmp_path / "c.png", "rb").read(4) == b"\x89PNG"


def test_a_state_dict_with_dataset_and_arch(tmp_path, capsys):
    torch.manual_seed(0)
    f = models.build("mnist_cnn", "mnist")
    torch.save({f"module.{k}": v for k, v in f.state_dict().items()}, tmp_path / "weights.pt")   # a DDP save
    evaluate_main([str(tmp_path / "weights.pt"), "--dataset", "mnist", "--arch", "mnist_cnn",
                   "--attacks", "natural,fgsm", "--subset", "20", "--json", str(tmp_path / "e.json")])
    banner = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluating"))
    assert "(state_dict, mnist, mnist_cnn, weights " in banner and "None" not in banner, banner
    row = json.load(open(tmp_path / "e.json"))["models"][0]
    assert (row["kind"], row["arch"], row["dataset"], row["n_test"]) == ("state_dict", "mnist_cnn", "mnist", 20)
    with torch.no_grad():
        x, y = next(data.batches(data.load_test("mnist", os.path.join(HERE, "data")).take(torch.arange(20)), 20))
        assert row["accuracy"]["natural"] == pytest.approx(100 * (f(x).argmax(1) == y).float().mean().item())


def model_refusal(case, tmp, natural_model):
    """(argv, words the error line must contain) for a model that cannot be evaluated."""
    zoo = write_factory(tmp, natural_model)
    torch.save(models.build("mnist_cnn", "mnist").state_dict(), tmp / "sd.pt")
    return {
        "state_dict, wrong arch": ([str(tmp / "sd.pt"), "--dataset", "cifar10", "--arch", "preact18"],
                                   "does not fit --arch preact18"),
        "state_dict, no arch": ([str(tmp / "sd.pt")], "pass --dataset and --arch"),
        "factory raises": ([f"{zoo}:broken", "--dataset", "mnist"], "raised ValueError: no weights here"),
        "factory, no such function": ([f"{zoo}:nothing", "--dataset", "mnist"],
                                      f"{zoo} has no function nothing(); it defines build, broken, flat, number"),
        "factory, wrong output shape": ([f"{zoo}:flat", "--dataset", "mnist"], "returns (2, 784)"),
        "factory, not a module": ([f"{zoo}:number", "--dataset", "mnist"], "not a torch.nn.Module"),
        "factory, no dataset": ([f"{zoo}:build"], "needs --dataset"),
        "factory with --arch": ([f"{zoo}:build", "--dataset", "mnist", "--arch", "mnist_cnn"], "drop --arch"),
        "factory, no file": ([f"{tmp}/nope.py:build", "--dataset", "mnist"], "no such file"),
    }[case]


@pytest.mark.parametrize("case", ["state_dict, wrong arch", "state_dict, no arch", "factory raises",
                                  "factory, no such function", "factory, wrong output shape", "factory, not a module",
                                  "factory, no dataset", "factory with --arch", "factory, no file"])
def test_models_that_cannot_be_evaluated_are_refused_in_one_line(case, natural_model, tmp_path, capsys):
    argv, words = model_refusal(case, tmp_path, natural_model)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(argv + ["--attacks", "natural", "--json", str(tmp_path / "e.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and words in err[0] and "factory_" not in err[0], err
    assert not os.path.exists(tmp_path / "e.json")


# ============================================================================ eps lists, progress, resume

def test_eps_takes_fractions_and_lists():
    args = evaluate.parse_args(["m.pt", "--eps", "8/255,2/255,8/255", "--attacks", "natural,pgd20"])
    assert args.eps == [2 / 255, 8 / 255]                                       # sorted, duplicates dropped
    assert evaluate.settings_for("cifar10", 8 / 255)["cw_eps"] == 0.031        # the paper's eps: its settings
    assert evaluate.settings_for("cifar10", 2 / 255)["alpha"] == pytest.approx(0.003 / 4)


@pytest.mark.slow
def test_an_eps_list_gives_one_row_per_eps_and_accuracy_falls(natural_model, tmp_path, capsys):
    zoo = write_factory(tmp_path, natural_model)
    evaluate_main([f"{zoo}:build", "--dataset", "mnist", "--eps", "0.1,0.02,0.05", "--attacks", "natural,pgd20,apgd-ce",
                   "--subset", "100", "--json", str(tmp_path / "e.json")])
    rows = json.load(open(tmp_path / "e.json"))["models"]
    assert [r["eps"] for r in rows] == [0.02, 0.05, 0.1]
    assert len({r["accuracy"]["natural"] for r in rows}) == 1
    for attack in ("pgd20", "apgd-ce", "worst"):
        acc = [r["accuracy"][attack] for r in rows]
        assert acc == sorted(acc, reverse=True) and acc[0] > acc[-1], (attack, acc)
    table = capsys.readouterr().out
    assert all(re.search(rf"zoo.py:build\s+{eps}\s", table) for eps in ("0.02", "0.05", "0.1"))


def test_progress_lines_appear_while_an_attack_runs(natural_model, tmp_path, capsys):
    zoo = write_factory(tmp_path, natural_model, sleep=0.01)          # ~0.25 s for PGD-20 on one batch
    evaluate_main([f"{zoo}:build", "--dataset", "mnist", "--attacks", "natural,pgd20", "--subset", "10",
                   "--progress", "0.02"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "PGD-20: " in ln and "images" in ln]
    assert len(lines) >= 3, lines
    assert all(re.search(r"PGD-20: \d+/10 images, .*, \d+ s, ETA", ln) for ln in lines)


def test_progress_line_gives_done_accuracy_and_eta():
    progress = report.Progress(1e9, log=lambda line: None)
    with progress.running("PGD-20", 1000, done=200, n_correct=180):
        progress.t0 -= 10                                   # 10 s in, 300 new images done
        progress.update(500, 450)
        assert progress.line() == "  PGD-20: 500/1000 images, 90.00% robust so far, 10 s, ETA 17 s"


class Interrupt:
    """attack_correct that raises KeyboardInterrupt (Ctrl-C) on call number `at`; counts calls."""

    def __init__(self, at=None):
        self.at, self.calls, self.real = at, 0, evaluate.attack_correct

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args)


@pytest.mark.slow
def test_a_killed_then_resumed_evaluation_equals_an_uninterrupted_one(natural_model, tmp_path, monkeypatch, capsys):
    zoo = write_factory(tmp_path, natural_model)
    argv = [f"{zoo}:build", "--dataset", "mnist", "--attacks", "natural,fgsm,pgd20", "--restarts", "2",
            "--eps", "0.05", "--subset", "60", "--batch-size", "20"]          # 3 batches per attack
    evaluate_main(argv + ["--json", str(tmp_path / "whole.json")])
    interrupt = Interrupt(at=5)                   # natural's 3 batches, fgsm's first; Ctrl-C in fgsm's second
    monkeypatch.setattr(evaluate, "attack_correct", interrupt)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(argv + ["--json", str(tmp_path / "parts.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 130 and len(err) == 1 and "run the same command again to resume" in err[0]
    kept = json.load(open(tmp_path / "parts.json"))["models"][0]
    assert {a: len(b) for a, b in bits_of(tmp_path / "parts.json").items()} == {"natural": 60, "fgsm": 20}
    assert list(kept["accuracy"]) == ["natural"] and not kept["complete"]       # finished attacks only
    resumed = Interrupt()
    monkeypatch.setattr(evaluate, "attack_correct", resumed)
    evaluate_main(argv + ["--json", str(tmp_path / "parts.json")])
    assert resumed.calls == 2 + 3                                                # fgsm's last two, pgd20's three
    whole, parts = (json.load(open(tmp_path / f))["models"][0] for f in ("whole.json", "parts.json"))
    assert bits_of(tmp_path / "parts.json") == bits_of(tmp_path / "whole.json")
    assert parts["accuracy"] == whole["accuracy"] and parts["complete"]
    assert parts["flags"] == whole["flags"]


def test_sigterm_stops_an_evaluation_as_ctrl_c_does(natural_model, tmp_path, monkeypatch, capsys):
    """kill -TERM (a session's end, a queue stopped) keeps every finished batch, says so in one line, exits
    130, and leaves the process's own SIGTERM handling as it was."""
    zoo, out = write_factory(tmp_path, natural_model), str(tmp_path / "e.json")
    argv = [f"{zoo}:build", "--dataset", "mnist", "--attacks", "natural,fgsm", "--eps", "0.05", "--subset", "40",
            "--batch-size", "20", "--json", out]
    real, calls = evaluate.attack_correct, []

    def terminated_in_fgsm(*args):
        calls.append(args[0])
        if len(calls) == 4:                                       # natural's 2 batches, fgsm's first; TERM in its second
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(evaluate, "attack_correct", terminated_in_fgsm)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 130 and len(err) == 1 and "run the same command again to resume" in err[0]
    assert signal.getsignal(signal.SIGTERM) is before
    assert {a: len(b) for a, b in bits_of(out).items()} == {"natural": 40, "fgsm": 20}


def other_model(natural_model):
    """The natural model with its last layer scaled: other weights, the same architecture."""
    model = copy.deepcopy(natural_model)
    with torch.no_grad():
        model[-1].weight.mul_(0.5)
    return model


def test_the_store_keeps_other_eps_models_and_attacks(natural_model, tmp_path, monkeypatch):
    zoo, out = write_factory(tmp_path, natural_model), str(tmp_path / "e.json")
    (tmp_path / "b").mkdir()
    zoo_b = write_factory(tmp_path / "b", other_model(natural_model))
    argv = ["--dataset", "mnist", "--subset", "20", "--json", out]
    evaluate_main([f"{zoo}:build", "--attacks", "natural,fgsm", "--eps", "0.05", *argv])
    counted = Interrupt()
    monkeypatch.setattr(evaluate, "attack_correct", counted)
    evaluate_main([f"{zoo}:build", "--attacks", "natural,fgsm", "--eps", "0.05", *argv])
    assert counted.calls == 0                                                    # all finished: nothing reruns
    evaluate_main([f"{zoo}:build", "--attacks", "natural,fgsm", "--eps", "0.1", *argv])
    assert counted.calls == 1                                   # fgsm at the new eps; natural reads no eps
    evaluate_main([f"{zoo_b}:build", "--attacks", "natural", *argv])             # a second model, a smaller run
    doc = json.load(open(out))
    assert [(r["model"], r["eps"], list(r["accuracy"])) for r in doc["models"]] == [("zoo.py:build", 0.3, ["natural",
                                                                                                            "avg"])]
    first = next(w for w in doc["results"] if w != doc["models"][0]["weights"])
    assert sorted(k.split(" on ")[0] for k in doc["results"][first] if " on " in k) == [
        "fgsm eps=0.05", "fgsm eps=0.1", "natural"]                             # the first model's results stay
    assert doc["results"][first]["model"]["source"] == f"{zoo}:build"


def test_a_factory_is_known_by_the_weights_it_loads(natural_model, tmp_path, monkeypatch):
    zoo, out = write_factory(tmp_path, natural_model), str(tmp_path / "e.json")
    argv = [f"{zoo}:build", "--dataset", "mnist", "--attacks", "natural", "--subset", "20", "--json", out]
    evaluate_main(argv)
    torch.save(other_model(natural_model).state_dict(), tmp_path / "natural.pt")    # same .py, new weights
    counted = Interrupt()
    monkeypatch.setattr(evaluate, "attack_correct", counted)
    evaluate_main(argv)
    assert counted.calls == 1 and len(stored(out)) == 2


def test_the_weights_hash_sees_every_tensor_and_not_the_file():
    f = models.build("mnist_cnn", "mnist")
    same, other = models.build("mnist_cnn", "mnist"), models.build("mnist_cnn", "mnist")
    same.load_state_dict(f.state_dict())
    other.load_state_dict(f.state_dict())
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-6
    assert checkpoints.weights_hash(same) == checkpoints.weights_hash(f) != checkpoints.weights_hash(other)
    assert checkpoints.weights_hash(f) != checkpoints.weights_hash(f.double())              # the dtype counts


def test_a_checkpoint_and_its_state_dict_share_their_results(checkpoint, tmp_path):
    ckpt = torch.load(os.path.join(checkpoint, "best.pt"), weights_only=True)
    torch.save(ckpt["model"], tmp_path / "sd.pt")
    as_checkpoint = checkpoints.load_model(os.path.join(checkpoint, "best.pt"))
    as_state_dict = checkpoints.load_model(str(tmp_path / "sd.pt"), "mnist", "mnist_cnn")
    assert checkpoints.weights_hash(as_checkpoint["f"]) == checkpoints.weights_hash(as_state_dict["f"])


def test_each_attack_is_keyed_by_the_settings_it_reads():
    s = evaluate.settings_for("mnist", restarts=5, queries=100, batch_size=7)
    assert evaluate.reads("natural", s) == {} and evaluate.reads("autoattack", s) == {"eps": 0.3, "seed": 0}
    assert evaluate.reads("pgd20", s) == {"eps": 0.3, "alpha": 0.015, "restarts": 5, "seed": 0}
    assert evaluate.reads("pgd20", {**s, "restarts": 1}) == {"eps": 0.3, "alpha": 0.015, "restarts": 1}
    assert evaluate.reads("square", s) == {"eps": 0.3, "queries": 100, "seed": 0}
    assert set(evaluate.reads("cw", s)) == {"cw_eps", "cw_alpha", "cw_steps", "kappa", "restarts", "seed"}
    assert all(evaluate.reads(a, s) == evaluate.reads(a, {**s, "batch_size": 500}) for a in verdicts.NAMES)


def test_restarts_rerun_only_the_attacks_that_restart(natural_model, tmp_path, monkeypatch):
    zoo, out = write_factory(tmp_path, natural_model), str(tmp_path / "e.json")
    argv = [f"{zoo}:build", "--dataset", "mnist", "--attacks", "natural,fgsm,pgd20", "--subset", "20", "--json", out]
    evaluate_main(argv)
    counted = Interrupt()
    monkeypatch.setattr(evaluate, "attack_correct", counted)
    evaluate_main(argv + ["--restarts", "2"])
    assert counted.calls == 1 and json.load(open(out))["models"][0]["complete"]       # pgd20 alone


def test_a_smaller_run_reuses_the_first_images_and_a_larger_one_continues(natural_model, tmp_path, monkeypatch):
    zoo, out = write_factory(tmp_path, natural_model), str(tmp_path / "e.json")
    argv = [f"{zoo}:build", "--dataset", "mnist", "--attacks", "natural,fgsm", "--batch-size", "20", "--json", out]
    evaluate_main(argv + ["--subset", "40"])
    counted = Interrupt()
    monkeypatch.setattr(evaluate, "attack_correct", counted)
    evaluate_main(argv + ["--subset", "20"])
    assert counted.calls == 0 and {len(b) for b in bits_of(out).values()} == {40}       # reused, nothing cut
    assert json.load(open(out))["models"][0]["n_test"] == 20
    evaluate_main(argv + ["--subset", "60"])
    assert counted.calls == 2 and {len(b) for b in bits_of(out).values()} == {60}       # the last batch of each


def test_the_table_and_flags_cover_only_the_attacks_asked_for(natural_model, tmp_path, monkeypatch, capsys):
    zoo, out = write_factory(tmp_path, natural_model), str(tmp_path / "e.json")
    argv = [f"{zoo}:build", "--dataset", "mnist", "--subset", "20", "--eps", "0.02", "--json", out]
    evaluate_main(argv + ["--attacks", "natural,pgd20", "--sanity"])
    doc = json.load(open(out))
    row, store = doc["models"][0], doc["results"]
    key = evaluate.entry_key("square", evaluate.settings_for("mnist", 0.02, queries=100), row["test_set"])
    store[row["weights"]][key] = {"bits": "0" * 20, "seconds": 1.0, "notes": []}      # Square broke everything
    common.write_json(doc, out)
    evaluate_main(argv + ["--attacks", "natural,pgd20"])
    row = json.load(open(out))["models"][0]
    assert row["flags"] == [] and "sanity" not in row and row["runs"] == ["natural", "pgd20"]
    counted = Interrupt()
    monkeypatch.setattr(evaluate, "attack_correct", counted)
    evaluate_main(argv + ["--attacks", "natural,pgd20,square", "--queries", "100"])
    row = json.load(open(out))["models"][0]
    assert counted.calls == 0 and row["accuracy"]["square"] == 0.0                   # the stored Square, reused
    assert len(row["flags"]) == 1 and "above Square 0.00%" in row["flags"][0]


def test_natural_alone_runs_no_hidden_attack_and_masks_show_progress(checkpoint, tmp_path, monkeypatch, capsys):
    calls = []
    real = attacks.pgd
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    best = os.path.join(checkpoint, "best.pt")
    evaluate_main([best, "--attacks", "natural", "--subset", "20", "--json", str(tmp_path / "e.json")])
    assert calls == [] and "masks" not in json.load(open(tmp_path / "e.json"))["models"][0]
    evaluate_main([best, "--attacks", "natural", "--subset", "20", "--save-masks", str(tmp_path / "m.png"),
                   "--progress", "1e-3", "--batch-size", "10"])
    assert calls[:2] == [10, 10] and re.search(r"masks: \d+/20 images", capsys.readouterr().out)


# ============================================================================ the command line

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CAT checkpoint from a one-epoch train.py run on 200 MNIST images."""
    out = str(tmp_path_factory.mktemp("cat") / "run")
    run_cli("train.py", "--dataset", "mnist", "--subset", "200", "--epochs", "1", "--steps", "2",
            "--val-size", "50", "--out", out, "--device", "cpu")
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder with best.pt: an untrained CAT checkpoint in train.py's format (no training run)."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    f, g = models.build("mnist_cnn", "mnist"), models.build("mnist_mask", "mnist")
    config = {"dataset": "mnist", "arch": "mnist_cnn", "method": "cat", "eps": 0.3, "alpha": 0.015}
    torch.save({"model": f.state_dict(), "mask": g.state_dict(), "config": config, "epoch": 1}, folder / "best.pt")
    return str(folder)


@pytest.mark.slow
def test_cli_end_to_end(trained, tmp_path):
    result, png = str(tmp_path / "eval.json"), str(tmp_path / "masks.png")
    proc = run_cli("evaluate.py", os.path.join(trained, "best.pt"), "--attacks", "natural,fgsm,pgd20",
                   "--restarts", "2", "--subset", "50", "--json", result, "--save-masks", png, "--device", "cpu")
    numbers = json.load(open(result))
    assert set(numbers) == {"results", "models", "attacks", "command", "command_seconds"} and len(numbers["models"]) == 1
    row = numbers["models"][0]
    acc = row["accuracy"]
    assert list(acc) == ["natural", "fgsm", "pgd20", "avg", "worst"] and set(row["stderr"]) == {"natural", "fgsm", "pgd20"}
    assert row["n_test"] == 50 and row["seed"] == 0 and row["kind"] == "checkpoint" and row["method"] == "cat"
    assert {"eps", "alpha", "kappa", "restarts", "queries", "batch_size"} <= set(row["settings"])
    assert row["settings"]["restarts"] == 2 and row["eps"] == 0.3
    assert acc["worst"] <= min(acc[a] for a in ("natural", "fgsm", "pgd20"))
    assert acc["avg"] == pytest.approx((acc["natural"] + acc["fgsm"] + acc["pgd20"]) / 3, abs=0.01)
    assert {"mean", "mean_bright", "mean_dark"} <= set(row["masks"]) and 0 <= row["masks"]["mean"] <= 1
    assert os.path.getsize(png) > 100 and open(png, "rb").read(4) == b"\x89PNG"
    assert "PGD-20" in proc.stdout and "Avg" in proc.stdout and "Worst" in proc.stdout


@pytest.mark.slow
def test_cli_two_models_one_table(trained, tmp_path):
    result = str(tmp_path / "eval.json")
    proc = run_cli("evaluate.py", os.path.join(trained, "best.pt"), os.path.join(trained, "last.pt"),
                   "--attacks", "natural,fgsm", "--subset", "20", "--json", result, "--device", "cpu")
    numbers = json.load(open(result))
    assert [m["source"][-7:] for m in numbers["models"]] == ["best.pt", "last.pt"]
    assert all(m["n_test"] == 20 and "worst" in m["accuracy"] for m in numbers["models"])
    assert "run/best.pt" in proc.stdout and "run/last.pt" in proc.stdout


def cifar_checkpoint(path):
    f = models.build("preact18", "cifar10")
    torch.save({"model": f.state_dict(), "mask": None, "config": {"dataset": "cifar10", "arch": "preact18"},
                "epoch": 1}, path)


def bad_input(case, ckpt, tmp):
    """(argv, words the error line must contain) for one kind of bad input."""
    best = os.path.join(ckpt, "best.pt")
    if case == "truncated":
        with open(best, "rb") as fh, open(tmp / "cut.pt", "wb") as out:
            out.write(fh.read()[:5000])
    elif case == "a text file":
        (tmp / "notes.pt").write_text("# not a checkpoint\n")
    elif case == "pickled object":
        torch.save({"model": {}, "config": {}, "epoch": 1, "extra": Payload(str(tmp / "marker"))}, tmp / "evil.pt")
    elif case == "foreign":
        torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")
    elif case == "not CAT":
        ck = torch.load(best, weights_only=True)
        torch.save({**ck, "mask": None}, tmp / "at.pt")
    elif case == "missing data":
        cifar_checkpoint(tmp / "cifar.pt")
    elif case == "a folder named .pt":
        (tmp / "dir.pt").mkdir()
    return {
        "unknown attack": ([best, "--attacks", "natural,pgd7x"], "unknown attack pgd7x"),
        "unknown flag": ([best, "--epsilon", "0.1"], "unrecognized arguments"),
        "bad subset": ([best, "--subset", "0"], "--subset 0"),
        "bad eps": ([best, "--eps", "0.1,0"], "(0, 1]"),
        "eps not a number": ([best, "--eps", "0.1,x"], "not a number"),
        "eps, empty entry": ([best, "--eps", "0.1,,0.3"], "empty entry"),
        "attacks, empty entry": ([best, "--attacks", "natural,,pgd20"], "empty entry"),
        "plot, one eps": ([best, "--eps", "0.3", "--plot", str(tmp / "c.png")], "two or more --eps"),
        "alpha unused": ([best, "--attacks", "natural,fgsm", "--alpha", "0.01"], "--alpha is the step"),
        "queries unused": ([best, "--attacks", "natural,pgd20", "--queries", "10"], "--queries applies to square"),
        "restarts unused": ([best, "--attacks", "natural,fgsm", "--restarts", "2"], "--restarts applies"),
        "progress": ([best, "--progress", "0"], "--progress 0.0 must be > 0"),
        "alpha nan": ([best, "--attacks", "natural,pgd20", "--alpha", "nan"], "--alpha nan must be a finite number"),
        "subset beyond the test set": ([best, "--subset", "20000"], "the mnist test set has 10,000 images"),
        "a run folder": ([ckpt], f"{ckpt} is a folder, not a checkpoint file; pass {best}"),
        "a folder named .pt": ([str(tmp / "dir.pt") + "/"], "dir.pt/ is a folder, not a checkpoint file"),
        "json is a folder": ([best, "--json", str(tmp)], f"--json {tmp}: is a folder"),
        "csv, empty name": ([best, "--csv", ""], "--csv : the name is empty"),
        "plot, unknown format": ([best, "--eps", "0.1,0.2", "--plot", str(tmp / "c.xyz")],
                                 ".xyz: not a format matplotlib writes"),
        "masks, unknown format": ([best, "--save-masks", str(tmp / "m.xyz")], ".xyz: not a format Pillow writes"),
        "missing": ([str(tmp / "nope.pt")], "no such checkpoint"),
        "truncated": ([str(tmp / "cut.pt")], "cut.pt: not a readable torch checkpoint (another kind of file, truncated"),
        "a text file": ([str(tmp / "notes.pt")], "notes.pt: not a readable torch checkpoint (another kind of file"),
        "pickled object": ([str(tmp / "evil.pt")], "refused, it holds more than tensors and plain values (it would "
                           "import io.open); load only checkpoints written by train.py"),
        "foreign": ([str(tmp / "foreign.pt")], "not a train.py checkpoint"),
        "dataset mismatch": ([best, "--dataset", "cifar10"], "dataset mnist"),
        "arch mismatch": ([best, "--arch", "preact18"], "arch mnist_cnn"),
        "not CAT": ([str(tmp / "at.pt"), "--save-masks", str(tmp / "m.png")], "no mask network"),
        "missing data": ([str(tmp / "cifar.pt"), "--data-dir", str(tmp / "empty")], "cifar-10-batches-py"),
        "json folder": ([best, "--attacks", "natural", "--json", str(tmp / "no" / "e.json")], "does not exist"),
    }[case]


@pytest.mark.parametrize("case", ["unknown attack", "unknown flag", "bad subset", "bad eps", "eps not a number",
                                  "eps, empty entry", "attacks, empty entry",
                                  "plot, one eps", "alpha unused", "queries unused", "restarts unused", "progress",
                                  "missing", "truncated", "a text file", "pickled object", "foreign", "dataset mismatch",
                                  "arch mismatch", "not CAT", "missing data", "json folder", "alpha nan",
                                  "subset beyond the test set", "a run folder", "a folder named .pt",
                                  "json is a folder", "csv, empty name", "plot, unknown format",
                                  "masks, unknown format"])
def test_bad_input_one_line_exit_2_nothing_written(case, checkpoint, tmp_path, capsys):
    argv, words = bad_input(case, checkpoint, tmp_path)
    if "--json" not in argv:
        argv += ["--json", str(tmp_path / "eval.json")]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv + ["--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err
    assert "\x1b" not in err[0] and not err[0].endswith((" t", "...")), err                # whole words, no escapes
    assert not os.path.exists(tmp_path / "eval.json") and not os.path.exists(tmp_path / "m.png")
    assert not os.path.exists(tmp_path / "c.png") and not os.path.exists(tmp_path / "marker")   # the payload never ran


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00", b"[1, 2]", b'{"loss": 1}', b'{"results": []}', b"{",
                                     b'{"results": {"w": 3}}', b'{"models": [{"model": "no dataset"}]}'])
def test_a_json_that_is_no_evaluation_is_refused_and_kept(content, checkpoint, tmp_path, capsys):
    (tmp_path / "e.json").write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([os.path.join(checkpoint, "best.pt"), "--attacks", "natural", "--json", str(tmp_path / "e.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "e.json is not" in err[0] and "left as it is" in err[0]
    assert (tmp_path / "e.json").read_bytes() == content


def test_older_shapes_are_converted_losing_nothing(natural_model, tmp_path, monkeypatch):
    torch.save(natural_model.state_dict(), tmp_path / "sd.pt")
    zoo, out, sd = write_factory(tmp_path, natural_model), tmp_path / "e.json", str(tmp_path / "sd.pt")
    evaluate_main([f"{zoo}:build", "--dataset", "mnist", "--attacks", "natural,fgsm", "--subset", "20", "--json", str(out)])
    new = json.load(open(out))
    row, bits = new["models"][0], bits_of(out)
    old_row = {**row, "source": sd, "kind": "state_dict", "arch": None, "sha256": checkpoints.sha256(sd),
               "correct": bits}                                     # the rows shape: per-image bits in each row
    flat = {"natural": 95.0, "fgsm": 90.0, "checkpoint": "gone/best.pt", "dataset": "mnist", "n_test": 20}
    with monkeypatch.context() as patch:                          # sd.pt holds the factory's net
        patch.setattr(checkpoints, "load_model", lambda *a: {"f": natural_model})
        store = evaluate.convert({"models": [old_row]}, evaluate.old_weights, lambda d: row["test_set"])
    assert store[row["weights"]]["earlier"] == [{k: v for k, v in old_row.items() if k != "correct"}]
    assert {k: e["bits"] for k, e in store[row["weights"]].items() if " on " in k} == \
        {k: e["bits"] for k, e in new["results"][row["weights"]].items() if " on " in k}      # what a run stores
    store = evaluate.convert(flat, evaluate.old_weights, lambda d: row["test_set"])
    assert store == {"file ? gone/best.pt": {"model": {"source": "gone/best.pt", "kind": "checkpoint",
                                                       "dataset": "mnist", "arch": None, "method": None,
                                                       "epoch": None}, "earlier": [{**flat, "source": "gone/best.pt",
                                                                                    "kind": "checkpoint"}]}}
    out.write_text(json.dumps(flat))
    evaluate_main([f"{zoo}:build", "--dataset", "mnist", "--attacks", "natural", "--subset", "20", "--json", str(out)])
    assert stored(out)["file ? gone/best.pt"]["earlier"][0]["fgsm"] == 90.0          # a later run keeps it


def test_missing_pyautoattack_says_how_to_install(checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)      # makes `import pyautoattack` fail
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([os.path.join(checkpoint, "best.pt"), "--attacks", "natural,apgd-t"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "pip install pyautoattack==0.2.0" in err[0]


def test_missing_matplotlib_says_how_to_install(checkpoint, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([os.path.join(checkpoint, "best.pt"), "--eps", "0.1,0.2", "--plot", str(tmp_path / "c.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "pip install matplotlib" in err[0]


@pytest.mark.slow
def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = run_cli("evaluate.py", str(tmp_path / "nope.pt"), "--attacks", "natural,bogus", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "bogus" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([os.path.join(checkpoint, "best.pt"), "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--device cpu" in err[0]


# ============================================================================ outputs: checked first, written whole or said in one line

@pytest.mark.parametrize("flag,name", [("--json", "e.json"), ("--csv", "t.csv"), ("--plot", "c.pdf"),
                                       ("--save-masks", "m.png")])
def test_an_output_on_a_read_only_disk_is_refused_before_anything_loads(flag, name, checkpoint, tmp_path, capsys,
                                                                        monkeypatch, read_only_disk):
    monkeypatch.setattr(checkpoints, "load_model", lambda *a: pytest.fail("loaded a model before checking"))
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([os.path.join(checkpoint, "best.pt"), "--eps", "0.2,0.3", flag, str(tmp_path / name)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert f"{flag} {tmp_path / name}: cannot be written here (Read-only file system)" in err[0]


def test_the_output_probe_finds_a_full_disk_and_leaves_nothing_behind(tmp_path, monkeypatch):
    path = str(tmp_path / "e.json")
    assert common.unwritable(path) is None and os.listdir(tmp_path) == []

    def full(name, *args):                              # the file is created, its first bytes find no space
        open(name, "w").close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(common, "open", full, raising=False)
    assert common.unwritable(path) == "cannot be written here (No space left on device); choose another folder"
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_one_line_that_keeps_the_store_and_says_how_to_go_on(checkpoint, tmp_path, capsys, request):
    best, out = os.path.join(checkpoint, "best.pt"), tmp_path / "e.json"
    evaluate_main([best, "--attacks", "natural", "--subset", "20", "--json", str(out)])
    before = out.read_bytes()
    request.getfixturevalue("full_disk")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:                # the first batch of fgsm cannot be stored
        evaluate_main([best, "--attacks", "natural,fgsm", "--subset", "20", "--json", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and out.read_bytes() == before, err
    assert f"could not write {out}: No space left on device; {out} holds every batch written before, intact" in err[0]
    assert f"run python evaluate.py {best} --attacks natural,fgsm --subset 20 --json {out} " in err[0]
    with pytest.raises(SystemExit) as exit_info:                # no store: the table is printed, then one line
        evaluate_main([best, "--attacks", "natural", "--subset", "20", "--csv", str(tmp_path / "t.csv")])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and "flags: none" in captured.out, err
    assert f"could not write {tmp_path / 't.csv'}: No space left on device; the table above has the numbers" in err[0]


def test_plot_and_masks_are_written_in_the_format_their_extension_names(checkpoint, tmp_path):
    evaluate_main([os.path.join(checkpoint, "best.pt"), "--attacks", "natural", "--eps", "0.2,0.3", "--subset", "10",
                   "--plot", str(tmp_path / "p.svg"), "--save-masks", str(tmp_path / "m.jpg")])
    assert (tmp_path / "p.svg").read_bytes()[:5] == b"<?xml" and (tmp_path / "m.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_help_shows_the_defaults():
    text = " ".join(evaluate.build_parser().format_help().split())
    assert "default: natural,fgsm,pgd20,pgd100,cw" in text and "default: all (10,000 on MNIST and CIFAR)" in text
    assert "test images per batch (restarts attack the survivors only). default: 500" in text


@pytest.mark.parametrize("names", [["natural"], ["natural", "pgd20"]])
def test_the_footer_explains_worst_only_under_a_worst_column(names):
    row = {"model": "m", "source": "m.pt", "eps": 0.3, "n_test": 100, "accuracy": {n: 50.0 for n in names}, "flags": []}
    table = report.eval_table([row], names)
    assert ("Worst" in table.splitlines()[0]) == (len(names) > 1) == ("Worst:" in table)


def test_a_checkpoint_save_on_a_full_disk_names_disk_space(tmp_path, monkeypatch):
    """torch reports a short write as '[enforce fail at inline_container.cc] unexpected pos': the message
    says what it means when the free space cannot hold the checkpoint, and the old copy stays."""
    path, ckpt = str(tmp_path / "best.pt"), {"model": {"w": torch.zeros(1 << 18)}, "epoch": 2}      # 1 MiB of tensors
    checkpoints.save({"epoch": 1}, path)

    def short_write(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1827456 vs 1827344")
    monkeypatch.setattr(torch, "save", short_write)
    for free, words in ((3 << 19, "(No space left on device: 1.5 MiB free, the checkpoint needs 1.0)"),
                        (1 << 40, "(RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos")):
        monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=free))
        with pytest.raises(checkpoints.CheckpointError) as e:
            checkpoints.save(ckpt, path)
        assert str(e.value).startswith(f"could not write {path} {words}") and "is intact" in str(e.value)
    assert torch.load(path, weights_only=True) == {"epoch": 1} and os.listdir(tmp_path) == ["best.pt"]


# ============================================================================ two methods over seeds

def test_seeds_and_images_is_a_difference_with_an_interval_that_widens_with_the_seeds():
    g = torch.Generator().manual_seed(0)
    draw = lambda q, n=1000: torch.rand(n, generator=g) < q
    same = [draw(0.9) for _ in range(3)]
    diff, (low, high), p = verdicts.seeds_and_images(same, same, draws=2000)
    assert diff == 0 and low < 0 < high and p == 1.0
    a, b = [draw(0.95) for _ in range(3)], [draw(0.85) for _ in range(3)]
    diff, (low, high), p = verdicts.seeds_and_images(a, b, draws=2000)
    assert diff == pytest.approx(100 * (torch.stack(a).float().mean() - torch.stack(b).float().mean()).item())
    assert 5 < low < diff < high < 15 and p < 0.01                     # 10 points on 3 x 1,000 images: clear
    spread = [draw(0.99), draw(0.80), draw(0.96)]                          # the same mean, seeds that disagree
    _, (low2, high2), p2 = verdicts.seeds_and_images(spread, b, draws=2000)
    assert high2 - low2 > 2 * (high - low) and p2 > p
