"""Plumbing shared by the entry scripts (train.py, evaluate.py, bench.py): one-line errors, the '8/255'
number type, device choice, exact fp32, atomic writes, and the paper's test-time attack settings.
The method (cat.py, attacks.py, models.py, data.py) does not import this file.
"""
import argparse
import contextlib
import json
import os
import pathlib
import re
import sys

import torch

# The paper's test-time attacks (Sec. 5.1.1), in [0, 1] pixel units: PGD without random start,
# eps 0.3 / step 0.015 on MNIST and 8/255 / 0.003 on CIFAR; CW-inf as in FAT (30 steps, kappa 50).
TEST_ATTACK = {
    "mnist": dict(eps=0.3, alpha=0.015, cw_eps=0.3, cw_alpha=0.015, cw_steps=30, kappa=50.0),
    "cifar10": dict(eps=8 / 255, alpha=0.003, cw_eps=0.031, cw_alpha=0.003, cw_steps=30, kappa=50.0),
}
TEST_ATTACK["cifar100"] = TEST_ATTACK["cifar10"]


def fraction(text):
    """A float that may be written as a fraction: '0.3', '8/255'."""
    num, _, den = text.partition("/")
    try:
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line on stderr and exits with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def die(message, code=2):
    """One line on stderr naming the script, no traceback, exit `code` (2: bad input)."""
    print(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def pick_device(choice="auto", index=0):
    """'auto' | 'cpu' | 'cuda' -> torch.device, or one line and exit 2 when CUDA is asked for and absent."""
    if choice == "cuda" and not torch.cuda.is_available():
        die("--device cuda but no CUDA device is visible; use --device cpu")
    return torch.device("cuda", index) if choice != "cpu" and torch.cuda.is_available() else torch.device("cpu")


def bf16_available(device, cpuinfo="/proc/cpuinfo"):
    """Whether bf16 autocast pays off: a GPU that supports it, or a CPU with native bf16 instructions
    (avx512_bf16 or amx_bf16 among the flags in /proc/cpuinfo). oneDNN also runs bf16 on plain AVX-512 by
    emulating it, measured 3x slower than fp32 (MNIST CAT, one thread): that counts as no, and so does a
    CPU whose flags cannot be read (no /proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open(cpuinfo) as fh:
            flags = {word for line in fh if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def exact_fp32():
    """IEEE fp32 in every matmul and convolution (cuBLAS, cuDNN, oneDNN): no TF32, which torch uses for
    cuDNN convolutions by default and which rounds their inputs to 10 mantissa bits. bf16 autocast regions
    still run in bf16; everything outside them is the fp32 the paper's numbers assume."""
    torch.backends.fp32_precision = "ieee"


def write_atomic(path, write):
    """Call write(tmp_path), then rename over `path`: readers never see a half-written file, and an
    error or a kill half-way leaves the old file as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shorten(text, limit=160):
    """The first line of `text`, terminal colour codes removed, cut at a word with ' ...' past `limit`."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text)).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


def cause(e):
    """Why a file operation failed, in the system's plain words ('No space left on device', 'Read-only
    file system', 'Permission denied'), else the exception's first line."""
    return getattr(e, "strerror", None) or shorten(f"{type(e).__name__}: {e}")


def unwritable(path):
    """Why `path` cannot be written, in a few words, or None. Tried for real before any work starts (a
    probe file beside it, removed): an empty name, a folder, a missing folder, a read-only or full disk."""
    if not path:
        return "the name is empty; name a file"
    if os.path.isdir(path):
        return "is a folder; name a file (inside it)"
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return "its folder does not exist; create it first"
    probe = f"{path}.tmp{os.getpid()}"
    try:
        with open(probe, "w") as fh:
            fh.write("probe")
    except OSError as e:
        return f"cannot be written here ({cause(e)}); choose another folder"
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None


def write_json(obj, path):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=1)))
