"""Per-epoch mean +- sd (over seeds) of the seed study's metrics.jsonl files, as a Markdown table.

    python results/seed_study/summarise.py results/seed_study          # CAT_cent: wall_s*, none_s*
    python results/seed_study/summarise.py results/seed_study cw_      # CAT_cw: cw_wall_s*, cw_none_s*
"""
import glob
import json
import os
import statistics
import sys

KEYS = [("val_natural", "val natural", 1), ("val_pgd20", "val PGD-20", 1), ("mask", "mean mask", 3),
        ("mask_lo", "mask < 0.01", 3), ("z_q50", "median z", 1)]


def runs(root, arm):
    for folder in sorted(glob.glob(os.path.join(root, f"{arm}_s*"))):
        if not os.path.isfile(os.path.join(folder, "metrics.jsonl")):
            continue
        with open(os.path.join(folder, "metrics.jsonl")) as fh:
            yield [json.loads(line) for line in fh if line.strip()]


def cell(values, digits):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main(root, prefix=""):
    print("| arm | epoch | n | " + " | ".join(name for _, name, _ in KEYS) + " | collapsed (val PGD-20 < 5%) |")
    print("|---" * (len(KEYS) + 4) + "|")
    for arm, label in (("wall", "default (logit wall)"), ("none", "--paper-exact")):
        per_run = list(runs(root, prefix + arm))
        for epoch in range(1, max(len(r) for r in per_run) + 1):
            rows = [r[epoch - 1] for r in per_run if len(r) >= epoch]
            collapsed = sum(row["val_pgd20"] < 5 for row in rows)
            print(f"| {label} | {epoch} | {len(rows)} | " +
                  " | ".join(cell([row[k] for row in rows], d) for k, _, d in KEYS) + f" | {collapsed}/{len(rows)} |")


if __name__ == "__main__":
    main(*(sys.argv[1:] or ["results/seed_study"]))
