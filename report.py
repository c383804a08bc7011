"""Every table and picture: from finished runs, mean +- sd over seeds, the per-epoch validation table
and the per-epoch curves of several runs in one figure (PNG, PDF, SVG, ...: its extension decides); for evaluate.py, its table, CSV, eps curve,
Figure-2 grid and progress lines (it prints through this file; this file imports no entry script).

    python report.py runs/cat_s0 runs/cat_s1 runs/cat_s2 runs/at_s0 runs/at_s1 --eval eval.json
    python report.py results/mnist_at_0.3 results/mnist_cat_cw_0.3 --epochs --curves curves.png
    python report.py "seed 1=results/diag_cat_cent/seed1.jsonl" results/mnist_cat_cent_0.3 --epochs

A run is a train.py output folder (config.json or best.pt's config, metrics.jsonl and, with
--eval, the evaluate.py JSON of that name in it) or a bare metrics.jsonl file. `label=run` names
a column. Of the evaluation, the complete rows of the run's best.pt (by the hash of its weights)
are taken; a folder without best.pt takes the rows of the one model its JSON holds. Runs whose
configs differ only in NOT_THE_EXPERIMENT (the seed, where and on what device they ran) form
one group; the seeds table gives each number of a group as mean +- sd over its runs (sample
standard deviation, n - 1), n the values behind each cell, and says when seeds were evaluated on
different numbers of test images. Runs of one experiment that share a seed are not seeds: each is a row
of its own, marked with its path; a run that stopped before its config's epochs is marked. The test
images behind the test columns are said under the table, or in each test cell when they differ.
Accuracies are in %.
"""
import contextlib
import csv
import json
import logging
import math
import os
import sys
import threading
import time

import checkpoints
import common
import verdicts
from common import OneLineParser, die
from config import RESUMABLE, saved_settings
METHODS = {"at": "AT", "trades": "TRADES", "mart": "MART", "fat": "FAT"}
# Where and how a run ran, not what it trained: runs that differ only in these are seeds of one experiment;
# the data's source among them, since both MNIST sources give the same split.
NOT_THE_EXPERIMENT = (RESUMABLE - {"epochs", "stop_on_collapse"}) | {"seed", "data_source"}


# ============================================================================ reading runs

def read_json(path, lines=False):
    """A JSON file (lines: the records of a JSON-lines file); a file that cannot be read is a
    ValueError that names it (and the line of a JSON-lines file)."""
    where = path
    try:
        with open(path) as fh:
            if not lines:
                return json.load(fh)
            records = []
            for number, line in enumerate(fh, 1):
                where = f"{path}, line {number}"
                if line.strip():
                    records.append(json.loads(line))
            return records
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if lines else f"line {e.lineno}, column {e.colno}"
        raise ValueError(f"{where}: not JSON ({e.msg} at {at})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: binary bytes, not JSON text (truncated, corrupt or another kind of file)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {checkpoints.one_line(e)}") from None


def read_config(folder):
    """A run folder's config with the settings it ran with (config.saved_settings: a saved null start is eps):
    config.json, else the one saved in best.pt or last.pt; None if neither."""
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        return saved_settings(read_json(path))
    for name in ("best.pt", "last.pt"):
        if os.path.isfile(os.path.join(folder, name)):
            return saved_settings(checkpoints.load_checkpoint(os.path.join(folder, name))["config"])
    return None


def eval_rows(path, folder):
    """The complete rows of the evaluate.py JSON at `path` that belong to the run in `folder`: those of
    its best.pt's weights, or, without a best.pt, all of them if they are of one model."""
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise ValueError(f"{path}: not an evaluate.py JSON (no \"models\" list)")
    rows = [r for r in doc["models"] if isinstance(r, dict) and r.get("complete")]
    best = os.path.join(folder, "best.pt")
    if os.path.isfile(best):
        try:
            weights = checkpoints.weights_hash(checkpoints.load_model(best)["f"])
        except checkpoints.CheckpointError as e:
            raise ValueError(str(e) if best in str(e) else f"{best}: {e}") from None
        return [r for r in rows if r.get("weights") == weights]
    if len({r.get("weights") for r in rows}) > 1:
        raise ValueError(f"{path}: evaluations of several models and no {best} to tell which is this run's")
    return rows


def read_run(arg, eval_name=None):
    """{label, path, config, epochs (metrics.jsonl records), evals (evaluate.py rows)} for `arg`."""
    label, _, path = arg.rpartition("=") if "=" in arg and os.path.exists(arg.rpartition("=")[2]) else ("", "", arg)
    if os.path.isfile(path) and path.endswith((".pt", ".pth")):
        checkpoints.load_checkpoint(path)          # a truncated or foreign file: a CheckpointError that says so
        die(f"{path} is a checkpoint; report.py reads runs: pass its folder {os.path.dirname(path) or '.'}")
    if os.path.isfile(path):
        run = {"path": path, "config": None, "metrics": path, "evals": []}
        label = label or os.path.splitext(os.path.basename(path))[0]
    elif os.path.isdir(path):
        run = {"path": path, "config": read_config(path), "metrics": os.path.join(path, "metrics.jsonl"), "evals": []}
        if eval_name:
            found = os.path.join(path, eval_name)
            if not os.path.isfile(found):
                die(f"{found}: no such evaluation; run evaluate.py with --json {found}, or drop --eval")
            run["evals"] = eval_rows(found, path)
    else:
        die(f"{path}: neither a run folder nor a metrics.jsonl file")
    if not os.path.isfile(run["metrics"]):
        die(f"{run['metrics']}: no such file; pass a folder written by train.py")
    records = read_json(run["metrics"], lines=True)
    return {**run, "label": label, "epochs": [r for r in records if isinstance(r, dict) and "epoch" in r]}


# ============================================================================ grouping and statistics

def mean_sd(values):
    """(mean, sample standard deviation with n - 1; None for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None)


def experiment(config):
    """The part of a config that defines the experiment, as a hashable key."""
    if config is None:
        return None
    return json.dumps({k: v for k, v in sorted(config.items()) if k not in NOT_THE_EXPERIMENT})


def base_label(config):
    """AT(0.3), TRADES(0.3), CAT_cent(0.3), ...; CIFAR budgets in /255."""
    method = config.get("method", "?")
    name = f"CAT_{config.get('attack')}" if method == "cat" else METHODS.get(method, method)
    eps = config.get("eps")
    budget = f"{eps:g}" if config.get("dataset") == "mnist" or eps is None else f"{round(eps * 255)}/255"
    return f"{name}({budget})"


def group_runs(runs):
    """[(label, [runs])], runs of one experiment together, in the order first seen. Groups that
    would share a label get the config values that tell them apart. Runs of one experiment that share
    a seed are copies or reruns, not seeds: each is a group of its own, named by its path, and marked."""
    groups = {}
    for i, run in enumerate(runs):
        key = experiment(run["config"]) or f"run {i}"
        groups.setdefault(key, []).append(run)
    apart = {}
    for key, members in groups.items():
        seeds = [(m["config"] or {}).get("seed") for m in members]
        if len(set(seeds)) == len(seeds):
            apart[key] = members
        else:
            apart.update({f"{key} {i}": [{**m, "shares_seed": True}] for i, m in enumerate(members)})
    groups, labelled = apart, []
    for key, members in groups.items():
        cfg = members[0]["config"]
        label = members[0]["label"] or (base_label(cfg) if cfg else members[0]["path"])
        twins = [m[0]["config"] for k, m in groups.items() if k != key and m[0]["config"]
                 and not m[0]["label"] and cfg and base_label(m[0]["config"]) == base_label(cfg)]
        differ = sorted(k for k in cfg or {} if k not in NOT_THE_EXPERIMENT and any(t.get(k) != cfg[k] for t in twins))
        if differ and not members[0]["label"]:
            label += ", " + ", ".join(f"{k} {cfg[k]}" for k in differ)
        if members[0].get("shares_seed") and not members[0]["label"]:
            label += f" [{members[0]['path']}]"
        labelled.append((label, members))
    return labelled


def best_epoch(epochs):
    """The record train.py keeps as best.pt: the first epoch with the highest validation natural + PGD-20."""
    return max(epochs, key=lambda r: r["val_natural"] + r["val_pgd20"]) if epochs else None


def run_numbers(run):
    """{column: (value, test images or None)} of one run: best epoch and its validation numbers, then
    each evaluated attack (and Worst) at each eps."""
    numbers = {}
    best = best_epoch(run["epochs"])
    if best:
        numbers.update({"best epoch": (best["epoch"], None), "val natural": (best["val_natural"], None),
                        "val PGD-20": (best["val_pgd20"], None)})
    for row in run["evals"]:
        for attack, value in row["accuracy"].items():
            if attack != "avg":
                numbers[(attack, row.get("eps"))] = (value, row.get("n_test"))
    return numbers


# ============================================================================ tables

def column_name(col, several_eps):
    if isinstance(col, str):
        return col
    attack, eps = col
    name = "Worst" if attack == "worst" else verdicts.title(attack) if verdicts.known(attack) else attack
    return f"{name} (eps {eps:g})" if several_eps and eps is not None else name


def count(n):
    return f"{n:,}" if isinstance(n, int) else "?"


def cell(values, digits, n=None, images=None):
    """mean ± sd of the values, with their number when it is below the n of the row, and the test images
    behind each value when `images` lists them."""
    if not values:
        return "-"
    mean, sd = mean_sd(values)
    said = [f"n={len(values)}"] if n and len(values) < n else []
    said += [f"{'/'.join(count(k) for k in dict.fromkeys(images))} images"] if images else []
    return (f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")
            + (f" ({'; '.join(said)})" if said else ""))


def stopped_early(run):
    """(epochs done, epochs of its config) of a run that stopped before its config's epochs, else None."""
    done, planned = max((r["epoch"] for r in run["epochs"]), default=0), (run["config"] or {}).get("epochs")
    return (done, planned) if planned and done < planned else None


def seed_of(run):
    """The run's seed, and the epochs it finished when it stopped early."""
    early = stopped_early(run)
    return str((run["config"] or {}).get("seed", "-")) + (f" ({early[0]} of {early[1]} epochs)" if early else "")


def seeds_table(groups):
    """Markdown: one line per group, each number as mean ± sd over the group's runs; n, the values
    behind each cell (a range when they differ, each cell below its top giving its own); the test
    images behind the test columns, once under the table or, when the table holds several numbers of
    them, in every test cell; a line for each number averaged over seeds evaluated on different numbers
    of test images; and what is marked: unfinished runs, runs that share a seed."""
    numbers = [[run_numbers(r) for r in members] for _, members in groups]
    cols = list(dict.fromkeys(c for rows in numbers for row in rows for c in row))
    several_eps = len({c[1] for c in cols if isinstance(c, tuple)}) > 1
    sizes = list(dict.fromkeys(k for rows in numbers for row in rows for c in row if isinstance(c, tuple)
                               for k in [row[c][1]]))
    head = ["run", "n", "seeds", *[column_name(c, several_eps) for c in cols]]
    lines, notes = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)], []
    for (label, members), rows in zip(groups, numbers):
        seeds = ", ".join(seed_of(m) for m in members)
        values = {c: [row[c] for row in rows if c in row] for c in cols}
        counts = sorted({len(v) for v in values.values() if v})
        n = counts[-1] if counts else 0
        n_text = "0" if not counts else str(n) if len(counts) == 1 else f"{counts[0]}-{n}"
        cells = [cell([v for v, _ in values[c]], (1 if len(members) > 1 else 0) if c == "best epoch" else 2, n,
                      [k for _, k in values[c]] if isinstance(c, tuple) and len(sizes) > 1 else None) for c in cols]
        lines.append("| " + " | ".join([label, n_text, seeds, *cells]) + " |")
        notes += [f"{label}, {column_name(c, several_eps)}: seeds evaluated on different numbers of test images "
                  f"({', '.join(count(k) for _, k in values[c])}); the mean mixes them"
                  for c in cols if len({k for _, k in values[c]}) > 1]
    said = "n: the runs (seeds) behind each number, mean ± sd over them; accuracy in %"
    notes.insert(0, said + (f"; test columns on {count(sizes[0])} test images" if len(sizes) == 1 else ""))
    if any(m.get("shares_seed") for _, members in groups for m in members):
        notes.append("[path]: runs of one experiment with the same seed, listed one by one, not averaged as seeds")
    if any(stopped_early(m) for _, members in groups for m in members):
        notes.append("(k of N epochs): a run that stopped before its config's epochs; its numbers come from those k")
    return "\n".join(lines + [""] + notes)


def run_labels(groups):
    """One label per run: its group's, with the seed when the group holds several runs."""
    return [(label if len(members) == 1 else f"{label}, seed {(m['config'] or {}).get('seed')}", m)
            for label, members in groups for m in members]


def epochs_table(groups):
    """Markdown: validation natural / PGD-20 (%) per epoch and run, the mean mask in brackets."""
    runs = run_labels(groups)
    last = max((r["epoch"] for _, run in runs for r in run["epochs"]), default=0)
    lines = ["| epoch | " + " | ".join(label for label, _ in runs) + " |", "|---|" + "---|" * len(runs)]
    for epoch in range(1, last + 1):
        cells = []
        for _, run in runs:
            rec = next((r for r in run["epochs"] if r["epoch"] == epoch), None)
            cells.append("-" if rec is None else f"{rec['val_natural']:.1f} / {rec['val_pgd20']:.1f}"
                         + (f" ({rec['mask']:.2f})" if "mask" in rec else ""))
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Per-epoch statistics averaged over a group's seeds: (metrics.jsonl key, column, digits).
EPOCH_MEANS = (("val_natural", "val natural", 1), ("val_pgd20", "val PGD-20", 1), ("mask", "mean mask", 3),
               ("mask_lo", "mask < 0.01", 3), ("z_q50", "median z", 1))
COLLAPSED_BELOW = 5.0    # % validation PGD-20: the run trains no robustness (the mask collapse)


def epoch_means_table(groups):
    """Markdown: per group and epoch, mean ± sd over the group's runs of the validation accuracies
    and the mask statistics, and how many runs sat below COLLAPSED_BELOW% PGD-20."""
    keys = [k for k in EPOCH_MEANS if any(k[0] in r for _, ms in groups for m in ms for r in m["epochs"])]
    head = ["run", "epoch", "n", *[name for _, name, _ in keys], f"val PGD-20 < {COLLAPSED_BELOW:g}%"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, members in groups:
        for epoch in range(1, max((r["epoch"] for m in members for r in m["epochs"]), default=0) + 1):
            recs = [r for m in members for r in m["epochs"] if r["epoch"] == epoch]
            cells = [cell([r[k] for r in recs if k in r], d) for k, _, d in keys]
            low = sum(r["val_pgd20"] < COLLAPSED_BELOW for r in recs)
            lines.append("| " + " | ".join([label, str(epoch), str(len(recs)), *cells, f"{low}/{len(recs)}"]) + " |")
    return "\n".join(lines)


# ============================================================================ curves

def extension(path):
    """'pdf' for 'c.PDF': the format matplotlib and Pillow are told to write (the temporary name has none)."""
    return os.path.splitext(path)[1][1:].lower()


def format_problem(path, formats, who):
    """Why `path` cannot be written: its extension names no format of `formats` (what `who` writes); or None."""
    ext = extension(path)
    if ext not in formats:
        shown = ", ".join(f".{f}" for f in sorted(formats)[:16]) + (", ..." if len(formats) > 16 else "")
        return f"{'.' + ext if ext else 'no extension'}: not a format {who} writes; end the name in one of {shown}"
    return None


def figure_problem(path):
    """Why matplotlib cannot write `path` (savefig follows its extension: .png, .pdf, .svg, ...), or None."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return None                                  # the caller says how to install matplotlib
    return format_problem(path, FigureCanvasBase.get_supported_filetypes(), "matplotlib")


def image_problem(path):
    """Why Pillow cannot write the Figure-2 grid to `path` (it follows its extension), or None."""
    from PIL import Image
    Image.init()
    return format_problem(path, {e[1:] for e, f in Image.registered_extensions().items() if f in Image.SAVE}, "Pillow")


def plot_curves(groups, path):
    """Validation natural, PGD-20 and mean mask against epoch, one line per run, three panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = (("val_natural", "validation natural accuracy (%)"), ("val_pgd20", "validation PGD-20 accuracy (%)"),
              ("mask", "mean mask M (CAT)"))
    runs = run_labels(groups)
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    for i, (label, run) in enumerate(runs):
        for ax, (key, _) in zip(axes, panels):          # one colour per run in every panel
            points = [(r["epoch"], r[key]) for r in run["epochs"] if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=colors[i % len(colors)],
                        label=label if key == "val_natural" else None)
    for ax, (key, name) in zip(axes, panels):
        ax.set(xlabel="epoch", ylabel=name, ylim=(-0.03, 1.03) if key == "mask" else (-2, 102))
        ax.grid(alpha=0.3)
    rows = math.ceil(len(runs) / 5)
    fig.legend(loc="lower center", ncol=min(5, len(runs)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    common.write_atomic(path, lambda tmp: fig.savefig(tmp, format=extension(path), dpi=110))
    plt.close(fig)


# ============================================================================ evaluation tables (evaluate.py prints through these)

def row_label(row, rows):
    """The model's label, with the eps when the table has more than one eps for it."""
    several = sum(r["source"] == row["source"] for r in rows) > 1
    return f"{row['model']} eps {row['eps']:.4g}" if several else row["model"]


def columns(names):
    return list(names) + ["avg"] + (["worst"] if len(names) >= 2 else [])


def eval_table(rows, names):
    """The paper's Table 2 layout, one row per model and eps, then Worst, then the noise level,
    sanity numbers and flags."""
    cols = columns(names)
    heads = {"avg": "Avg", "worst": "Worst"}
    lines = [f"{'model':<28}{'eps':>9}" + "".join(f"{heads.get(c) or verdicts.title(c):>9}" for c in cols)]
    for r in rows:
        cells = "".join(f"{r['accuracy'][c]:>9.2f}" if c in r["accuracy"] else f"{'-':>9}" for c in cols)
        lines.append(f"{r['model']:<28}{r['eps']:>9.4g}" + cells)
    lines.append(f"accuracy in % on n = {', '.join(str(n) for n in dict.fromkeys(r['n_test'] for r in rows))} "
                 f"test images; binomial standard error <= {50 / math.sqrt(min(r['n_test'] for r in rows)):.2f} "
                 "points. Avg: mean of the columns before it"
                 + ("; Worst: survives every attack run, natural included" if "worst" in cols else ""))
    for r in rows:
        if "sanity" in r:
            lines.append(f"sanity {r['model']}: PGD-20 at eps 0 {r['sanity']['eps0']:.2f}% (natural must match), "
                         f"PGD-100 at eps {r['sanity']['large_eps_value']} {r['sanity']['large_eps']:.2f}% (must be ~0)")
        if "masks" in r:
            mk = r["masks"]
            lines.append(f"mask {r['model']}: mean {mk['mean']:.3f}, bright pixels {mk['mean_bright']:.3f}, "
                         f"dark pixels {mk['mean_dark']:.3f} (PGD-20 at eps {mk['eps']:.4f})")
    flags = [f"  {row_label(r, rows)}: {line}" for r in rows for line in r["flags"]]
    lines.append("flags: none" if not flags else "FLAGS (check before trusting the table):")
    return "\n".join(lines + flags)


def write_csv(rows, names, path):
    """The table as CSV: one line per model and eps, accuracy in %; empty where an attack did not finish."""
    cols = columns(names)

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["model", "source", "dataset", "eps", "n_test", *cols])
            for r in rows:
                out.writerow([r["model"], r["source"], r["dataset"], r["eps"], r["n_test"],
                              *[r["accuracy"].get(c, "") for c in cols]])
    common.write_atomic(path, write)


def plot_curve(rows, names, path):
    """Accuracy against eps, one line per attack (and Worst) and model, in the format of path's extension."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sources = list(dict.fromkeys(r["source"] for r in rows))
    for source in sources:
        mine = sorted((r for r in rows if r["source"] == source), key=lambda r: r["eps"])
        for c in [*names, "worst"]:
            points = [(r["eps"], r["accuracy"][c]) for r in mine if c in r["accuracy"]]
            if points:
                name = "Worst" if c == "worst" else verdicts.title(c)
                ax.plot(*zip(*points), marker="o", linestyle="--" if c == "worst" else "-",
                        label=f"{mine[0]['model']}: {name}" if len(sources) > 1 else name)
    ax.set(xlabel="eps (L-inf, pixel units in [0, 1])", ylabel="test accuracy (%)", ylim=(-2, 102),
           title=f"{', '.join(str(n) for n in dict.fromkeys(r['n_test'] for r in rows))} test images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.write_atomic(path, lambda tmp: fig.savefig(tmp, format=extension(path), dpi=120))
    plt.close(fig)


def save_grid(rows, path):
    """Four rows (natural, adversarial, mask, calibrated) as one image in the format of path's extension,
    written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid, save_image
    grid = make_grid(rows, nrow=len(rows) // 4, padding=2, pad_value=1.0)
    kind = Image.registered_extensions()[f".{extension(path)}"]
    common.write_atomic(path, lambda tmp: save_image(grid, tmp, format=kind))


# ============================================================================ progress lines while evaluate.py runs

def say(text):
    """One line on stdout at once (the progress thread writes too)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Progress:
    """A line every `every` seconds while an attack runs, written by a background thread, since
    one batch of an attack can take many minutes: the attack, test images done out of the total,
    robust accuracy so far and the ETA."""

    def __init__(self, every, log=say):
        self.every, self.log = every, log

    @contextlib.contextmanager
    def running(self, what, total, done=0, n_correct=0):
        self.what, self.total, self.state = what, total, (done, n_correct)
        self.start, self.t0, stop = done, time.time(), threading.Event()
        thread = threading.Thread(target=self._loop, args=(stop,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def update(self, done, n_correct):
        self.state = (done, n_correct)

    def _loop(self, stop):
        while not stop.wait(self.every):
            self.log(self.line())

    def line(self):
        (done, n_correct), elapsed = self.state, time.time() - self.t0
        new = done - self.start           # images done in this run (a resumed one starts later)
        so_far = ("first batch running, " if not done else "" if n_correct is None      # None: mask statistics
                  else f"{100 * n_correct / done:.2f}% robust so far, ")
        eta = f"ETA {elapsed / new * (self.total - done):.0f} s" if new else "ETA after the first batch"
        return f"  {self.what}: {done}/{self.total} images, {so_far}{elapsed:.0f} s, {eta}"


@contextlib.contextmanager
def autoattack_log(log, notes):
    """AutoAttack's own progress (its logger's debug lines) shown as it runs, and its warnings
    (the authors' checks: zero gradients, Square beating APGD, randomness) added to `notes`."""
    logger, handler = logging.getLogger("auto-attack"), logging.Handler(logging.DEBUG)

    def emit(record):
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            log(f"    AutoAttack: {message}")
        elif message not in notes:
            notes.append(message)

    handler.emit, level = emit, logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)



# ============================================================================ command line

def parse_args(argv=None):
    p = OneLineParser(prog="report.py", description="Mean +- sd over seeds, per-epoch tables and curves of runs.")
    p.add_argument("runs", nargs="+", help="train.py output folders or metrics.jsonl files; label=run names a column")
    p.add_argument("--eval", metavar="NAME", help="the evaluate.py JSON in each run folder (e.g. eval.json) for "
                   "the seeds table's test columns")
    p.add_argument("--epochs", action="store_true", help="also print the per-epoch validation table (and, for "
                   "seeds of one setting, its mean ± sd per epoch)")
    p.add_argument("--curves", metavar="FILE.png", help="draw the per-epoch validation curves of all runs "
                   "(matplotlib), in the format of its extension (.png, .pdf, .svg, ...)")
    args = p.parse_args(argv)
    problem = next((f"{arg}: the label before '=' is empty; write name{arg} or drop the '='"
                    for arg in args.runs if arg.startswith("=")), None)
    if args.eval is not None and not args.eval.strip():
        problem = "--eval is empty; name the evaluate.py JSON inside each run folder, e.g. --eval eval.json"
    if args.curves is not None:
        problem = problem or next((f"--curves {args.curves}: {why}" for why in (
            common.unwritable(args.curves), figure_problem(args.curves)) if why), None)
    if problem:
        p.error(problem)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.curves:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            die("--curves draws with matplotlib: pip install matplotlib")
    try:
        groups = group_runs([read_run(arg, args.eval) for arg in args.runs])
    except (OSError, ValueError, KeyError, checkpoints.CheckpointError) as e:
        die(f"cannot read a run: {e}")
    print(seeds_table(groups))
    if args.epochs:
        print("\nValidation natural / PGD-20 accuracy (%) per epoch, the mean mask in brackets:\n")
        print(epochs_table(groups))
        if any(len(members) > 1 for _, members in groups):
            print("\nPer epoch, mean ± sd over seeds:\n")
            print(epoch_means_table(groups))
    if args.curves:
        try:
            plot_curves(groups, args.curves)
        except OSError as e:
            die(f"could not write {args.curves}: {common.cause(e)}; report.py changes nothing else: once the "
                "disk takes it (free space, or a writable one), run the same command again", code=1)
        print(f"\ncurves: {args.curves}")


if __name__ == "__main__":
    main()
