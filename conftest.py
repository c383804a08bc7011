"""Fixtures and helpers shared by the test files. Tests marked `slow` (subprocess runs, resume,
Ctrl-C, torchrun, property tests) are skipped by: python -m pytest -q -m "not slow"."""
import errno
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import data
import train

HERE = os.path.dirname(os.path.abspath(__file__))
# the tests' tensors are tiny: one thread is faster than two that wait for each other, above all on a busy machine
# (here and in the scripts the tests start, which inherit the environment)
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# a one-epoch MNIST run that takes about a second: 100 images, 1-step attack, 50 for validation
TINY = ["--dataset", "mnist", "--subset", "100", "--steps", "1", "--val-size", "50", "--batch-size", "50",
        "--device", "cpu"]
# every method, and the ablations and attack losses of CAT
METHOD_FLAGS = [["--method", m] for m in ("cat", "at", "trades", "mart", "fat")] + [
    ["--method", "cat", "--no-mask"], ["--method", "cat", "--no-mask", "--no-weighted-ce"],
    ["--method", "cat", "--attack", "cw"], ["--method", "cat", "--attack", "kl"]]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a subprocess, a training run or a property test (seconds each)")


def run_cli(*args, check=True, timeout=600):
    """Run one of the repository's scripts in a subprocess; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def in_process(argv, capsys):
    """Run train.main in this process; returns (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def logits_of(probs):
    """Logits whose softmax is `probs` (log-probabilities)."""
    return torch.tensor(probs, dtype=torch.float64).log()


def tiny_cnn(channels=1, classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
                         nn.Flatten(), nn.LazyLinear(classes))


def small_setup(*flags):
    """(config, nets, x, y) for one training step on 16 random MNIST-shaped images."""
    cfg = config.parse_config(["--dataset", "mnist", "--steps", "3", *flags])
    torch.manual_seed(0)
    nets = train.build_nets(cfg)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    return cfg, nets, x, y


def write_fake_cifar(root, n_per_batch=12, seed=0):
    """Files in the genuine CIFAR-10 python format: pickled dicts with bytes keys."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n_per_batch).tolist(),
                 b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"img{i}.png".encode() for i in range(n_per_batch)]}
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return folder


class Payload:
    """Unpickling this would create a marker file: the payload that must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="session")
def mnist_small():
    """(3000 training images, 500 test images) of the offline MNIST copy under data/."""
    train_split, val, test = data.load("mnist", os.path.join(HERE, "data"), log=lambda *_: None)
    return train_split.take(torch.arange(3000)), test.take(torch.arange(500))


@pytest.fixture(scope="session")
def natural_model(mnist_small):
    """A small MNIST classifier trained naturally for 3 epochs on 3000 images (a few seconds)."""
    train_split, _ = mnist_small
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 49, 10))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for epoch in range(3):
        for x, y in data.batches(train_split, 100, True, torch.Generator().manual_seed(epoch)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture
def full_disk(monkeypatch):
    """Every write through common.write_atomic (stores, tables, figures, checkpoints) finds the disk full."""
    import common

    def write_atomic(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(common, "write_atomic", write_atomic)


@pytest.fixture
def read_only_disk(monkeypatch):
    """common's up-front probe of an output path finds a read-only file system."""
    import common

    def open_(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(common, "open", open_, raising=False)
