"""bench.py: pass counts from a real step, the ratios, bad flags, and one tiny timed run.

    python -m pytest -q tests/test_bench.py
"""
import json
import subprocess
import sys

import pytest

import bench
import config
import train
from conftest import HERE

TINY = ["--dataset", "mnist", "--methods", "cat,trades", "--dtype", "fp32,bf16", "--iters", "2", "--warmup", "1",
        "--batch-size", "8", "--steps", "2", "--device", "cpu", "--threads", "1"]


def passes(method, steps, *flags):
    cfg = config.parse_config(["--dataset", "mnist", "--method", method, "--steps", str(steps), "--batch-size", "4",
                              "--device", "cpu", "--amp", "fp32", *flags])
    return bench.count_passes(cfg)


def test_passes_are_counted_from_a_real_step():
    cat, trades, at = passes("cat", 2), passes("trades", 2), passes("at", 2)
    for counts in (cat, trades, at):
        assert counts["f_forward"] > 0 and counts["f_backward"] > 0
    assert cat["f_forward"] > trades["f_forward"] > at["f_forward"]
    assert cat["f_backward"] > trades["f_backward"]
    assert cat["g_forward"] == cat["g_backward"] == 1            # g_phi runs forward once per step
    assert trades["g_forward"] == at["g_forward"] == passes("cat", 2, "--no-mask")["g_forward"] == 0
    assert at["f_nograd"] == 0 < trades["f_nograd"]              # TRADES' KL attack reads P(x) without grad


@pytest.mark.parametrize("method", ["cat", "trades", "at"])
def test_each_attack_step_adds_one_forward_and_one_backward_of_f(method):
    two, three = passes(method, 2), passes(method, 3)
    assert three["f_forward"] - two["f_forward"] == three["f_backward"] - two["f_backward"] == 1
    assert three["f_nograd"] == two["f_nograd"]


def test_ratios_pair_the_calls_of_one_round():
    rows = [{"method": "cat", "dtype": "fp32", "ms_per_step": 3.0, "ms_all": [2.0, 4.0]},
            {"method": "trades", "dtype": "fp32", "ms_per_step": 2.5, "ms_all": [1.0, 4.0]},
            {"method": "cat", "dtype": "bf16", "ms_per_step": 1.5, "ms_all": [1.0, 2.0]}]
    found = bench.ratios(rows)
    assert found["over_trades"] == [{"method": "cat", "dtype": "fp32", "measured": 1.2, "paired": 1.5}]
    assert found["bf16_over_fp32"] == [{"method": "cat", "speedup": 2.0}]


@pytest.mark.parametrize("flags, message", [
    (["--methods", "cat,sgd"], "--methods sgd: choose from"),
    (["--dtype", "fp16"], "--dtype fp16: choose from"),
    (["--iters", "0"], "--iters 0 must be >= 1"),
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--dataset", "mnist", "--arch", "preact18"], "does not fit --dataset mnist"),
    (["--floor"], "unrecognized arguments: --floor"),
])
def test_bad_flags_fail_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]


def run_bench(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_bad_flag_fails_in_one_line():
    proc = run_bench("--methods", "cat,sgd")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"bench.py: error: --methods sgd: choose from {', '.join(train.LOSSES)} (see --help)"]


@pytest.mark.slow
def test_cli_tiny_run_writes_positive_numbers(tmp_path):
    out = str(tmp_path / "bench.json")
    proc = run_bench(*TINY, "--json", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.load(open(out))
    rows = {(r["method"], r["dtype"]): r for r in report["results"]}
    assert list(rows) == [("cat", "fp32"), ("trades", "fp32"), ("cat", "bf16"), ("trades", "bf16")]
    for r in rows.values():
        for key in ("images_per_s", "ms_per_step", "ms_min", "ms_max", "first_call_ms", "peak_mem_mb"):
            assert r[key] > 0, (key, r)
        assert r["ms_min"] <= r["ms_per_step"] <= r["ms_max"] and len(r["ms_all"]) == 2
        assert (r["phase"], r["arch"], r["steps_T"], r["batch_size"], r["device_type"]) == ("train", "mnist_cnn", 2, 8, "cpu")
        assert r["passes"]["f_forward"] > 0 and r["passes"]["f_backward"] > 0
    assert rows["cat", "fp32"]["passes"]["f_backward"] > rows["trades", "fp32"]["passes"]["f_backward"]
    assert [(r["method"], r["dtype"]) for r in report["ratios"]["over_trades"]] == [("cat", "fp32"), ("cat", "bf16")]
    assert all(r["measured"] > 0 and r["paired"] > 0 for r in report["ratios"]["over_trades"])
    assert {r["method"] for r in report["ratios"]["bf16_over_fp32"]} == {"cat", "trades"}
    assert "CAT / TRADES step time, fp32" in proc.stdout and "bf16 speed-up over fp32, cat" in proc.stdout
