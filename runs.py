"""A run on disk: the --out folder and what train.py keeps in it.

    config.json     the resolved flags (written when the run starts, or at its first save under --overwrite)
    last.pt         everything --resume needs: networks, optimizers, RNG, progress, every epoch's metrics
    best.pt         the same at the epoch with the best validation natural + PGD-20 accuracy
    metrics.jsonl   one line per finished epoch, never ahead of last.pt

train.py calls open_run before loading anything, begin once the networks exist, save_epoch after each
validation and stop_and_save after a Ctrl-C; StopFlag turns Ctrl-C and SIGTERM into a save. Nothing of an
old run in --out is removed until the run that --overwrite replaces it with has saved its first checkpoint.
"""
import json
import os
import pathlib
import shlex
import signal
import sys
from contextlib import suppress
from dataclasses import dataclass, field

import torch

import checkpoints
import common
import config

FILES = ("config.json", "metrics.jsonl", "best.pt", "last.pt")


@dataclass
class State:
    """Where a run stands, in one place: the loop moves it on, last.pt stores it."""
    epoch: int = 1                  # the epoch in progress, 1-based
    step: int = 0                   # its batches done (non-zero at the start only after a Ctrl-C)
    sums: dict = field(default_factory=dict)     # logged name -> sum over those batches
    seconds: float = 0.0            # their training time
    best: dict = field(default_factory=lambda: {"score": -1.0, "epoch": 0, "pgd20": 0.0})  # % on val
    history: list = field(default_factory=list)  # metrics.jsonl's lines of the epochs completed
    saved: tuple = None             # (epochs completed, batches of the next) that last.pt holds; None: no last.pt
    replaces: bool = False          # --overwrite over an old run: remove it at the first save

    @property
    def record(self):
        return self.history[-1] if self.history else None


def resume_command(out):
    return f"python train.py --out {shlex.quote(out)} --resume"


def on_disk(out, state):
    """What --out holds now, said for an error message."""
    last = os.path.join(out, "last.pt")
    if state.replaces and state.saved is None:
        return f"the run that was in {out} is kept as it was (--overwrite replaces it at the first save)"
    if state.saved is None or not os.path.isfile(last):
        return "nothing of this run is saved yet"
    epoch, step = state.saved
    where = f"batch {step} of epoch {epoch + 1}" if step else f"the end of epoch {epoch}"
    return f"{last} holds the run at {where}; continue with: {resume_command(out)}"


# ============================================================================ opening a run

def check_out(out):
    """One line and exit 2 unless --out is a folder, or can be made one, that this process may write in."""
    if not out.strip():
        common.die("--out is empty; name the folder the run goes in, e.g. --out runs/r1")
    path = os.path.abspath(out)
    while not os.path.exists(path):         # the deepest part of the path that exists
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(out) else f"lies under the file {path}"
        common.die(f"--out {out} {where}, not a folder; choose another --out")
    if not os.access(path, os.W_OK | os.X_OK):
        common.die(f"--out {out}: {path} is not writable; choose another --out")


def open_run(cfg):
    """(cfg, None) for a new run, refusing an --out that holds one unless --overwrite; with --resume, the
    resumed run's config (see config.resumed) and its checkpoint. A finished run resumed without a larger
    --epochs says so and exits 0."""
    check_out(cfg["out"])
    last = os.path.join(cfg["out"], "last.pt")
    if not cfg["resume"]:
        held = [n for n in FILES[1:] if os.path.exists(os.path.join(cfg["out"], n))]
        if held and not cfg["overwrite"]:
            how = "--resume to continue it, " if "last.pt" in held else ""
            common.die(f"{cfg['out']} already holds a run ({', '.join(held)}); pass {how}--overwrite to replace it, "
                       "or choose another --out")
        return cfg, None
    if not os.path.isfile(last):
        common.die(f"--resume: {last} does not exist; start the run without --resume")
    try:
        ckpt = checkpoints.load_checkpoint(last)
    except checkpoints.CheckpointError as e:
        common.die(f"--resume: {e}")
    cfg = config.resumed(cfg, ckpt["config"])
    if ckpt["epoch"] >= cfg["epochs"]:
        if os.environ.get("RANK", "0") == "0":
            print(f"{cfg['out']} has finished: epochs trained {ckpt['epoch']}, --epochs {cfg['epochs']}; nothing "
                  f"to do (to train longer, resume with a larger --epochs)", flush=True)
        sys.exit(0)
    return cfg, ckpt


def begin(cfg, nets, ckpt, main=True, log=print):
    """The run's State: restored from ckpt (metrics.jsonl made to agree with it), or new. A new run writes
    config.json now, unless an old run is in --out: that stays until the first save."""
    if ckpt is not None:
        state = restore(nets, ckpt)
        if main:
            state.history = reconcile_metrics(cfg["out"], ckpt, log)   # every line, also those an older last.pt lacks
            write_config(cfg)
        return state
    state = State(replaces=any(os.path.exists(os.path.join(cfg["out"], n)) for n in FILES[1:]))
    if main and not state.replaces:
        try:
            os.makedirs(cfg["out"], exist_ok=True)
        except OSError as e:
            common.die(f"--out {cfg['out']}: {checkpoints.one_line(e)}")
        write_config(cfg)
    return state


def write_config(cfg):
    path = os.path.join(cfg["out"], "config.json")
    try:
        common.write_json(saved_config(cfg), path)
    except OSError as e:
        common.die(f"could not write {path} ({checkpoints.one_line(e)})", 1)


def saved_config(cfg):
    return {k: v for k, v in sorted(cfg.items()) if k != "explicit"}


def restore(nets, ckpt):
    """Networks, optimizers and RNG as the checkpoint left them; returns the run's State."""
    try:
        nets.f.load_state_dict(ckpt["model"])
        nets.opt_f.load_state_dict(ckpt["opt_f"])
        if nets.g is not None:
            nets.g.load_state_dict(ckpt["mask"])
            nets.opt_g.load_state_dict(ckpt["opt_g"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        common.die(f"--resume: the checkpoint does not fit this run ({str(e).splitlines()[0][:160]})")
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    partial = ckpt["partial"]
    return State(ckpt["epoch"] + 1, ckpt["step"], dict(partial.get("sums", {})), partial.get("seconds", 0.0),
                 ckpt["best"], history_of(ckpt), (ckpt["epoch"], ckpt["step"]))


def history_of(ckpt):
    """Every completed epoch's metrics line the checkpoint holds (checkpoints saved before "history" hold the
    last one only, as "metrics")."""
    if ckpt.get("history") is not None:
        return list(ckpt["history"])
    return [ckpt["metrics"]] if ckpt.get("metrics") else []


def reconcile_metrics(out, ckpt, log=print):
    """metrics.jsonl as last.pt has it: lines of epochs the checkpoint has not completed go (a crash after the
    line was written and before last.pt was), and so does a half-written line; the epochs' lines the file
    lacks are written back from the checkpoint, and those it cannot give back are named. Returns the lines."""
    path, lines = os.path.join(out, "metrics.jsonl"), []
    with suppress(FileNotFoundError):
        lines = open(path).read().splitlines()
    kept = {}
    for line in lines:
        with suppress(ValueError):
            r = json.loads(line)
            if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] <= ckpt["epoch"]:
                kept[r["epoch"]] = r
    for r in history_of(ckpt):
        kept.setdefault(r["epoch"], r)
    records = [kept[e] for e in sorted(kept)]
    lost = [e for e in range(1, ckpt["epoch"] + 1) if e not in kept]
    if lost:
        log(f"WARNING: {path} lacks epoch(s) {', '.join(map(str, lost))}, and last.pt (saved before it kept every "
            "epoch's line) cannot give them back")
    if [json.dumps(r) for r in records] != lines:
        text = "".join(json.dumps(r) + "\n" for r in records)
        common.write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))
    return records


# ============================================================================ an epoch's end

def has_collapsed(best_pgd20, pgd20):
    """Catastrophic overfitting: validation PGD-20 accuracy (%) fell below half of its best,
    once the run had been robust at all (best >= 10%)."""
    return best_pgd20 >= 10 and pgd20 < best_pgd20 / 2


def finish_epoch(state, record, nat, rob, log=print):
    """Add the epoch's metrics line and move state on to the next epoch. nat, rob: validation accuracy (%).
    Returns (improved: natural + PGD-20 is the best so far, so the epoch becomes best.pt; collapsed)."""
    epoch, best = record["epoch"], state.best
    collapsed = has_collapsed(best["pgd20"], rob)
    improved = nat + rob > best["score"]
    if improved:
        best.update(score=nat + rob, epoch=epoch)
    best["pgd20"] = max(rob, best["pgd20"])
    state.epoch, state.step, state.sums, state.seconds = epoch + 1, 0, {}, 0.0
    state.history.append(record)
    log(f"epoch {epoch}: val natural {nat:.2f}% PGD-20 {rob:.2f}% (train {fmt_time(record['seconds'])}, "
        f"validation {fmt_time(record['val_seconds'])})" +
        ("  WARNING: robust accuracy collapsed (catastrophic overfitting?)" if collapsed else ""))
    if not 0.01 <= record.get("mask", 0.5) <= 0.99:
        log(f"WARNING: the mean mask was {record['mask']:.4f} over epoch {epoch}: x_cali is "
            f"{'x' if record['mask'] < 0.01 else 'x + delta'}, so this is not CAT (the mask collapse; see README)")
    return improved, collapsed


# ============================================================================ saving

def checkpoint(nets, cfg, state):
    """Everything a run needs to continue: plain state_dicts, optimizers, RNG, progress.
    epoch: epochs completed; step, partial: batches of epoch+1 already done and their sums;
    metrics: metrics.jsonl's line of epoch `epoch`; history: every line, so a resume can write what is missing."""
    partial = {"sums": {k: float(v) for k, v in state.sums.items()}, "seconds": state.seconds} if state.step else {}
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return {"model": nets.f.state_dict(), "mask": nets.g.state_dict() if nets.g else None,
            "opt_f": nets.opt_f.state_dict(), "opt_g": nets.opt_g.state_dict() if nets.g else None,
            "config": saved_config(cfg), "epoch": state.epoch - 1, "step": state.step, "partial": partial,
            "best": dict(state.best), "rng": rng, "metrics": state.record, "history": list(state.history)}


def save(obj, path, cfg, state, last=False):
    """checkpoints.save, or one line naming the file, the cause, what --out still holds and how to go on, and
    exit 1 (the copy already there stays intact). The first save of an --overwrite run removes the old run."""
    if state.replaces:
        replace_old_run(cfg)
        state.replaces = False
    try:
        checkpoints.save(obj, path)
    except checkpoints.CheckpointError as e:
        common.die(f"{e}; {on_disk(cfg['out'], state)}", 1)
    if last:
        state.saved = (obj["epoch"], obj["step"])


def replace_old_run(cfg):
    """--overwrite, at the new run's first save: the old run's files go, the new config.json comes."""
    for name in FILES[1:]:
        with suppress(FileNotFoundError):
            os.remove(os.path.join(cfg["out"], name))
    write_config(cfg)


def save_epoch(nets, cfg, state, improved):
    """best.pt (when improved), then last.pt, then metrics.jsonl's line, so the line is never ahead of last.pt."""
    ckpt = checkpoint(nets, cfg, state)
    if improved:
        save(ckpt, os.path.join(cfg["out"], "best.pt"), cfg, state)
    save(ckpt, os.path.join(cfg["out"], "last.pt"), cfg, state, last=True)
    path = os.path.join(cfg["out"], "metrics.jsonl")
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(state.record) + "\n")
    except OSError as e:
        common.die(f"could not add epoch {state.record['epoch']} to {path} ({checkpoints.one_line(e)}); last.pt "
                   f"holds it and --resume writes the line: {resume_command(cfg['out'])}", 1)


# ============================================================================ progress

def fmt_time(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_eta(cfg, state, n_batches, rate):
    """Time to the end of the run at `rate` steps per second, with each validation taking as long as the last
    one did; before the first one, its time is not known and the text says so."""
    val_s = (state.record or {}).get("val_seconds")
    left = cfg["epochs"] - state.epoch
    seconds = ((n_batches - state.step) + left * n_batches) / rate + (left + 1) * (val_s or 0.0)
    return fmt_time(seconds) + (" + validation" if val_s is None else "")


def progress_line(cfg, state, n_batches, rate):
    """The line a person reads while an epoch trains (`rate`: batches per second); metrics.jsonl has the rest."""
    shown = [f"{k} {state.sums[k].item() / state.step:.3f}" for k in ("loss_f", "mask") if k in state.sums]
    return (f"epoch {state.epoch} [{state.step}/{n_batches}] {rate * cfg['batch_size']:.0f} img/s, ETA epoch "
            f"{fmt_time((n_batches - state.step) / rate)} run {run_eta(cfg, state, n_batches, rate)}, " + " ".join(shown))


# ============================================================================ stopping

class StopFlag:
    """First Ctrl-C (or SIGTERM) asks the loop to save and stop after the current step; a second one ends the
    process at once with one line. restore() gives the signals back to whoever had them (a notebook, a test)."""

    def __init__(self):
        self.set = False
        self.where = lambda: "nothing of this run is saved yet"     # what --out holds; train.py sets it
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.set:
            common.die(f"{name} again: stopped without saving this batch; {self.where()}", 130)
        self.set = True
        print(f"\n{name}: stopping after this batch and saving; a second Ctrl-C or SIGTERM stops without saving",
              flush=True)


def stop_and_save(nets, cfg, state, main=True, log=print):
    """After a Ctrl-C: last.pt holds the run as it stands (in validation: all batches trained, so a resume
    validates again), the resume command is printed, exit 130."""
    last = os.path.join(cfg["out"], "last.pt")
    if main:
        save(checkpoint(nets, cfg, state), last, cfg, state, last=True)
    log(f"saved {last} at epoch {state.epoch}, batch {state.step}; continue with: {resume_command(cfg['out'])}")
    sys.exit(130)
