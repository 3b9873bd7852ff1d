"""run_all.sh's summary: the sweep's cells on disk -> table.md, table.png, curves.png, paired.png.

table.md    one row per (dataset, labels): each method's test accuracy over the finished seeds,
            the per-seed KD-FixMatch - FixMatch differences, the trusted subset, wall time.
table.png   test accuracy against label count, one panel per dataset, one line per method.
curves.png  EMA test accuracy against SGD step, one panel per (dataset, labels), one colour per
            method, from each cell's metrics.jsonl (running cells included).
paired.png  each seed's KD-FixMatch minus FixMatch and minus FixMatch 2x, one panel per (dataset,
            labels): the paired comparison that the table's means hide.

run_all.sh calls it (with --table, and at the end of every sweep); matplotlib is optional.
Usage: python report.py --out-dir results [--datasets "cifar10 svhn"] [--labels "400 4000"] ...
"""

import argparse
import glob
import json
import os
import statistics

METHODS = {
    "fixmatch": "FixMatch",
    "kd-ce": "KD-FixMatch (CE)",
    "kd-sce": "KD-FixMatch (SCE)",
    "fixmatch-2x": "FixMatch 2x steps",
    "suave": "Suave",
}
SHORT = {"fixmatch": "FM", "kd-ce": "CE", "kd-sce": "SCE", "fixmatch-2x": "2x", "suave": "Suave"}
# The KD-FixMatch - FixMatch gains the paper reports at 4000 labels, in accuracy points (arXiv
# 2309.05826, abstract: "2.44%, 5.81%, 1.99%, and 3.88% on CIFAR10, SVHN, CIFAR100, and FOOD101").
PAPER_GAIN = {"cifar10": 2.44, "svhn": 5.81, "cifar100": 1.99, "food101": 3.88}
# The stage of metrics.jsonl that a cell's curve follows: a KD cell reuses its seed's FixMatch
# cell as the outer SNN (--outer-from), so its own rows are the inner SNN's.
STAGE = {
    "fixmatch": "outer",
    "fixmatch-2x": "outer",
    "kd-ce": "inner",
    "kd-sce": "inner",
    "suave": "suave",
}
# The pairs of paired.png: each KD cell against the FixMatch it distils from, and against the
# FixMatch trained as many SGD steps as its outer + inner SNNs (the compute-matched control).
PAIRS = [
    ("kd-ce", "fixmatch"),
    ("kd-ce", "fixmatch-2x"),
    ("kd-sce", "fixmatch"),
    ("kd-sce", "fixmatch-2x"),
]
NA = "–"
MPL_MISSING = "matplotlib is not installed (pip install matplotlib)"


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def read_json(path):
    text = read_text(path)
    if not text:
        return None
    return json.loads(text)


def read_cells(out):
    """Every cell directory under `out` -> {(dataset, labels, method): {seed: cell}}."""
    cells = {}
    for cell_dir in sorted(glob.glob(os.path.join(out, "*", "*", "*", "seed*"))):
        dataset, labels, method, seed = os.path.relpath(cell_dir, out).split(os.sep)
        if not labels.isdigit() or not seed[4:].isdigit() or method not in METHODS:
            continue
        config = read_json(os.path.join(cell_dir, "config.json")) or {}
        cell = dict(
            res=read_json(os.path.join(cell_dir, "results.json")),
            started=os.path.exists(os.path.join(cell_dir, "split.json")),
            failed=read_text(os.path.join(cell_dir, "failed")),
            unavailable=read_text(os.path.join(cell_dir, "unavailable")),
            steps=config.get("steps"),
            dir=cell_dir,
        )
        cells.setdefault((dataset, int(labels), method), {})[int(seed[4:])] = cell
    return cells


def finished(cells, dataset, labels, method):
    """{seed: results.json} of the cell's finished seeds."""
    seeds = cells.get((dataset, labels, method), {})
    return {s: c["res"] for s, c in seeds.items() if c["res"]}


def stat(xs, signed=False):
    """mean ± sample std (n=...), or the one value (n=1)."""
    fmt = "{:+.2f}" if signed else "{:.2f}"
    if len(xs) == 1:
        return f"{fmt.format(xs[0])} (n=1)"
    return f"{fmt.format(statistics.mean(xs))} ± {statistics.stdev(xs):.2f} (n={len(xs)})"


def accuracy(cells, dataset, labels, method):
    done = finished(cells, dataset, labels, method)
    if done:
        return stat([100 * r["test_acc"] for r in done.values()])
    states = cells.get((dataset, labels, method), {}).values()
    if any(c["failed"] for c in states):
        return "failed"
    if any(c["started"] for c in states):
        return "running"
    return NA


def paired_differences(cells, dataset, labels, a, b):
    """{seed: accuracy of method a minus method b, in points} over the seeds both finished."""
    done_a = finished(cells, dataset, labels, a)
    done_b = finished(cells, dataset, labels, b)
    return {
        s: 100 * (done_a[s]["test_acc"] - done_b[s]["test_acc"])
        for s in sorted(done_a.keys() & done_b.keys())
    }


def delta(cells, dataset, labels, a, b):
    diffs = paired_differences(cells, dataset, labels, a, b)
    if not diffs:
        return NA
    return stat(list(diffs.values()), signed=True)


def duration(sec):
    if sec < 120:
        return f"{sec:.0f} s"
    if sec < 7200:
        return f"{sec / 60:.0f} min"
    return f"{sec / 3600:.1f} h"


def wall(cells, methods, dataset, labels):
    """Mean wall time per cell and method; a KD cell's includes the outer SNN it reused."""
    outer = finished(cells, dataset, labels, "fixmatch")
    if not outer and not finished(cells, dataset, labels, "fixmatch-2x"):
        return NA
    parts = []
    for method in methods:
        kd = method.startswith("kd")
        times = []
        for seed, res in finished(cells, dataset, labels, method).items():
            if not kd:
                times.append(res["wall_s"])
            elif seed in outer:
                times.append(res["wall_s"] + outer[seed]["wall_s"])
        mean = duration(statistics.mean(times)) if times else NA
        parts.append(f"{SHORT[method]} {mean}")
    return ", ".join(parts)


def trusted(cells, dataset, labels):
    """(mean size / unlabeled, precision) of the KD cells' trusted subsets."""
    results = list(finished(cells, dataset, labels, "kd-ce").values())
    if not results:
        results = list(finished(cells, dataset, labels, "kd-sce").values())
    subsets = [r["trusted"] for r in results if r.get("trusted")]
    if not subsets:
        return NA, NA
    mean_size = statistics.mean(t["trusted_size"] for t in subsets)
    size = f"{mean_size:.0f} / {subsets[0]['unlabeled']}"
    precision = [
        100 * t["trusted_precision"] for t in subsets if t["trusted_precision"] is not None
    ]
    return size, (stat(precision) if precision else NA)


def paper_gain(dataset, labels):
    if dataset not in PAPER_GAIN:
        return "n/a"
    if labels != 4000:
        return "unknown"
    return f"+{PAPER_GAIN[dataset]:.2f}"


def shown_methods(cells, configured):
    """The configured methods, and any other found on disk, in the table's order."""
    on_disk = {key[2] for key in cells}
    return [m for m in METHODS if m in configured or m in on_disk]


def table_rows(cells, datasets, labels):
    """(dataset, labels) rows: the configured grid, then whatever else is on disk."""
    found = sorted({key[0] for key in cells} - set(datasets))
    order = datasets + found
    rows = {(d, n) for d in datasets for n in labels} | {key[:2] for key in cells}
    return sorted(rows, key=lambda row: (order.index(row[0]), row[1]))


def header(cells, rows, cfg):
    """The title and the paragraphs that say what the table's columns are."""
    recorded = [r for (d, n, m) in cells for r in finished(cells, d, n, m).values()]
    archs = sorted({r["arch"] for r in recorded}) or [cfg.arch]
    ks = sorted({r["steps"] for r in recorded if r["method"] == "kdfixmatch"}) or [cfg.steps]
    seeds_seen = sorted({r["seed"] for r in recorded})
    seen = f", finished: {', '.join(map(str, seeds_seen))}" if seeds_seen else ""
    datasets = ", ".join(dict.fromkeys(r[0] for r in rows))
    labels = ", ".join(map(str, sorted({r[1] for r in rows})))
    return [
        "# FixMatch vs KD-FixMatch: test accuracy (%)",
        "",
        f"Rows: datasets {datasets}; labels {labels}; arch {', '.join(archs)}; "
        f"K = {', '.join(map(str, ks))} steps per SNN; seeds 0..{cfg.seeds - 1} configured{seen}.",
        "Accuracy: test accuracy of the final EMA model, mean ± sample std over the finished seeds "
        "(n = how many; `running` = started, not finished; `–` = not started).",
        "KD − FixMatch: mean ± std of the per-seed difference in accuracy points "
        "(a KD cell's outer SNN is the FixMatch cell of its seed). FixMatch 2x steps: FixMatch "
        "trained 2K steps, the SGD steps of KD-FixMatch's outer + inner SNNs (compute-matched; "
        "not in the paper).",
        "Paper's gain: the KD-FixMatch − FixMatch gain the paper reports at 4000 labels, in "
        "accuracy points; it gives no absolute accuracies and no other cells publicly "
        "(`unknown`; `n/a` = not a paper dataset). Trusted: the KD cells' trusted subset (after "
        "DEC) of the unlabeled set, size and pseudo-label precision. Wall time: mean of "
        "results.json's wall_s per cell (not counting Python's start); a KD cell's includes its "
        "reused FixMatch outer SNN.",
        "",
    ]


def unavailable_and_failed(cells, out):
    """({dataset: why it is unavailable}, [(cell path, last line of its failure)])."""
    unavailable, failed = {}, []
    for (dataset, _, _), seeds in sorted(cells.items()):
        some_finished = any(finished(cells, *key) for key in cells if key[0] == dataset)
        for _, cell in sorted(seeds.items()):
            if cell["unavailable"] and not some_finished:
                why = cell["unavailable"].replace("kdfixmatch.py: error: ", "")
                unavailable.setdefault(dataset, why)
            if cell["failed"] and not cell["res"]:
                path = os.path.relpath(cell["dir"], out)
                failed.append((path, cell["failed"].splitlines()[-1]))
    return unavailable, failed


def table_lines(cells, rows, methods, cfg):
    """table.md's lines (without the notes on the plots)."""
    head = [METHODS[m] for m in methods] + [
        "KD(CE) − FixMatch",
        "KD(SCE) − FixMatch",
        "KD(CE) − FixMatch 2x",
        "paper's gain",
        "trusted size",
        "trusted precision (%)",
        "wall time per cell",
    ]
    lines = header(cells, rows, cfg)
    lines += ["| dataset | labels | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
    unavailable, failed = unavailable_and_failed(cells, cfg.out_dir)
    for dataset, labels in rows:
        if dataset in unavailable:
            # One row for the whole dataset, at its smallest label count.
            if labels == min(n for d, n in rows if d == dataset):
                why = f"unavailable offline: {unavailable[dataset]}"
                lines.append(f"| {dataset} | all | {why} |" + " |" * (len(head) - 1))
            continue
        columns = [accuracy(cells, dataset, labels, m) for m in methods]
        columns += [
            delta(cells, dataset, labels, "kd-ce", "fixmatch"),
            delta(cells, dataset, labels, "kd-sce", "fixmatch"),
            delta(cells, dataset, labels, "kd-ce", "fixmatch-2x"),
            paper_gain(dataset, labels),
            *trusted(cells, dataset, labels),
            wall(cells, methods, dataset, labels),
        ]
        lines.append(f"| {dataset} | {labels} | " + " | ".join(columns) + " |")
    if failed:
        lines += ["", "Failed cells (see run.log in the cell's directory):"]
        lines += [f"- `{path}`: {msg}" for path, msg in failed]
    return lines


def curve(cell, method, outer_steps):
    """(steps, accuracies in %) of a cell's metrics.jsonl; a KD cell's after its outer's steps."""
    text = read_text(os.path.join(cell["dir"], "metrics.jsonl")) or ""
    rows = []
    for line in text.splitlines():
        # A last line cut short by a power loss is skipped, as kdfixmatch.py itself does.
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    offset = 0
    if STAGE[method] == "inner":
        offset = cell["steps"] or outer_steps
    points = [
        (offset + r["step"], 100 * r["test_acc"])
        for r in rows
        if r.get("stage") == STAGE[method] and r.get("test_acc") is not None
    ]
    return [p[0] for p in points], [p[1] for p in points]


def curves(cells, dataset, labels, method, outer_steps):
    """{seed: (steps, accuracies)} of the cells that have logged an evaluation."""
    found = {}
    for seed, cell in sorted(cells.get((dataset, labels, method), {}).items()):
        steps, accs = curve(cell, method, outer_steps)
        if steps:
            found[seed] = (steps, accs)
    return found


def mean_curve(per_seed):
    """The mean over seeds at the steps that every seed has reached."""
    common = set.intersection(*(set(steps) for steps, _ in per_seed.values()))
    xs = sorted(common)
    ys = []
    for x in xs:
        at_x = [accs[steps.index(x)] for steps, accs in per_seed.values()]
        ys.append(statistics.mean(at_x))
    return xs, ys


def load_pyplot():
    """matplotlib.pyplot without a display, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def panel_grid(plt, n, width=4.5, height=3.4):
    """A figure with n panels, at most 4 a row; the unused axes are hidden."""
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def figure_legend(fig, axes):
    """One legend for the figure, below the panels, so that it covers no data."""
    handles, names = {}, []
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in handles:
                handles[name] = handle
                names.append(name)
    renderer = fig.canvas.get_renderer()
    # As many columns as fit the figure's width; more rows where they do not.
    for ncol in range(len(names), 0, -1):
        legend = fig.legend(
            [handles[n] for n in names], names, loc="lower center", ncol=ncol, fontsize=8
        )
        box = legend.get_window_extent(renderer)
        if box.width <= 0.98 * fig.bbox.width or ncol == 1:
            break
        legend.remove()
    fig.tight_layout(rect=(0, box.height / fig.bbox.height + 0.02, 1, 1))
    return legend


def label_points(cells, dataset, label_counts, method):
    """[(labels, mean accuracy, std)] of a method over the label counts it has finished."""
    points = []
    for labels in label_counts:
        accs = [100 * r["test_acc"] for r in finished(cells, dataset, labels, method).values()]
        if accs:
            std = statistics.stdev(accs) if len(accs) > 1 else 0
            points.append((labels, statistics.mean(accs), std))
    return points


def plot_table(plt, cells, rows, methods):
    """table.png's figure, or None when no cell has finished."""
    panels = []
    for dataset in dict.fromkeys(r[0] for r in rows):
        label_counts = sorted({n for d, n in rows if d == dataset})
        found = {m: label_points(cells, dataset, label_counts, m) for m in methods}
        found = {m: points for m, points in found.items() if points}
        if found:
            panels.append((dataset, label_counts, found))
    if not panels:
        return None
    fig, axes = panel_grid(plt, len(panels), height=3.6)
    for ax, (dataset, label_counts, found) in zip(axes, panels):
        for method, points in found.items():
            xs, means, stds = zip(*points)
            ax.errorbar(xs, means, stds, marker="o", capsize=3, label=METHODS[method])
        ax.set(xscale="log", title=dataset, xlabel="labels", ylabel="test accuracy (%)")
        ax.set_xticks(label_counts, [str(n) for n in label_counts])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    figure_legend(fig, axes)
    return fig


def plot_curves(plt, cells, rows, methods, outer_steps):
    """curves.png's figure, or None when no cell has logged an evaluation."""
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    panels = []
    for dataset, labels in rows:
        found = {m: curves(cells, dataset, labels, m, outer_steps) for m in methods}
        found = {m: per_seed for m, per_seed in found.items() if per_seed}
        if found:
            panels.append((dataset, labels, found))
    if not panels:
        return None
    fig, axes = panel_grid(plt, len(panels))
    for ax, (dataset, labels, found) in zip(axes, panels):
        for method, per_seed in found.items():
            # One thin line per seed, and their mean, thick, where every seed has a value.
            for steps, accs in per_seed.values():
                ax.plot(steps, accs, color=colours[method], alpha=0.3, linewidth=0.8)
            xs, ys = mean_curve(per_seed)
            name = f"{METHODS[method]} (mean of {len(per_seed)} seeds)"
            # FixMatch's K steps are also FixMatch 2x's first steps: draw the first methods on top.
            zorder = 10 - list(METHODS).index(method)
            ax.plot(
                xs, ys, color=colours[method], linewidth=1.8, marker=".", label=name, zorder=zorder
            )
        if any(STAGE[m] == "inner" for m in found):
            # KD-FixMatch's inner SNN starts after the outer SNN's K steps (the FixMatch curve).
            ax.axvline(
                outer_steps, color="gray", linestyle=":", linewidth=1, label="KD's inner SNN starts"
            )
        ax.set(title=f"{dataset}, {labels} labels", xlabel="SGD step (KD: outer K + inner)")
        ax.set(ylabel="EMA test accuracy (%)")
        ax.grid(alpha=0.3)
    figure_legend(fig, axes)
    return fig


def plot_paired(plt, cells, rows):
    """paired.png's figure, or None when no seed has both cells of a pair finished."""
    panels = []
    for dataset, labels in rows:
        found = [(a, b, paired_differences(cells, dataset, labels, a, b)) for a, b in PAIRS]
        found = [(a, b, diffs) for a, b, diffs in found if diffs]
        if found:
            panels.append((dataset, labels, found))
    if not panels:
        return None
    fig, axes = panel_grid(plt, len(panels), width=5.0, height=3.8)
    for ax, (dataset, labels, found) in zip(axes, panels):
        ax.axhline(0, color="black", linewidth=0.8, linestyle="--")
        for x, (_, _, diffs) in enumerate(found):
            seeds = sorted(diffs)
            for i, seed in enumerate(seeds):
                # Seeds side by side, so that equal differences do not hide each other.
                shift = 0.08 * (i - (len(seeds) - 1) / 2)
                ax.plot(x + shift, diffs[seed], "o", color=f"C{seed % 10}", label=f"seed {seed}")
            mean = statistics.mean(diffs.values())
            ax.plot([x - 0.25, x + 0.25], [mean, mean], color="black", linewidth=2, label="mean")
        names = [f"{SHORT[a]} − {'FM 2x' if b == 'fixmatch-2x' else 'FM'}" for a, b, _ in found]
        ax.set_xticks(range(len(found)), names)
        ax.set_xlim(-0.6, len(found) - 0.4)
        ax.set(title=f"{dataset}, {labels} labels", ylabel="difference (accuracy points)")
        ax.set(xlabel="KD-FixMatch (CE or SCE) minus FixMatch (K or 2K steps)")
        ax.grid(axis="y", alpha=0.3)
    figure_legend(fig, axes)
    return fig


def save_figure(plt, fig, path):
    """Write the figure atomically (a reader never sees half a PNG) and close it."""
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def write_plots(cells, rows, methods, cfg):
    """table.png, curves.png, paired.png -> (written paths, notes for the ones not written)."""
    plt = load_pyplot()
    reasons = {
        "table.png": "no cell has finished yet",
        "curves.png": "no cell has logged an evaluation yet (metrics.jsonl)",
        "paired.png": "no seed has a KD-FixMatch cell and its FixMatch cell finished yet",
    }
    written, notes = [], []
    for name, reason in reasons.items():
        path = os.path.join(cfg.out_dir, name)
        fig = None
        if plt is None:
            reason = MPL_MISSING
        elif name == "table.png":
            fig = plot_table(plt, cells, rows, methods)
        elif name == "curves.png":
            fig = plot_curves(plt, cells, rows, methods, cfg.steps)
        else:
            fig = plot_paired(plt, cells, rows)
        if fig is None:
            # A picture of older results would mislead.
            if os.path.exists(path):
                os.remove(path)
            notes.append(f"{name} not written: {reason}.")
            continue
        save_figure(plt, fig, path)
        written.append(path)
    return written, notes


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True, help="the sweep's directory (run_all.sh --out-dir)")
    p.add_argument("--datasets", default="", help="the configured datasets, space-separated")
    p.add_argument("--labels", default="", help="the configured label counts, space-separated")
    p.add_argument("--seeds", type=int, default=1, help="seeds configured (0..N-1)")
    p.add_argument("--steps", type=int, default=2**20, help="K, steps per SNN")
    p.add_argument("--arch", default="efficientnet_b0", help="the configured architecture")
    p.add_argument("--methods", default="fixmatch kd-ce kd-sce fixmatch-2x", help="configured")
    return p.parse_args(argv)


def main(argv=None):
    cfg = get_args(argv)
    cells = read_cells(cfg.out_dir)
    datasets = cfg.datasets.split()
    labels = [int(n) for n in cfg.labels.split()]
    rows = table_rows(cells, datasets, labels)
    methods = shown_methods(cells, cfg.methods.split())
    lines = table_lines(cells, rows, methods, cfg)
    written, notes = write_plots(cells, rows, methods, cfg)
    if notes:
        lines += [""] + [f"Note: {note}" for note in notes]
    os.makedirs(cfg.out_dir, exist_ok=True)
    table = os.path.join(cfg.out_dir, "table.md")
    with open(table + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(table + ".tmp", table)
    print("\n".join(lines))
    print(f"\nwrote {', '.join([table] + written)}")


if __name__ == "__main__":
    main()
