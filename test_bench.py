"""Smoke test of bench.py, and its pass counts. Run: python -m pytest -q test_bench.py"""
import json
import os
import subprocess
import sys

import pytest

import bench
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dataset", "mnist", "--methods", "cat,trades", "--dtype", "fp32,bf16", "--iters", "2", "--warmup", "1",
        "--batch-size", "8", "--steps", "2", "--unit-reps", "1", "--device", "cpu", "--threads", "1", "--eval-batch-size", "2"]


def run_bench(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=HERE, capture_output=True, text=True, timeout=120)


def test_cli_tiny_run_writes_positive_numbers(tmp_path):
    out = str(tmp_path / "bench.json")
    proc = run_bench(*TINY, "--json", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.load(open(out))
    rows = {(r["method"], r["dtype"], r["phase"]): r for r in report["results"]}
    assert set(rows) == {("cat", "fp32", "train"), ("trades", "fp32", "train"), ("cat", "bf16", "train"),
                         ("trades", "bf16", "train"), ("pgd20", "fp32", "eval")}
    for r in rows.values():
        for key in ("images_per_s", "ms_per_step", "ms_min", "ms_max", "peak_mem_mb"):
            assert r[key] > 0, (key, r)
        assert r["ms_min"] <= r["ms_p25"] <= r["ms_per_step"] <= r["ms_p75"] <= r["ms_max"]
        assert len(r["ms_all"]) == 2 and r["device"] and r["device_type"] == "cpu"
        assert r["arch"] == "mnist_cnn" and r["steps_T"] == 2
        assert r["batch_size"] == (2 if r["phase"] == "eval" else 8)
    assert rows["cat", "fp32", "train"]["passes"] == {"attack": 3, "train": 2, "nograd": 1, "mask": 1}
    assert rows["cat", "fp32", "train"]["predicted_ms"] > 0
    assert set(report["units_ms"]) == {"fp32", "bf16"}
    assert all(v > 0 for cost in report["units_ms"].values() for v in cost.values())
    assert [r["dtype"] for r in report["ratios"]["cat_over_trades"]] == ["fp32", "bf16"]
    assert all(r["measured"] > 0 and r["floor"] > 1 for r in report["ratios"]["cat_over_trades"])
    assert {r["method"] for r in report["ratios"]["bf16_over_fp32"]} == {"cat", "trades"}
    assert report["authors_mnist_s_per_batch"] == bench.AUTHORS_MNIST_S_PER_BATCH
    assert "CAT / TRADES step time" in proc.stdout and "bf16 speed-up over fp32" in proc.stdout


@pytest.mark.parametrize("flags, message", [
    (["--methods", "cat,sgd"], "--methods sgd: choose from"),
    (["--dtype", "fp16"], "--dtype fp16: choose from"),
    (["--iters", "0"], "--iters 0 must be >= 1"),
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--dataset", "mnist", "--arch", "preact18"], "does not fit --dataset mnist"),
])
def test_cli_bad_flags_fail_in_one_line(flags, message):
    proc = run_bench(*flags)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def cfg_of(*flags):
    return train.parse_config(["--dataset", "mnist", "--steps", "20", *flags])


def test_pass_counts_follow_train_step():
    # CAT: 20 PGD iterations + f(x_cali) with f frozen; f(x), f(x_cali); no-grad f(x + delta); g_phi
    assert bench.passes(cfg_of("--method", "cat")) == {"attack": 21, "train": 2, "nograd": 1, "mask": 1}
    # TRADES: the KL attack's natural forward, 20 iterations; f(x), f(x_adv)
    assert bench.passes(cfg_of("--method", "trades")) == {"attack": 20, "train": 2, "nograd": 1, "mask": 0}
    assert bench.passes(cfg_of("--method", "at")) == {"attack": 20, "train": 1, "nograd": 0, "mask": 0}
    assert bench.passes(cfg_of("--method", "cat", "--no-mask")) == {"attack": 20, "train": 2, "nograd": 0, "mask": 0}


def test_targets_apply_only_to_their_settings():
    ratios = {"cat_over_trades": [{"dtype": "fp32", "measured": 1.4, "paired": 1.4, "floor": 1.3}],
              "bf16_over_fp32": [{"method": "cat", "speedup": 1.6}], "over_authors": []}
    mnist = {"dataset": "mnist", "arch": "mnist_cnn", "steps_T": 20, "device_type": "cpu"}
    found = {t["target"]: t["met"] for t in bench.targets(ratios, mnist)}
    assert found == {"CAT/TRADES step time, mnist_cnn nets, T=20, fp32": False,
                     "bf16 speed-up of the CAT step over fp32, CPU": True}
    assert bench.targets(ratios, {**mnist, "steps_T": 10, "device_type": "cuda"}) == []
