"""Time the real training step of CAT and its baselines on synthetic data, and print ratios.

    python bench.py --dataset mnist --methods cat,trades,at --dtype fp32,bf16 --json bench.json
    python bench.py --dataset cifar10 --arch preact18 --methods cat,trades --dtype bf16 --compile --device cuda

Timed: `train.train_step` in the runtime's autocast, with train.py's nets and runtime, on one fixed
synthetic batch; each method has its training defaults except one batch size and T for all (CAT's unless
given); fp32 rows are IEEE fp32, never TF32, as in train.py (train.Runtime calls common.exact_fp32). Per
method and dtype: --warmup calls, then --iters calls round-robin (order reversed every other round, so
outside load falls on all alike), the device synchronised around each. Hooks on f and g_phi count the
passes of one more, untimed step.
"""
import argparse
import collections
import resource
import statistics
import sys
import time

import torch

import common
import config
import models
import train

DTYPES = ("fp32", "bf16")


def parse_args(argv=None):
    p = common.OneLineParser(description="Time train.train_step of each method on synthetic data; print ratios.")
    a = p.add_argument
    a("--dataset", default="mnist", choices=sorted(config.DEFAULTS))
    a("--methods", default="cat,trades,at", help=f"comma list of {', '.join(train.LOSSES)}")
    a("--dtype", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = train.py --amp bf16 autocast)")
    a("--arch", help="classifier, as train.py --arch. default: mnist_cnn (mnist), preact18 (cifar)")
    a("--batch-size", type=int, help="images per step, every method. default: CAT's (100 mnist, 128 cifar)")
    a("--steps", type=int, help="attack steps T, every method. default: CAT's (20 mnist, 10 cifar)")
    a("--iters", type=int, default=10, help="timed calls per item; the median is reported")
    a("--warmup", type=int, default=2, help="untimed calls per item first (compile, autotuning, allocator)")
    a("--channels-last", default=True, action=argparse.BooleanOptionalAction, help="NHWC, as train.py")
    a("--compile", action="store_true", help="torch.compile through train.Runtime, as train.py --compile")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--threads", type=int, help="CPU threads for torch (torch.set_num_threads). default: torch's")
    a("--json", help="write every number here")
    args = p.parse_args(argv)
    args.methods, args.dtype = (list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
                                for text in (args.methods, args.dtype))
    bad_m, bad_d = [m for m in args.methods if m not in train.LOSSES], [d for d in args.dtype if d not in DTYPES]
    for ok, message in [
            (args.methods and not bad_m, f"--methods {','.join(bad_m)}: choose from {', '.join(train.LOSSES)}"),
            (args.dtype and not bad_d, f"--dtype {','.join(bad_d)}: choose from {', '.join(DTYPES)}"),
            (args.iters >= 1, f"--iters {args.iters} must be >= 1"),
            (args.warmup >= 0, f"--warmup {args.warmup} must be >= 0"),
            (args.threads is None or args.threads >= 1, f"--threads {args.threads} must be >= 1")]:
        if not ok:
            p.error(message)
    return args


def configs(args):
    """{(method, dtype): cfg} from config.parse_config, with one batch size and T for all methods."""
    flags = ["--dataset", args.dataset, "--device", args.device] + ["--no-channels-last"] * (not args.channels_last)
    flags += ["--compile"] * args.compile + (["--arch", args.arch] if args.arch else [])
    cat_cfg = config.parse_config(flags + ["--method", "cat"])        # CAT's training defaults for --dataset
    batch, steps = (cat_cfg[k] if v is None else v for k, v in (("batch_size", args.batch_size), ("steps", args.steps)))
    flags += ["--batch-size", str(batch), "--steps", str(steps)]            # parse_config refuses values < 1
    return {(m, d): config.parse_config(flags + ["--method", m, "--amp", d]) for d in args.dtype for m in args.methods}


class Item:
    """One method at one dtype, ready to run: fn() is one training step; seconds, one per timed call."""

    def __init__(self, cfg):
        self.cfg, self.method, self.dtype = cfg, cfg["method"], cfg["amp"]
        self.seconds, self.first_s, self.extra_bytes = [], None, 0
        rt = train.Runtime(cfg)
        self.device, self.nets = rt.device, rt.wrap(train.build_nets(cfg), cfg)
        g = torch.Generator().manual_seed(0)                                      # the same batch for every item
        x = torch.rand(cfg["batch_size"], *models.SHAPES[cfg["dataset"]], generator=g)     # (N, C, H, W) in [0, 1]
        y = torch.randint(0, models.CLASSES[cfg["dataset"]], (cfg["batch_size"],), generator=g)
        x, y = x.to(rt.device, memory_format=rt.memory_format), y.to(rt.device)

        def step():
            with rt.autocast():
                train.train_step(self.nets, x, y, cfg)
        self.fn = step


def count_passes(cfg):
    """Forward and backward passes of f and g_phi in one train_step (fresh nets, not compiled): a forward
    hook on each net counts its forwards, and a hook it puts on the output counts backwards through it.
    FAT's attack stops early, so its count is that of epoch 1 on random data."""
    item, counts = Item({**cfg, "compile": False}), collections.Counter()

    def hook(name):
        def forward(module, inputs, output):
            counts.update([f"{name}_forward"] + [f"{name}_nograd"] * (not torch.is_grad_enabled()))
            if output.requires_grad:                      # fires once per backward through the output
                output.register_hook(lambda grad: counts.update([f"{name}_backward"]))
        return forward
    handles = [net.register_forward_hook(hook(name))
               for name, net in (("f", item.nets.f), ("g", item.nets.g)) if net is not None]
    item.fn()
    for h in handles:
        h.remove()
    return {f"{net}_{kind}": counts[f"{net}_{kind}"] for net in "fg" for kind in ("forward", "nograd", "backward")}


def timed_call(item):
    """Seconds of one call, the device synchronised before and after; on CUDA also the memory the
    call allocates beyond what was held before it (activations, gradients, attack buffers)."""
    cuda = item.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(item.device)
        torch.cuda.reset_peak_memory_stats(item.device)
    before = torch.cuda.memory_allocated(item.device) if cuda else 0
    t0 = time.perf_counter()
    item.fn()
    if cuda:
        torch.cuda.synchronize(item.device)
    seconds = time.perf_counter() - t0
    if cuda:
        item.extra_bytes = max(item.extra_bytes, torch.cuda.max_memory_allocated(item.device) - before)
    return seconds


def run_all(items, warmup, iters):
    """warmup untimed calls per item, then iters rounds of one call each, the order reversed every other round."""
    for item in items:
        first = [timed_call(item) for _ in range(warmup)][:1]
        item.first_s = first[0] if first else None
    for r in range(iters):
        for item in (items if r % 2 == 0 else items[::-1]):
            item.seconds.append(timed_call(item))


def row(item, setting, passes):
    """One JSON row: times in ms (median, range, every call in round order), throughput, memory, passes."""
    ms, med = [1e3 * s for s in item.seconds], 1e3 * statistics.median(item.seconds)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    return {"method": item.method, "dtype": item.dtype, "phase": "train", **setting,
            "ms_per_step": round(med, 3), "ms_min": round(min(ms), 3), "ms_max": round(max(ms), 3),
            "ms_all": [round(t, 3) for t in ms], "images_per_s": round(setting["batch_size"] / (med / 1e3), 1),
            "first_call_ms": round(1e3 * item.first_s, 1) if item.first_s is not None else None,
            "peak_mem_mb": round(item.extra_bytes / 2 ** 20 if item.device.type == "cuda" else rss, 1),
            "optimizer": item.cfg["optimizer"], "passes": passes[item.method]}


def ratios(rows):
    """Each method's step time over TRADES' at the same dtype (ratio of the medians, and median of the
    per-round ratios, whose two calls shared one round's load); each method's bf16 speed-up."""
    step = {(r["method"], r["dtype"]): r for r in rows}
    over = [{"method": m, "dtype": d, "measured": round(r["ms_per_step"] / t["ms_per_step"], 3),
             "paired": round(statistics.median(a / b for a, b in zip(r["ms_all"], t["ms_all"])), 3)}
            for (m, d), r in step.items() if m != "trades" and (t := step.get(("trades", d)))]
    bf16 = [{"method": m, "speedup": round(step[m, "fp32"]["ms_per_step"] / step[m, "bf16"]["ms_per_step"], 3)}
            for m, d in step if d == "fp32" and (m, "bf16") in step]
    return {"over_trades": over, "bf16_over_fp32": bf16}


def report(rows, found, s):
    print(f"bench: {s['dataset']}, {s['arch']}, batch {s['batch_size']}, T={s['steps_T']}, {s['device']} "
          f"({s['device_type']}, {s['threads']} threads), channels_last {s['channels_last']}, compile {s['compile']}, "
          f"torch {s['torch']}; median of {s['iters']} calls after {s['warmup']} warm-up, round-robin")
    print(f"{'method':<8}{'dtype':<6}{'ms/step':>10}{'min':>9}{'max':>9}{'img/s':>9}{'peak MB':>9}")
    for r in rows:
        print(f"{r['method']:<8}{r['dtype']:<6}{r['ms_per_step']:>10.1f}{r['ms_min']:>9.1f}{r['ms_max']:>9.1f}"
              f"{r['images_per_s']:>9.1f}{r['peak_mem_mb']:>9.1f}")
    print(f"peak MB: {s['peak_mem_kind']}\npasses per step, counted by hooks during one train_step:")
    for m, c in {r["method"]: r["passes"] for r in rows}.items():
        print(f"  {m:<7}f {c['f_forward']} forward ({c['f_nograd']} without grad), {c['f_backward']} backward; "
              f"g_phi {c['g_forward']} forward, {c['g_backward']} backward")
    for r in found["over_trades"]:
        print(f"{r['method'].upper()} / TRADES step time, {r['dtype']}: {r['measured']:.3f}x (median per round {r['paired']:.3f}x)")
    print("".join(f"bf16 speed-up over fp32, {r['method']}: {r['speedup']:.2f}x\n" for r in found["bf16_over_fp32"]), end="")


def describe(args, cfg, device):
    """The settings every row shares (they go into each JSON row)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cpu" and sys.platform == "linux":
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
    return {"dataset": args.dataset, "arch": cfg["arch"], "mask_arch": models.MASKS[cfg["dataset"]],
            "steps_T": cfg["steps"], "batch_size": cfg["batch_size"], "device": name, "device_type": device.type,
            "threads": torch.get_num_threads(), "channels_last": cfg["channels_last"], "compile": cfg["compile"],
            "torch": torch.__version__, "iters": args.iters, "warmup": args.warmup,
            "peak_mem_kind": "CUDA memory a call allocates beyond what was held before it (not the weights)"
            if device.type == "cuda" else "peak RSS of the whole process (ru_maxrss), the same for every row"}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        # one dynamo frame, and its recompile limit, serves every method, dtype and mode: past it, eager runs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch.manual_seed(0)
    cfgs = configs(args)
    passes = {m: count_passes(cfgs[m, args.dtype[0]]) for m in args.methods}
    items = [Item(cfg) for cfg in cfgs.values()]
    setting = describe(args, items[0].cfg, items[0].device)
    run_all(items, args.warmup, args.iters)
    rows = [row(item, setting, passes) for item in items]
    report(rows, ratios(rows), setting)
    if args.json:
        common.write_json({"results": rows, "ratios": ratios(rows), "command": sys.argv}, args.json)


if __name__ == "__main__":
    main()
