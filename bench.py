"""Time the real training step of CAT and its baselines on synthetic data, and PGD-20 evaluation.

    python bench.py --dataset mnist --methods cat,trades,at --dtype fp32,bf16 --json bench.json
    python bench.py --dataset cifar10 --arch preact18 --methods cat --dtype bf16 --compile --device cuda

What is timed: `train.train_step(nets, x, y, cfg, epoch)` inside `rt.autocast()`, with nets from
`train.build_nets(cfg)` wrapped by `train.Runtime(cfg).wrap`, exactly as `train.run_epoch` calls it,
on one fixed synthetic batch (uniform images in [0, 1], uniform labels): data loading is not timed.
cfg comes from `train.parse_config`, so every setting is the method's training default except the
batch size and the attack steps T, which are the same for every method (CAT's defaults for
--dataset unless --batch-size / --steps are given), so that ratios compare like with like.

Each item (a method at a dtype, a unit pass, PGD-20 evaluation) is called --warmup times untimed, then
--iters times round-robin: one call of every item per round, so that load from other processes falls
on all items alike. The device is synchronised around every call. Reported: median and spread (min,
quartiles, max) of the per-call wall time; ratios between methods come from this one process.

The floor: counting the classifier and mask-network passes of train.train_step (see `passes`) and
timing each kind of pass alone on the same batch predicts the step time of every method with no
overhead at all (no projection, optimizer or Python cost): the "floor ms" column. The CAT / TRADES
ratio of those predictions is the lowest ratio the method allows; on a busy machine a measured
number can fall below its floor, which only says that the run was noisy.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attacks
import evaluate
import models
import train

# ============================================================================ constants and targets

# Wall time per batch of the authors' published MNIST CAT script (batch 100, T = 20, fp32), measured on
# the 2-core AMD EPYC CPU machine this repository is developed on (issue 6). Only meaningful on that CPU.
AUTHORS_MNIST_S_PER_BATCH = 1.9
AUTHORS_MNIST_SETTING = {"dataset": "mnist", "batch_size": 100, "steps_T": 20}

# The targets of issue 6, each at the dataset's training T (20 MNIST, 10 CIFAR).
MAX_CAT_OVER_TRADES = {"mnist_cnn": 1.35, "preact18": 1.25}   # step time; floors near 1.3 and 1.19
MIN_BF16_SPEEDUP_CPU = 1.5               # CAT step, bf16 over fp32, on the CPU
MIN_SPEEDUP_OVER_AUTHORS = 2.5           # CAT step at AUTHORS_MNIST_SETTING, on the CPU

DTYPES = ("fp32", "bf16")
PASS_KINDS = ("attack", "train", "nograd", "mask")


def passes(cfg):
    """Passes per training step, counted from train.train_step for cfg's method:

    attack  f forward + backward to the input only, f in eval mode (one per PGD iteration)
    train   f forward + backward into its parameters, f in train mode
    nograd  f forward without autograd
    mask    g_phi forward + backward into its parameters
    CAT: T PGD iterations; f(x), f(x_cali) for Eq. 13; mask_step's no-grad f(x + delta) and f(x_cali)
    with f frozen (the gradient goes through f to the input and on into g_phi), counted as an attack
    pass; g_phi forward + backward. TRADES (and FAT): the KL attack's no-grad f(x), T iterations,
    f(x), f(x_adv). AT: T iterations, f(x_adv). FAT's early stop makes its count an upper bound.
    """
    use_mask = cfg["method"] == "cat" and cfg["mask"]
    return {"attack": cfg["steps"] + use_mask,
            "train": 1 if cfg["method"] == "at" else 2,
            "nograd": int(cfg["attack"] == "kl") + use_mask,
            "mask": int(use_mask)}


def targets(ratios, setting):
    """The issue's targets that this run's numbers can be held against, each MET or not."""
    found = []
    at_training_T = setting["steps_T"] == train.DEFAULTS[setting["dataset"]]["steps"]
    if setting["arch"] in MAX_CAT_OVER_TRADES and at_training_T:
        found += [(f"CAT/TRADES step time, {setting['arch']} nets, T={setting['steps_T']}, {r['dtype']}",
                   r["measured"], MAX_CAT_OVER_TRADES[setting["arch"]], "max") for r in ratios["cat_over_trades"]]
    if setting["device_type"] == "cpu":
        found += [("bf16 speed-up of the CAT step over fp32, CPU", r["speedup"], MIN_BF16_SPEEDUP_CPU, "min")
                  for r in ratios["bf16_over_fp32"] if r["method"] == "cat"]
        found += [(f"speed-up over the authors' MNIST script, batch 100, T=20, {r['dtype']}", r["speedup"],
                   MIN_SPEEDUP_OVER_AUTHORS, "min") for r in ratios["over_authors"]]
    return [{"target": text, "measured": round(value, 3), "limit": limit, "kind": kind,
             "met": value <= limit if kind == "max" else value >= limit} for text, value, limit, kind in found]


# ============================================================================ command line

def parse_args(argv=None):
    p = train.OneLineParser(description="Time train.train_step of each method (synthetic data) and PGD-20 evaluation.")
    a = p.add_argument
    a("--dataset", default="mnist", choices=sorted(train.DEFAULTS))
    a("--methods", default="cat,trades,at", help=f"comma list of {', '.join(train.LOSSES)}")
    a("--dtype", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = train.py --amp bf16 autocast)")
    a("--arch", help="classifier, as train.py --arch. default: mnist_cnn (mnist), preact18 (cifar)")
    a("--batch-size", type=int, help="images per step, every method. default: CAT's (100 mnist, 128 cifar)")
    a("--steps", type=int, help="attack steps T, every method. default: CAT's (20 mnist, 10 cifar)")
    a("--iters", type=int, default=10, help="timed calls per item; the median is reported")
    a("--warmup", type=int, default=2, help="untimed calls per item first (compile, autotuning, allocator)")
    a("--unit-reps", type=int, default=5, help="passes back to back per timed call of a unit pass (floor column)")
    a("--eval", default=True, action=argparse.BooleanOptionalAction, help="also time PGD-20 evaluation")
    a("--eval-batch-size", type=int, help="images per PGD-20 batch. default: --batch-size")
    a("--channels-last", default=True, action=argparse.BooleanOptionalAction, help="NHWC, as train.py")
    a("--compile", action="store_true", help="torch.compile through train.Runtime, as train.py --compile")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--threads", type=int, help="CPU threads for torch (torch.set_num_threads). default: torch's")
    a("--json", help="write every number here")
    args = p.parse_args(argv)
    args.methods, args.dtype = split_list(args.methods), split_list(args.dtype)
    problem = check_args(args)
    if problem:
        p.error(problem)
    return args


def split_list(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def check_args(args):
    """The first impossible flag as a sentence, or None (train.parse_config checks the rest)."""
    bad_methods = [m for m in args.methods if m not in train.LOSSES]
    bad_dtypes = [d for d in args.dtype if d not in DTYPES]
    checks = [
        (args.methods and not bad_methods, f"--methods {','.join(bad_methods)}: choose from {', '.join(train.LOSSES)}"),
        (args.dtype and not bad_dtypes, f"--dtype {','.join(bad_dtypes)}: choose from {', '.join(DTYPES)}"),
        (args.iters >= 1, f"--iters {args.iters} must be >= 1"),
        (args.warmup >= 0, f"--warmup {args.warmup} must be >= 0"),
        (args.unit_reps >= 1, f"--unit-reps {args.unit_reps} must be >= 1"),
        (args.threads is None or args.threads >= 1, f"--threads {args.threads} must be >= 1"),
        (args.eval_batch_size is None or args.eval_batch_size >= 1, f"--eval-batch-size {args.eval_batch_size} must be >= 1"),
        (args.device != "cuda" or torch.cuda.is_available(), "--device cuda but no CUDA device is visible; use --device cpu"),
    ]
    return next((msg for ok, msg in checks if not ok), None)


def train_flags(args):
    """train.py flags every item shares, with one batch size and T for all methods."""
    flags = ["--dataset", args.dataset, "--device", args.device,
             "--channels-last" if args.channels_last else "--no-channels-last"] + ["--compile"] * args.compile
    if args.arch:
        flags += ["--arch", args.arch]
    ref = train.parse_config(flags + ["--method", "cat"])        # CAT's training defaults for --dataset
    batch = ref["batch_size"] if args.batch_size is None else args.batch_size
    steps = ref["steps"] if args.steps is None else args.steps
    return flags + ["--batch-size", str(batch), "--steps", str(steps)]


# ============================================================================ timing

class Timed:
    """One thing to time: `fn()` runs it once; a call times `reps` runs back to back and keeps the mean."""

    def __init__(self, key, fn, device, reps=1):
        self.key, self.fn, self.device, self.reps = key, fn, device, reps
        self.seconds, self.first_s = [], None
        self.resident, self.transient = 0, 0          # bytes (CUDA): held between calls, extra during a call


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(item, memory=True):
    """Seconds per run of item.fn over one call, the device synchronised before and after.
    memory: record the call's CUDA memory peak (not in warm-up: cuDNN autotuning's workspaces)."""
    track = item.device.type == "cuda" and memory
    sync(item.device)
    if track:
        torch.cuda.reset_peak_memory_stats(item.device)
        start = torch.cuda.memory_allocated(item.device)
    t0 = time.perf_counter()
    for _ in range(item.reps):
        item.fn()
    sync(item.device)
    seconds = (time.perf_counter() - t0) / item.reps
    if track:
        item.transient = max(item.transient, torch.cuda.max_memory_allocated(item.device) - start)
    return seconds


def build_and_warm_up(build, warmup, device):
    """Build items one builder at a time and warm them up; on CUDA record the memory each one keeps."""
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    items = build()
    for item in items:
        for i in range(warmup):
            seconds = timed_call(item, memory=False)
            item.first_s = seconds if i == 0 else item.first_s
    if device.type == "cuda":
        for item in items:
            item.resident = torch.cuda.memory_allocated(device) - before
    return items


def time_round_robin(items, iters):
    """iters rounds, each calling every item once; the order flips every round (no fixed neighbour)."""
    for r in range(iters):
        for item in (items if r % 2 == 0 else items[::-1]):
            item.seconds.append(timed_call(item))


def spread(seconds):
    """Median and spread of a list of seconds, in ms."""
    q = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else seconds * 3
    ms = lambda s: round(1e3 * s, 3)
    return {"ms_per_step": ms(statistics.median(seconds)), "ms_min": ms(min(seconds)), "ms_p25": ms(q[0]),
            "ms_p75": ms(q[2]), "ms_max": ms(max(seconds))}


# ============================================================================ what is timed

def synthetic_batch(dataset, n, device, seed=0):
    """x: (n, C, H, W) uniform in [0, 1]; y: (n,) uniform labels. The same for every item."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *models.SHAPES[dataset], generator=g)
    y = torch.randint(0, models.CLASSES[dataset], (n,), generator=g)
    return x.to(device), y.to(device)


def runtime_and_nets(cfg):
    rt = train.Runtime(cfg)
    nets = rt.wrap(train.build_nets(cfg), cfg)
    x, y = synthetic_batch(cfg["dataset"], cfg["batch_size"], rt.device)
    return rt, nets, x.contiguous(memory_format=rt.memory_format), y      # as run_epoch hands it over


def step_items(cfg):
    """The training step of cfg's method, as train.run_epoch runs it."""
    rt, nets, x, y = runtime_and_nets(cfg)

    def step():
        with rt.autocast():
            train.train_step(nets, x, y, cfg, epoch=1)
    return [Timed(("step", cfg["method"], amp_name(rt)), step, rt.device)]


def unit_items(cfg, reps):
    """Each kind of pass of `passes` alone, on the step's batch, nets and autocast (cfg: CAT's).
    `reps` passes back to back per call, as the attack runs them: one alone would start with cold caches."""
    rt, nets, x, y = runtime_and_nets(cfg)
    one_step = {**cfg, "steps": 1}

    def attack():             # one PGD iteration through train.perturb itself, so the unit follows any change there
        train.perturb(nets.f_fast, x, y, one_step)

    def train_pass():
        nets.f.train()
        nets.opt_f.zero_grad(set_to_none=True)
        F.cross_entropy(nets.f_train(x).float(), y).backward()

    def nograd():
        with attacks.eval_mode(nets.f), torch.no_grad():
            nets.f_fast(x)

    def mask():
        nets.g.train()
        nets.opt_g.zero_grad(set_to_none=True)
        nets.g_train(x).float().mean().backward()

    def in_autocast(fn):
        def run():
            with rt.autocast():
                fn()
        return run
    fns = {"attack": attack, "train": train_pass, "nograd": nograd, "mask": mask}
    return [Timed(("unit", kind, amp_name(rt)), in_autocast(fns[kind]), rt.device, reps) for kind in PASS_KINDS]


def eval_items(cfg, batch_size):
    """PGD-20 on a batch as evaluate.py runs it: a plain f in eval mode, full fp32, the paper's test
    settings (no random start), then the no-grad forward that scores x_adv."""
    device = train.Runtime(cfg).device
    f = models.build(cfg["arch"], cfg["dataset"]).to(device).eval()
    x, y = synthetic_batch(cfg["dataset"], batch_size, device)
    s = evaluate.SETTINGS[cfg["dataset"]]

    def pgd20():
        with full_fp32():
            x_adv = attacks.pgd(f, x, y, s["eps"], s["alpha"], 20)
            with torch.no_grad():
                f(x_adv).argmax(1)
    return [Timed(("eval", "pgd20", "fp32"), pgd20, device)]


@contextlib.contextmanager
def full_fp32():
    """No TF32 in matmuls and convolutions, as evaluate.py; training keeps torch's default, so only here."""
    saved = torch.backends.fp32_precision
    torch.backends.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.fp32_precision = saved


def amp_name(rt):
    return "bf16" if rt.bf16 else "fp32"


# ============================================================================ results

def device_name(device):
    """A readable name: the GPU's, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def peak_rss_mb():
    """Peak resident memory of this whole process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def result_rows(items, cfgs, units, setting):
    """One JSON row per training step and per evaluation item."""
    rows = []
    for item in items:
        phase, method, dtype = item.key
        if phase == "unit":
            continue
        row = {"method": method, "dtype": dtype, "phase": "train" if phase == "step" else "eval", **setting}
        row.update(spread(item.seconds))
        row["ms_all"] = [round(1e3 * t, 3) for t in item.seconds]          # in round order
        cfg = cfgs.get((method, dtype))
        row["batch_size"] = cfg["batch_size"] if cfg else setting["eval_batch_size"]
        row["images_per_s"] = round(row["batch_size"] / (row["ms_per_step"] / 1e3), 1)
        row["first_call_ms"] = round(1e3 * item.first_s, 1) if item.first_s is not None else None
        row["peak_mem_mb"] = round((item.resident + item.transient) / 2 ** 20 if item.device.type == "cuda"
                                   else peak_rss_mb(), 1)
        if cfg:
            row["passes"] = passes(cfg)
            row["mask_arch"] = models.MASKS[cfg["dataset"]] if row["passes"]["mask"] else None
            row["optimizer"] = cfg["optimizer"]
            if dtype in units:
                row["predicted_ms"] = round(sum(n * units[dtype][k] for k, n in row["passes"].items()), 3)
        rows.append(row)
    return rows


def unit_costs(items):
    """{dtype: {pass kind: median ms}} from the unit items."""
    units = {}
    for item in items:
        phase, kind, dtype = item.key
        if phase == "unit":
            units.setdefault(dtype, {})[kind] = round(1e3 * statistics.median(item.seconds), 3)
    return units


def compute_ratios(rows, setting):
    """CAT / TRADES (measured and floor), bf16 speed-up per method, speed-up over the authors' script."""
    step = {(r["method"], r["dtype"]): r for r in rows if r["phase"] == "train"}
    out = {"cat_over_trades": [], "bf16_over_fp32": [], "over_authors": []}
    for dtype in DTYPES:
        c, t = step.get(("cat", dtype)), step.get(("trades", dtype))
        if c and t:
            floor = c["predicted_ms"] / t["predicted_ms"] if "predicted_ms" in c else None
            paired = statistics.median(a / b for a, b in zip(c["ms_all"], t["ms_all"]))   # same round: same load
            out["cat_over_trades"].append({"dtype": dtype, "measured": c["ms_per_step"] / t["ms_per_step"],
                                           "paired": paired, "floor": floor})
    for method in dict.fromkeys(m for m, _ in step):
        if (method, "fp32") in step and (method, "bf16") in step:
            out["bf16_over_fp32"].append({"method": method, "speedup": step[method, "fp32"]["ms_per_step"]
                                          / step[method, "bf16"]["ms_per_step"]})
    authors = setting["device_type"] == "cpu" and all(setting[k] == v for k, v in AUTHORS_MNIST_SETTING.items())
    for dtype in DTYPES:
        c = step.get(("cat", dtype))
        if authors and c:
            out["over_authors"].append({"dtype": dtype, "speedup": AUTHORS_MNIST_S_PER_BATCH / (c["ms_per_step"] / 1e3)})
    return out


def report(rows, units, ratios, found, setting):
    """The printed table, pass counts, ratios and targets."""
    s = setting
    mask = next((r["mask_arch"] for r in rows if r.get("mask_arch")), None)
    print(f"bench: {s['dataset']}, {s['arch']}" + (f" + {mask}" if mask else "") +
          f", batch {s['batch_size']}, T={s['steps_T']}, {s['device']} ({s['device_type']}, {s['threads']} threads), "
          f"channels_last {'on' if s['channels_last'] else 'off'}, compile {'on' if s['compile'] else 'off'}, "
          f"torch {s['torch']}")
    print(f"median of {s['iters']} timed calls per row after {s['warmup']} warm-up, round-robin; "
          f"peak memory: {s['peak_mem_kind']}")
    print(f"{'method':<8}{'dtype':<6}{'ms/step':>10}{'min':>9}{'p25':>9}{'p75':>9}{'max':>9}"
          f"{'img/s':>9}{'floor ms':>10}{'peak MB':>9}")
    for r in rows:
        name = r["method"] if r["phase"] == "train" else f"{r['method']}*"
        floor = f"{r['predicted_ms']:.1f}" if "predicted_ms" in r else "-"
        print(f"{name:<8}{r['dtype']:<6}{r['ms_per_step']:>10.1f}{r['ms_min']:>9.1f}{r['ms_p25']:>9.1f}"
              f"{r['ms_p75']:>9.1f}{r['ms_max']:>9.1f}{r['images_per_s']:>9.1f}{floor:>10}{r['peak_mem_mb']:>9.1f}")
    if any(r["phase"] == "eval" for r in rows):
        print(f"* evaluation: PGD-20 + scoring forward per batch of {s['eval_batch_size']}, fp32, eval mode")
    print_passes(rows, units)
    for r in ratios["cat_over_trades"]:
        floor = f", predicted floor {r['floor']:.3f}x" if r["floor"] else ""
        print(f"CAT / TRADES step time, T={s['steps_T']}, {r['dtype']}: {r['measured']:.3f}x measured "
              f"(median per round {r['paired']:.3f}x){floor}")
    for r in ratios["bf16_over_fp32"]:
        print(f"bf16 speed-up over fp32, {r['method']}: {r['speedup']:.2f}x")
    for r in ratios["over_authors"]:
        print(f"speed-up over the authors' MNIST script ({AUTHORS_MNIST_S_PER_BATCH} s/batch, fp32, 2-core CPU), "
              f"{r['dtype']}: {r['speedup']:.2f}x")
    print("targets:" if found else "targets: none applies to these settings")
    for t in found:
        sign = "<=" if t["kind"] == "max" else ">="
        print(f"  {t['target']}: {t['measured']:.3f}x (target {sign} {t['limit']}x) {'MET' if t['met'] else 'NOT MET'}")


def print_passes(rows, units):
    """Pass counts per method and the unit costs the floor column is made of."""
    if not units:
        return
    print("passes per step (train.train_step): attack = f fwd + input bwd, eval; train = f fwd + param bwd; "
          "nograd = f fwd; mask = g fwd + bwd")
    seen = set()
    for r in rows:
        if r["phase"] == "train" and r["method"] not in seen:
            seen.add(r["method"])
            print(f"  {r['method']:<7}" + ", ".join(f"{k} {n}" for k, n in r["passes"].items()))
    for dtype, cost in units.items():
        print(f"  unit ms, {dtype}: " + ", ".join(f"{k} {cost[k]:.2f}" for k in PASS_KINDS))


def write_json(path, payload):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


# ============================================================================ main

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        # Every torch.compile'd module runs through one dynamo frame with one recompile limit (default 8),
        # and here all methods x dtypes x modes (attack, train, no-grad, frozen) share it: past the limit
        # dynamo silently runs eager, which would time the wrong thing.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch.manual_seed(0)
    flags = train_flags(args)
    cfgs = {(m, d): train.parse_config(flags + ["--method", m, "--amp", d]) for d in args.dtype for m in args.methods}
    first = next(iter(cfgs.values()))
    setting = describe(args, first)
    builders = [lambda c=c: step_items(c) for c in cfgs.values()]
    builders += [lambda d=d: unit_items(train.parse_config(flags + ["--method", "cat", "--amp", d]), args.unit_reps)
                 for d in args.dtype]
    if args.eval:
        builders.append(lambda: eval_items(first, setting["eval_batch_size"]))
    device = train.Runtime(first).device
    items = [item for build in builders for item in build_and_warm_up(build, args.warmup, device)]
    time_round_robin(items, args.iters)

    units = unit_costs(items)
    rows = result_rows(items, cfgs, units, setting)
    ratios = compute_ratios(rows, setting)
    found = targets(ratios, setting)
    report(rows, units, ratios, found, setting)
    if args.json:
        write_json(args.json, {"results": rows, "units_ms": units, "ratios": ratios, "targets": found,
                               "authors_mnist_s_per_batch": AUTHORS_MNIST_S_PER_BATCH, "command": sys.argv})


def describe(args, cfg):
    """The settings every row shares (they go into each JSON row)."""
    device = train.Runtime(cfg).device
    return {"dataset": args.dataset, "arch": cfg["arch"], "steps_T": cfg["steps"], "batch_size": cfg["batch_size"],
            "eval_batch_size": args.eval_batch_size or cfg["batch_size"], "device": device_name(device),
            "device_type": device.type, "threads": torch.get_num_threads(), "channels_last": cfg["channels_last"],
            "compile": cfg["compile"], "torch": torch.__version__, "iters": args.iters, "warmup": args.warmup,
            "peak_mem_kind": "torch.cuda.max_memory_allocated of the row's own nets and step" if device.type == "cuda"
            else "peak RSS of the whole process (ru_maxrss), same for every row"}

if __name__ == "__main__":
    main()
