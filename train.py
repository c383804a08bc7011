"""Calibrated Adversarial Training, and the baselines it is compared with, in one loop.

    python train.py --dataset mnist --subset 15000 --epochs 1 --out runs/demo
    python train.py --dataset cifar10 --arch preact18 --attack cw --beta1 0.05
    python train.py --dataset cifar10 --method trades            # at | trades | mart | fat | cat
    torchrun --nproc_per_node 2 train.py --dataset cifar10        # DDP, one process per GPU

Per batch (Sec. 4.4 of the paper; the order is the authors' code's):
  1. perturb   delta = PGD(f, x, y) - x, T steps from a random start       (Eq. 9)
  2. mask      M = g_phi(x + delta); x_cali = x + M * delta                (Eq. 10-11)
  3. update f  on Eq. 13 with M fixed (detached)
  4. update g  on Eq. 14 with the *updated* f fixed, reusing M's graph from step 2
The baselines skip steps 2 and 4 (x_cali = x + delta) and use their own loss in step 3. Below: the step, the
runtime (device, dtype, compile, DDP), the loop; the flags are in config.py, the run folder in runs.py.
"""
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import attacks
import cat
import common
import config
import data
import models
import runs

# ============================================================================ one training step

# The outer loss of each method: (logits_nat, logits_adv, y, cfg) -> (loss, natural term, robust term).
# For CAT, logits_adv are those of the calibrated example x_cali.
LOSSES = {
    "cat": lambda nat, adv, y, cfg: cat.classifier_loss(nat, adv, y, cfg["beta"], weighted=cfg["weighted_ce"]),
    "at": lambda nat, adv, y, cfg: cat.at_loss(nat, adv, y),
    "trades": lambda nat, adv, y, cfg: cat.trades_loss(nat, adv, y, cfg["beta"]),
    "mart": lambda nat, adv, y, cfg: cat.mart_loss(nat, adv, y, cfg["beta"]),
    "fat": lambda nat, adv, y, cfg: cat.trades_loss(nat, adv, y, cfg["beta"]),
}


class Nets:
    """The networks and optimizers. f, g: the plain modules (what checkpoints hold); f_fast: f as the attack and the
    frozen passes call it (compiled, or f); f_train, g_train: what the updates call (DDP-wrapped and/or compiled)."""

    def __init__(self, f, g, opt_f, opt_g):
        self.f, self.g, self.opt_f, self.opt_g = f, g, opt_f, opt_g
        self.f_fast, self.f_train, self.g_train = f, f, g


def build_nets(cfg):
    def optimizer(params):                  # config.check_config refuses a typed --momentum or --weight-decay with adam
        if cfg["optimizer"] == "adam":
            return torch.optim.Adam(params, lr=cfg["lr"])
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    f = models.build(cfg["arch"], cfg["dataset"])
    g = models.build(models.MASKS[cfg["dataset"]], cfg["dataset"]) if config.uses_mask(cfg) else None
    return Nets(f, g, optimizer(f.parameters()), g and optimizer(g.parameters()))


def stats_forward(net, x):
    """A forward of `net` (in its current mode) whose output nothing reads: it moves batch norm's running
    statistics where the authors' code makes this forward. A no-op for nets without them (MNIST's)."""
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in net.modules()):
        with torch.no_grad():
            net(x)


def perturb(f, x, y, cfg, epoch=1):
    """Step 1: the training perturbation from a random start. Returns delta.
    f runs in the mode cfg['attack_bn'] names: "train" (CAT's and AT's authors: batch statistics, each attack
    forward updates the running ones) or "eval" (TRADES', MART's, FAT's). Its parameters are frozen meanwhile:
    the attack needs input gradients only, and a compiled f would otherwise compute every weight gradient T times."""
    args = (f, x, y, cfg["eps"], cfg["alpha"], cfg["steps"])
    kw = dict(loss=cfg["attack"], kappa=cfg["kappa"], random_start=cfg["start"],
              train_mode=cfg["attack_bn"] == "train")
    with attacks.frozen(f):
        if cfg["method"] == "fat":
            return attacks.pgd_early_stop(*args, tau=config.tau_at(cfg, epoch), **kw) - x
        x_adv = attacks.pgd(*args, **kw)
    if config.uses_mask(cfg):
        # CAT's authors end the attack with a CE at x + delta to pick the best of its restarts (one here):
        # only for the running statistics, in the attack's mode
        with attacks.set_mode(f, kw["train_mode"]):
            stats_forward(f, x_adv)
    return x_adv - x


def train_step(nets, x, y, cfg, epoch=1):
    """One step of cfg['method'] on a batch; returns a dict of detached scalar tensors.
    CAT's train-mode forwards are those of the authors' CIFAR step, in their order (steps 1 | 3 | 4 | after):
        f      x + delta_t (T times), x + delta  |  x_cali, x  |  x + delta, x_cali  |  x       T + 6
        g_phi  x + delta  |  x + delta (in step 4)                                             2
    f's at x + delta in step 1 and at x after step 4, and g_phi's second, exist only for batch norm's running
    statistics (see stats_forward); nets without batch norm (MNIST's) skip them."""
    delta = perturb(nets.f_fast, x, y, cfg, epoch)
    nets.f.train()
    if config.uses_mask(cfg):
        nets.g.train()                        # step 2: g_phi's forward, graph kept for step 4
        z = nets.g_train(x + delta)           # (N, C, H, W) logits; M = sigmoid(z) in fp32
        mask = cat.mask_of(z)
        # step 3 (Eq. 13), the authors' order, f(x_cali) first: in train mode each output reads its own batch
        # only, so the order moves nothing but the running statistics
        logits_adv = nets.f_train(cat.calibrate(x, delta, mask.detach()))
        logits_nat = nets.f_train(x)
    else:                                     # step 3, a baseline's loss
        logits_nat = nets.f_train(x) if cfg["method"] != "at" else None
        logits_adv = nets.f_train(x + delta)
    loss_f, nat, rob = LOSSES[cfg["method"]](logits_nat, logits_adv, y, cfg)
    nets.opt_f.zero_grad(set_to_none=True)
    loss_f.backward()
    nets.opt_f.step()
    logs = {"loss_f": loss_f.detach(), "nat": nat, "rob": rob}
    if config.uses_mask(cfg):
        logs.update(mask_step(nets, x, y, delta, z, mask, cfg))
        stats_forward(nets.f_fast, x)         # the authors' logged loss, f(x) in train mode: for the statistics only
    return logs


def mask_step(nets, x, y, delta, z, mask, cfg):
    """Step 4: g_phi update on Eq. 14 with the updated f fixed (no gradient for its parameters), f in the attack's
    mode (cfg['attack_bn']). g_phi's gradient flows through z's graph from step 2: the authors run g_phi forward
    again here, which gives the same output (g_phi has not changed) and moves its running statistics once more.
    Not in the paper: unless --paper-exact, cat.logit_wall(z) joins Eq. 14. Without it the CE term drives z to
    about -15 in the first tens of steps, while f is weak, and the sigmoid's vanishing slope keeps the mask at 0
    (CAT becomes natural training) after Eq. 14 has turned."""
    stats_forward(nets.g_train, x + delta)      # the authors' second forward of g_phi: for the statistics only
    with attacks.set_mode(nets.f, cfg["attack_bn"] == "train"), attacks.frozen(nets.f):
        with torch.no_grad():
            logits_adv = nets.f_fast(x + delta)
        loss_g, kl, ce = cat.mask_loss(logits_adv, nets.f_fast(cat.calibrate(x, delta, mask)), y, cfg["beta1"])
        if not cfg["paper_exact"]:
            loss_g = loss_g + cat.logit_wall(z, cfg["wall_bound"])
        nets.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        nets.opt_g.step()
    m = mask.detach()           # saturation statistics: the mask collapse shows here first
    q = torch.quantile(z.detach().float().flatten()[:1 << 20], torch.tensor([0.01, 0.5, 0.99], device=z.device))
    return {"loss_g": loss_g.detach(), "kl_g": kl, "ce_g": ce, "mask": m.mean(),
            "mask_lo": (m < 0.01).float().mean(), "mask_hi": (m > 0.99).float().mean(),
            "z_q01": q[0], "z_q50": q[1], "z_q99": q[2]}


# ============================================================================ runtime: device, dtype, compile, DDP

class Runtime:
    """The one place that decides device, autocast dtype, memory format, compile and DDP."""

    def __init__(self, cfg):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0
        self.device = common.pick_device(cfg["device"], int(os.environ.get("LOCAL_RANK", "0")))
        common.exact_fp32()             # --amp fp32 and validation are IEEE fp32, never TF32
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.bf16 = cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and common.bf16_available(self.device))
        self.memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format

    def autocast(self):
        """The context the training step runs in (evaluation never uses it)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def wrap(self, nets, cfg):
        """Move the plain nets to the device and memory format, then put DDP and/or torch.compile around them."""
        for net in filter(None, (nets.f, nets.g)):
            net.to(self.device, memory_format=self.memory_format)
        nets.f_fast, nets.f_train, nets.g_train = nets.f, nets.f, nets.g
        if self.world > 1:
            if cfg["sync_bn"]:
                nets.f = torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets.f)
                nets.g = nets.g and torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets.g)
            ddp = lambda net: torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            nets.f_fast, nets.f_train, nets.g_train = nets.f, ddp(nets.f), nets.g and ddp(nets.g)
        if cfg["compile"]:
            # one dynamo frame serves every compiled module: CAT needs ~5 graphs (f in attack, train,
            # no-grad and frozen modes, g), and a short last batch adds one per mode; 8 is too few
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
            nets.f_fast = torch.compile(nets.f)
            nets.f_train = nets.f_fast if self.world == 1 else torch.compile(nets.f_train)
            nets.g_train = nets.g_train and torch.compile(nets.g_train)
        return nets

    def log(self, *args):
        """print on rank 0, flushed: a pipe (tee, a job log, a parent process) sees each line at once."""
        if self.main:
            print(*args, flush=True)

    def all_sum(self, values):
        """Sum a list of numbers over DDP processes (identity in one process)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


# ============================================================================ the loop

PROGRESS_S = 30                     # seconds between progress lines, in training and in validation


def batches_per_epoch(n_train, cfg, rt):
    return math.ceil(math.ceil(n_train / rt.world) / max(1, cfg["batch_size"] // rt.world))


def load_data(cfg, rt):
    """(train, val) on the device, val cut into this process's share; bad sizes get one line and exit 2."""
    try:
        train, val = data.for_training(cfg["dataset"], cfg["data_dir"], cfg["val_size"], cfg["subset"], cfg["seed"],
                                       rt.log)
    except data.DataError as e:
        common.die(str(e))
    cfg["data_source"] = train.source     # where the images came from; not a flag
    val = val.take(torch.arange(rt.rank, len(val), rt.world))
    return train.to(rt.device), val.to(rt.device)


def setup(argv, stop):
    """(cfg, rt, nets, train, val, state) of a new run, or of the run in --out with --resume."""
    cfg, ckpt = runs.open_run(config.parse_config(argv))
    rt = Runtime(cfg)
    cfg["amp"] = "bf16" if rt.bf16 else "fp32"             # what runs, not "auto"
    train, val = load_data(cfg, rt)
    torch.manual_seed(cfg["seed"] + rt.rank)
    nets = build_nets(cfg)
    rt.log("config:", json.dumps(runs.saved_config(cfg)))
    state = runs.begin(cfg, nets, ckpt, rt.main, rt.log)
    stop.where = lambda: runs.on_disk(cfg["out"], state)
    if ckpt is not None:
        where = ("its validation" if state.step == batches_per_epoch(len(train), cfg, rt) else
                 f"batch {state.step + 1}" if state.step else "")
        rt.log(f"resuming {cfg['out']} at epoch {state.epoch}" + (f", {where}" if where else ""))
    rt.wrap(nets, cfg)
    rt.log(f"device {rt.device}, {'bf16 autocast' if rt.bf16 else 'fp32'}, processes {rt.world}, "
           f"train {len(train)} / val {len(val) * rt.world} examples")
    return cfg, rt, nets, train, val, state


def run_epoch(nets, train, cfg, rt, state, stop):
    """Train epoch state.epoch from batch state.step to its end or a Ctrl-C; state.step, .sums and .seconds
    follow every batch. Stops the run with one line on a NaN or inf loss."""
    lr = cfg["lr"] * 0.1 ** sum(state.epoch > m for m in cfg["milestones"])     # / 10 per milestone passed
    for opt in filter(None, (nets.opt_f, nets.opt_g)):
        for group in opt.param_groups:
            group["lr"] = lr
    order = torch.Generator().manual_seed(cfg["seed"] * 100003 + state.epoch)  # data order = f(seed, epoch)
    local_batch = max(1, cfg["batch_size"] // rt.world)
    n_batches = batches_per_epoch(len(train), cfg, rt)
    step_losses = torch.zeros(n_batches, device=rt.device)                     # checked without a sync per step
    state.sums = {k: torch.tensor(v, device=rt.device) for k, v in state.sums.items()}
    start, seconds, t0 = state.step, state.seconds, time.time()
    last_print = t0
    augment_fn = data.augment if cfg["augment"] else None
    for x, y in data.batches(train, local_batch, True, order, augment_fn, start, (rt.rank, rt.world)):
        with rt.autocast():
            logs = train_step(nets, x.contiguous(memory_format=rt.memory_format), y, cfg, state.epoch)
        step_losses[state.step] = logs["loss_f"]
        state.step += 1
        for k, v in logs.items():
            state.sums[k] = state.sums.get(k, 0.0) + v.float()
        state.seconds = seconds + time.time() - t0
        if time.time() - last_print > PROGRESS_S or state.step == n_batches or stop.set:
            bad = (~torch.isfinite(step_losses[:state.step])).nonzero()
            if len(bad):
                common.die(f"non-finite loss at epoch {state.epoch} step {bad[0].item() + 1}; stopped without "
                           f"saving: {runs.on_disk(cfg['out'], state)} (a new run with a lower --lr or --amp fp32 "
                           "may avoid it)", 1)
            last_print = time.time()
            rate = (state.step - start) / (last_print - t0)                           # steps per second
            rt.log(runs.progress_line(cfg, state, n_batches, rate))
        if stop.set:
            break


def validate(f, val, cfg, rt, stop, epoch, steps=20, batch_size=500):
    """[natural correct, PGD-`steps` correct, n] of classifier f on this process's share of the validation
    split under the paper's test attack (no random start), f in eval mode and IEEE fp32 (Runtime called
    common.exact_fp32; no autocast); None as soon as a Ctrl-C asks to stop. A progress line every PROGRESS_S."""
    s, correct_nat, correct_adv, done = common.TEST_ATTACK[cfg["dataset"]], 0, 0, 0
    t0 = last_print = time.time()
    with attacks.eval_mode(f), torch.autocast(val.images.device.type, enabled=False):
        for x, y in data.batches(val, batch_size):
            x_adv = attacks.pgd(f, x, y, s["eps"], s["alpha"], steps)
            with torch.no_grad():
                correct_nat += (f(x).argmax(1) == y).sum().item()
                correct_adv += (f(x_adv).argmax(1) == y).sum().item()
            done += len(y)
            if stop.set:
                return None
            if time.time() - last_print > PROGRESS_S and done < len(val):
                last_print = time.time()
                rt.log(f"epoch {epoch} validation [{done}/{len(val)}] "
                       f"ETA {runs.fmt_time((len(val) - done) * (last_print - t0) / done)}")
    return [correct_nat, correct_adv, len(val)]


def end_epoch(nets, counts, val_seconds, cfg, rt, state, n_train):
    """The epoch's metrics line from the all-reduced validation counts (so every DDP process decides alike);
    runs.finish_epoch picks best.pt (best natural + PGD-20 on validation) and watches for a collapse; rank 0
    saves. Returns whether robust accuracy collapsed."""
    nat, rob, n = counts
    nat, rob = 100 * nat / n, 100 * rob / n
    record = {"epoch": state.epoch, "lr": nets.opt_f.param_groups[0]["lr"],
              **{k: round(float(v) / state.step, 5) for k, v in state.sums.items()},
              "val_natural": round(nat, 2), "val_pgd20": round(rob, 2), "seconds": round(state.seconds, 1),
              "val_seconds": round(val_seconds, 1), "images_per_s": round(n_train / state.seconds, 1)}
    improved, collapsed = runs.finish_epoch(state, record, nat, rob, rt.log)
    if rt.main:
        runs.save_epoch(nets, cfg, state, improved)
    return collapsed


def main(argv=None):
    stop = runs.StopFlag()            # first: a Ctrl-C at any point below ends in a clean save
    try:
        cfg, rt, nets, train, val, state = setup(argv, stop)
        run_start = time.time()
        while state.epoch <= cfg["epochs"]:
            run_epoch(nets, train, cfg, rt, state, stop)
            t0 = time.time()
            counts = None if stop.set else validate(nets.f, val, cfg, rt, stop, state.epoch)
            if counts is None:
                runs.stop_and_save(nets, cfg, state, rt.main, rt.log)
            if end_epoch(nets, rt.all_sum(counts), time.time() - t0, cfg, rt, state, len(train)) \
                    and cfg["stop_on_collapse"]:
                rt.log(f"--stop-on-collapse: stopped at epoch {state.epoch - 1}; best.pt (epoch "
                       f"{state.best['epoch']}) is kept")
                break
        rt.log(f"done in {runs.fmt_time(time.time() - run_start)}; best epoch {state.best['epoch']} "
               f"(val natural + PGD-20 = {state.best['score']:.2f}) -> {os.path.join(cfg['out'], 'best.pt')}")
        if rt.world > 1:        # every rank done (rank 0 writes last) before any tears the process group down
            dist.barrier()
            dist.destroy_process_group()
    finally:
        stop.restore()


if __name__ == "__main__":
    main()
