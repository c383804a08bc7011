"""The MNIST Table 1 study's tables and figure, read from the committed stores (evaluate.py's per-image
bits in each run's JSON files and in eps_sweep/eval.json). Nothing is attacked here: a number whose bits
are not stored yet is '-', and a cell over fewer seeds than its row has says how many.

    python results/table1/table.py                                        # the three tables and the tests
    python results/table1/table.py --curves results/table1/eps_sweep/curves.png

1. Table 1: per row, mean ± sd over its seeds (sample sd, n - 1) of natural, PGD-20 and PGD-100 on all
   10,000 test images and AutoAttack on the first 1,000, at eps 0.3 (the paper's test).
2. The tests behind the sentences: A - B with verdicts.seeds_and_images (each method's seeds and one
   shared resample of the test images, 10,000 draws).
3. The eps-0.4 rows at eps 0.4 (seed 0, first 1,000): each attack alone and AutoAttack, beside eps 0.3.
4. The robustness curves (seed 0 of every row that trains, first 1,000): APGD-CE and PGD-20 at eps
   0.05-0.45, the eps where APGD-CE falls below 50%, and the mean mask of the CAT rows (evaluate.py
   --save-masks; x + delta from PGD-20 at the training eps). --curves draws them: APGD-CE solid, PGD-20
   dashed, a star at the training eps.
Run from the repository root (the paths below are relative to it).
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import checkpoints  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import report  # noqa: E402
import verdicts  # noqa: E402

T = "results/table1"
# label, training eps, run folders (seed 0 first), the paper's natural / PGD-20 / PGD-100 (40 epochs)
ROWS = [("AT(0.3)", 0.3, ["results/mnist_at_0.3", f"{T}/seeds/at_0.3_s1", f"{T}/seeds/at_0.3_s2"], "99.2 / 93.4 / 92.3"),
        ("TRADES(0.3)", 0.3, ["results/mnist_trades_0.3", f"{T}/seeds/trades_0.3_s1", f"{T}/seeds/trades_0.3_s2"],
         "99.3 / 94.9 / 92.9"),
        ("CAT_cent(0.3)", 0.3, [f"{T}/cat_cent_0.3", f"{T}/seeds/cat_cent_0.3_s1", f"{T}/seeds/cat_cent_0.3_s2"],
         "99.3 / 95.4 / 93.2"),
        ("CAT_cw(0.3)", 0.3, [f"{T}/cat_cw_0.3"], "99.1 / 96.2 / 95.0"),
        ("AT(0.4)", 0.4, ["results/mnist_at_0.4"], "- (fails to train)"),
        ("CAT_cent(0.4)", 0.4, [f"{T}/cat_cent_0.4", f"{T}/seeds/cat_cent_0.4_s1", f"{T}/seeds/cat_cent_0.4_s2"],
         "99.2 / 96.8 / 95.8"),
        ("CAT_cw(0.4)", 0.4, [f"{T}/cat_cw_0.4"], "99.1 / 97.1 / 96.2"),
        ("TRADES(0.4)", 0.4, [f"{T}/trades_0.4", f"{T}/seeds/trades_0.4_s1", f"{T}/seeds/trades_0.4_s2"],
         "99.1 / 95.3 / 91.6")]
TABLE = [("natural", 10000), ("pgd20", 10000), ("pgd100", 10000), ("autoattack", 1000)]
# The differences the README's sentences claim: A, B, attack, test images.
TESTS = [("CAT_cent(0.3)", "AT(0.3)", "autoattack", 1000), ("CAT_cent(0.3)", "TRADES(0.3)", "autoattack", 1000),
         ("CAT_cent(0.4)", "TRADES(0.4)", "autoattack", 1000), ("CAT_cent(0.3)", "AT(0.3)", "pgd20", 10000),
         ("CAT_cent(0.3)", "TRADES(0.3)", "pgd20", 10000), ("CAT_cent(0.3)", "AT(0.3)", "natural", 10000),
         ("CAT_cent(0.3)", "TRADES(0.3)", "natural", 10000), ("CAT_cent(0.4)", "TRADES(0.4)", "pgd20", 10000)]
AT_04 = ["natural", "pgd20", "apgd-ce", "apgd-t", "square", "autoattack"]
NAMES = {"natural": "natural", "pgd20": "PGD-20", "pgd100": "PGD-100", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T",
         "square": "Square", "autoattack": "AutoAttack"}
CURVE_EPS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45]
SHARED = [f"{T}/eps_sweep/eval.json"]          # stores that hold several runs' bits
UNTRAINED = {"AT(0.4)"}                         # one class: left out of the eps-0.4 table and the curves


def weights_of(folder):
    """The hash evaluate.py stores the run's best.pt under (None without a best.pt)."""
    best = os.path.join(folder, "best.pt")
    return checkpoints.weights_hash(checkpoints.load_model(best)["f"]) if os.path.isfile(best) else None


class Stores:
    """Every store's entries for a run's weights, read once; bits(folder, attack, eps, n) -> bool (n,) or None."""

    def __init__(self, images, weights=weights_of):
        self.images, self.weights, self.cache = images, weights, {}

    def entries(self, folder):
        """{key: entry} stored for the folder's best.pt in the folder's JSON files and the shared stores;
        where two stores hold one key, the entry with more images."""
        if folder not in self.cache:
            w, found = self.weights(folder), {}
            for path in sorted(glob.glob(os.path.join(folder, "*.json"))) + SHARED:
                doc = report.read_json(path) if os.path.isfile(path) else {}
                results = doc.get("results") if isinstance(doc, dict) else None
                mine = results.get(w, {}) if isinstance(results, dict) else {}
                for key, e in mine.items():
                    more = isinstance(e, dict) and len(e.get("bits", "")) >= len(found.get(key, {}).get("bits", ""))
                    if key != "model" and more:
                        found[key] = e
            self.cache[folder] = found
        return self.cache[folder]

    def bits(self, folder, attack, eps, n):
        key = evaluate.entry_key(attack, evaluate.settings_for("mnist", eps=eps), self.images)
        bits = self.entries(folder).get(key, {}).get("bits", "")
        return evaluate.from_bits(bits[:n]) if len(bits) >= n else None

    def mean_mask(self, folder):
        """Mean mask over the most images any --save-masks run of the folder's best.pt covered."""
        sums = [e for k, e in self.entries(folder).items() if k.startswith("masks ") and "sums" in e]
        best = max(sums, key=lambda e: e["done"], default=None)
        return (best["sums"][0] / best["sums"][3], best["done"]) if best and best["done"] else None


def acc(bits):
    return 100 * bits.sum().item() / len(bits)


def finished(folder):
    """Trained to the end: a best.pt, and metrics.jsonl reaches the config's last epoch (a run still
    training has a best.pt too)."""
    have = all(os.path.isfile(os.path.join(folder, name)) for name in ("best.pt", "metrics.jsonl"))
    return have and not report.stopped_early(report.read_run(folder))


def seed_of(folder):
    return (report.read_config(folder) or {}).get("seed", "?")


def how_trained(folder):
    cfg = report.read_config(folder) or {}
    return f"{cfg.get('device', '?')}, --amp {cfg.get('amp', '?')}"


def table1(stores, rows=ROWS):
    lines = ["| model | seeds | natural | PGD-20 | PGD-100 | AutoAttack (first 1,000) | paper (40 epochs): "
             "natural / PGD-20 / PGD-100 |", "|---|---|---|---|---|---|---|"]
    notes = []
    for label, _, folders, paper in rows:
        done = [f for f in folders if finished(f)]
        cells = []
        for attack, n in TABLE:
            values = [acc(b) for f in done for b in [stores.bits(f, attack, 0.3, n)] if b is not None]
            cells.append(report.cell(values, 2 if n == 10000 else 1, len(done)))
        lines.append(f"| {label} | {', '.join(str(seed_of(f)) for f in done) or '-'} | {' | '.join(cells)} | {paper} |")
        ways = sorted({how_trained(f) for f in done})
        if len(ways) > 1:
            notes.append(f"{label}: seeds trained differently ({'; '.join(f'seed {seed_of(f)}: {how_trained(f)}' for f in done)})")
    notes.insert(0, "mean ± sd over the seeds listed (sample sd); (n=k): only k of them evaluated yet; eps 0.3; "
                    "natural, PGD-20, PGD-100 on all 10,000 test images")
    return "\n".join(lines + [""] + notes)


def tests(stores, rows=ROWS, pairs=TESTS, draws=10000):
    by_label = {label: folders for label, _, folders, _ in rows}
    lines = []
    for a, b, attack, n in pairs:
        bits = [[x for f in by_label[name] for x in [stores.bits(f, attack, 0.3, n)] if x is not None] for name in (a, b)]
        if not all(bits):
            lines.append(f"- {a} - {b}, {NAMES[attack]}, {n:,} images: not evaluated yet")
            continue
        diff, (low, high), p = verdicts.seeds_and_images(*bits, draws=draws)
        lines.append(f"- {a} - {b}, {NAMES[attack]}, {n:,} images, {len(bits[0])} v {len(bits[1])} seeds: "
                     f"{diff:+.1f} points (95% interval {low:+.1f} to {high:+.1f}), "
                     + (f"p = {p:.2g}" if p > 0 else f"p < {1 / draws:g}"))
    return "\n".join(["Seed-and-image test (verdicts.seeds_and_images, two-level paired bootstrap, "
                      f"{draws:,} draws):", *lines])


def at_eps_04(stores, rows=ROWS):
    head = [NAMES[a] for a in AT_04]
    lines = ["| model (seed 0) | " + " | ".join(head) + " | worst | AutoAttack at eps 0.3 |",
             "|---|" + "---|" * (len(AT_04) + 2)]
    for label, eps, folders, _ in rows:
        if eps != 0.4 or label in UNTRAINED or not finished(folders[0]):
            continue
        bits = {a: stores.bits(folders[0], a, 0.4, 1000) for a in AT_04}
        have = [b for b in bits.values() if b is not None]
        worst = acc(verdicts.worst_correct(bits, AT_04)) if len(have) == len(AT_04) else None
        at03 = stores.bits(folders[0], "autoattack", 0.3, 1000)
        cells = [f"{acc(b):.1f}" if b is not None else "-" for b in bits.values()]
        cells += [f"{worst:.1f}" if worst is not None else "-", f"{acc(at03):.1f}" if at03 is not None else "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "eps 0.4, first 1,000 test images; worst: survived every attack of the row"])


def curves(stores, rows=ROWS):
    """{label: (training eps, {attack: [(eps, accuracy)]})} of every row's seed 0 that trains."""
    out = {}
    for label, eps, folders, _ in rows:
        if label in UNTRAINED or not finished(folders[0]):
            continue
        points = {a: [(e, acc(b)) for e in CURVE_EPS for b in [stores.bits(folders[0], a, e, 1000)] if b is not None]
                  for a in ("apgd-ce", "pgd20")}
        if any(points.values()):
            out[label] = (eps, points)
    return out


def falls_below(points, level=50.0):
    """The first eps (linear between the points) where accuracy drops below `level`, else None."""
    for (e0, a0), (e1, a1) in zip(points, points[1:]):
        if a0 >= level > a1:
            return e0 + (e1 - e0) * (a0 - level) / (a0 - a1)
    return None


def curves_table(stores, rows=ROWS):
    drawn = curves(stores, rows)
    head = [f"{e:g}" for e in CURVE_EPS]
    lines = ["| model (seed 0) | trained at | mean mask | APGD-CE (PGD-20) at eps " + " | ".join(head)
             + " | APGD-CE < 50% from eps |", "|---|---|---|" + "---|" * (len(CURVE_EPS) + 1)]
    folders = {label: f[0] for label, _, f, _ in rows}
    for label, (eps, points) in drawn.items():
        apgd, pgd = dict(points["apgd-ce"]), dict(points["pgd20"])
        cells = [(f"{apgd[e]:.1f}" if e in apgd else "-") + (f" ({pgd[e]:.1f})" if e in pgd else "") for e in CURVE_EPS]
        mask = stores.mean_mask(folders[label])
        below = falls_below(points["apgd-ce"])
        lines.append(f"| {label} | {eps:g} | {f'{mask[0]:.2f}' if mask else '-'} | " + " | ".join(cells)
                     + f" | {f'{below:.2f}' if below is not None else '-'} |")
    return "\n".join(lines + ["", "first 1,000 test images; mean mask: over x + delta (PGD-20 at the training eps), "
                                  "evaluate.py --save-masks"])


def plot(stores, path, rows=ROWS):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for i, (label, (eps, points)) in enumerate(curves(stores, rows).items()):
        color = f"C{i}"
        for attack, style in (("apgd-ce", "-"), ("pgd20", "--")):
            if points[attack]:
                ax.plot(*zip(*points[attack]), linestyle=style, color=color, marker="o" if style == "-" else None,
                        markersize=3, label=label if attack == "apgd-ce" else None)
        at_train = dict(points["apgd-ce"]).get(eps)
        if at_train is not None:
            ax.plot([eps], [at_train], marker="*", markersize=13, color=color, markeredgecolor="black")
    ax.plot([], [], "k-", label="APGD-CE"), ax.plot([], [], "k--", label="PGD-20 (the paper's test)")
    ax.plot([], [], "k*", markersize=10, label="at the training eps")
    ax.set(xlabel="eps (L-inf, pixels in [0, 1])", ylabel="robust accuracy (%)", ylim=(-2, 102),
           title="MNIST, seed 0 of each Table 1 row, first 1,000 test images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, format=report.extension(path), dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--curves", metavar="FILE.png", help="draw the robustness curves (matplotlib)")
    p.add_argument("--data-dir", default="data")
    args = p.parse_args(argv)
    test = data.load_test("mnist", args.data_dir, log=lambda *_: None)
    stores = Stores(evaluate.test_set_id("mnist", test))
    print(table1(stores), tests(stores), at_eps_04(stores), curves_table(stores), sep="\n\n")
    if args.curves:
        plot(stores, args.curves)
        print(f"\ncurves: {args.curves}")


if __name__ == "__main__":
    main()
