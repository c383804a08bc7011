"""Loading and saving models: train.py's checkpoints, plain state_dicts of a models.py architecture, and
`file.py:function` factories, each turned into an nn.Module in eval mode, and the check that its output
is (N, classes) logits. train.py, evaluate.py, report.py and hubconf.py all load through here.

    f, g = checkpoints.from_checkpoint(checkpoints.load_checkpoint("results/mnist_at_0.3/best.pt"))
    m = checkpoints.load_model("weights.pt", dataset="cifar10", arch="preact18")     # m["f"], m["g"], ...

Files are read with torch.load(weights_only=True): a file that smuggles in a pickled object is refused
and its payload never runs. Every failure is a CheckpointError whose text is one line saying what to do.
"""
import contextlib
import hashlib
import importlib.util
import inspect
import os
import pickle
import re
import shutil
import sys

import torch

import common
import models

TRAIN_KEYS = {"model", "config", "epoch"}        # what makes a dict a train.py checkpoint


class CheckpointError(Exception):
    """A checkpoint that is missing, truncated, foreign or unsafe, with what to do about it."""


def one_line(e):
    return common.shorten(f"{type(e).__name__}: {e}") if str(e).strip() else type(e).__name__


def tensor_bytes(obj):
    """Bytes of the tensors in a nest of dicts, lists and tuples: about what torch.save writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(v) for v in items)


def save(obj, path):
    """torch.save through a temporary file renamed over `path`: a full disk, a vanished folder or a kill
    half-way leaves the previous file as it was. A failure is a CheckpointError naming the file and the
    cause in plain words; torch reports a full disk as 'unexpected pos', so free space is measured."""
    try:
        common.write_atomic(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as e:
        why, need = common.cause(e), tensor_bytes(obj)
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            if not isinstance(e, OSError) and free < need + 2**20:
                why = f"No space left on device: {free / 2**20:.1f} MiB free, the checkpoint needs {need / 2**20:.1f}"
        raise CheckpointError(f"could not write {path} ({why}); the previous copy, if any, is intact") from None


MODEL_KEYS = ("model", "mask", "config", "epoch", "metrics", "best")   # what evaluation and torch.hub read


def slim(path):
    """Rewrite a finished run's checkpoint in place with only MODEL_KEYS: the optimizers, RNG states and
    partial-epoch sums that only --resume needs go (a CAT best.pt shrinks about threefold). Returns the
    keys dropped. The file is replaced atomically; a failure leaves it as it was."""
    ckpt = load_checkpoint(path)
    save({k: ckpt[k] for k in MODEL_KEYS if k in ckpt}, path)
    return sorted(set(ckpt) - set(MODEL_KEYS))


def load_weights(path, device="cpu"):
    """torch.load(weights_only=True): tensors and plain values only."""
    if os.path.isdir(path):
        inside = [n for n in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, n))]
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; " + (
            f"pass {os.path.join(path, inside[0])}" if inside else "pass the best.pt or last.pt that train.py wrote"))
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint; pass the best.pt or last.pt that train.py wrote")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        found = isinstance(e, pickle.UnpicklingError) and re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:                           # a pickle of objects: loading it would run code
            raise CheckpointError(f"{path}: refused, it holds more than tensors and plain values (it would import "
                                  f"{found[1]}); load only checkpoints written by train.py") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint (another kind of file, truncated or "
                              f"corrupt: {type(e).__name__}); use another copy or retrain") from None


def load_checkpoint(path, device="cpu"):
    """A train.py checkpoint, read with load_weights and checked to have its keys."""
    ckpt = load_weights(path, device)
    if not isinstance(ckpt, dict) or not TRAIN_KEYS <= set(ckpt):
        raise CheckpointError(f"{path}: not a train.py checkpoint (needs the keys model, config, epoch)")
    return ckpt


def from_checkpoint(ckpt, device="cpu"):
    """(classifier, mask network or None) rebuilt from a checkpoint dict, in eval mode."""
    cfg, g = ckpt["config"], None
    try:
        f = models.build(cfg["arch"], cfg["dataset"])
        f.load_state_dict(ckpt["model"])
        if ckpt.get("mask") is not None:
            g = models.build(models.MASKS[cfg["dataset"]], cfg["dataset"])
            g.load_state_dict(ckpt["mask"])
    except (KeyError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint does not match its own config ({first[:160]})") from None
    return f.to(device).eval(), (g.to(device).eval() if g is not None else None)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_hash(module):
    """16 hex digits of a sha256 over the module's structure (its repr) and its state_dict: every
    tensor's name, shape, dtype and bytes, in name order. The same loaded weights give the same hash
    whether they came from a checkpoint, a state_dict or a factory; any other weights, another."""
    digest = hashlib.sha256(repr(module).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        digest.update(f"\n{name} {tuple(t.shape)} {t.dtype}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _model(kind, f, dataset, g=None, config=None, arch=None, method=None, epoch=None):
    return {"kind": kind, "f": f, "g": g, "config": config, "dataset": dataset, "arch": arch, "method": method,
            "epoch": epoch}


def from_train_checkpoint(path, ckpt, dataset=None, arch=None, device="cpu"):
    """A train.py checkpoint: classifier, mask network (CAT) and config. A dataset or arch given
    must be the checkpoint's own."""
    cfg = ckpt["config"]
    for flag, wanted in (("dataset", dataset), ("arch", arch)):
        if wanted is not None and cfg.get(flag) != wanted:
            raise CheckpointError(f"{path} was trained with {flag} {cfg.get(flag)}, not --{flag} {wanted}; "
                                  f"drop --{flag} or pass a {wanted} checkpoint")
    if cfg.get("dataset") not in models.CLASSES:
        raise CheckpointError(f"{path}: unknown dataset {cfg.get('dataset')!r} in its config")
    f, g = from_checkpoint(ckpt, device)
    return _model("checkpoint", f, cfg["dataset"], g, cfg, cfg.get("arch"), cfg.get("method"), ckpt["epoch"])


def from_state_dict(path, weights, dataset=None, arch=None):
    """A plain state_dict of models.build(arch, dataset); 'module.' (DDP) and '_orig_mod.'
    (torch.compile) key prefixes are dropped."""
    if not (isinstance(weights, dict) and weights and all(torch.is_tensor(v) for v in weights.values())):
        raise CheckpointError(f"{path}: neither a train.py checkpoint (keys model, config, epoch) nor a "
                              "state_dict of tensors")
    if dataset is None or arch is None:
        raise CheckpointError(f"{path}: not a train.py checkpoint (needs the keys model, config, epoch); "
                              "for a plain state_dict pass --dataset and --arch")
    weights = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in weights.items()}
    f = models.build(arch, dataset)
    expected = f.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        raise CheckpointError(f"{path} does not fit --arch {arch} for {dataset}: {len(missing)} "
                              f"missing, {len(unexpected)} unexpected and {len(shapes)} mis-shaped keys "
                              f"(first: {first}); pass the arch it was saved from")
    f.load_state_dict(weights)
    return _model("state_dict", f, dataset, arch=arch)


def from_factory(source, dataset=None, arch=None):
    """`file.py:function`: the function's nn.Module (images in [0, 1] in, logits out). The file's
    folder is on sys.path while it runs, so it can import its neighbours."""
    path, function = source.rsplit(":", 1)
    if dataset is None:
        raise CheckpointError(f"{source}: a model factory needs --dataset, for the test set and the attack settings")
    if arch is not None:
        raise CheckpointError(f"--arch names a models.py architecture, but {source} builds its own model: drop --arch")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file (the model factory is given as path/to/file.py:function)")
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec = importlib.util.spec_from_file_location(f"factory_{sha256(path)[:12]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, function, None)):
            defined = [k for k, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == spec.name]
            raise CheckpointError(f"{path} has no function {function}(); it defines "
                                  f"{', '.join(defined) or 'none'}: pass {path}:one_of_them")
        f = getattr(module, function)()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{source} raised {one_line(e)}") from None
    finally:
        sys.path.pop(0)
    if not isinstance(f, torch.nn.Module):
        raise CheckpointError(f"{source} returned a {type(f).__name__}, not a torch.nn.Module")
    return _model("factory", f, dataset)


def load_model(source, dataset=None, arch=None, device="cpu"):
    """Any model source -> {kind, f, g, config, dataset, arch, method, epoch, source, label}, f in fp32
    eval mode on `device`: a train.py checkpoint, a state_dict (with dataset and arch) or file.py:function."""
    if re.fullmatch(r".+\.py:\w+", source):
        m, label = from_factory(source, dataset, arch), os.path.basename(source)
    else:
        weights = load_weights(source, device)
        if isinstance(weights, dict) and TRAIN_KEYS <= set(weights):
            m = from_train_checkpoint(source, weights, dataset, arch, device)
        else:
            m = from_state_dict(source, weights, dataset, arch)
        label = os.path.basename(os.path.dirname(os.path.abspath(source))) + "/" + os.path.basename(source)
    return {**m, "f": m["f"].to(device).float().eval(), "source": source, "label": label[-28:]}


def check_output(m, x):
    """Refuse a model whose forward pass on images x fails or does not give (N, classes) logits."""
    try:
        with torch.no_grad():
            out = m["f"](x)
    except Exception as e:
        raise CheckpointError(f"{m['source']}: its forward pass on {m['dataset']} test images raised "
                              f"{one_line(e)}") from None
    want = (len(x), models.CLASSES[m["dataset"]])
    got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
    if got != want:
        raise CheckpointError(f"{m['source']}: returns {got} for {len(x)} {m['dataset']} images; expected "
                              f"logits of shape {want}")
