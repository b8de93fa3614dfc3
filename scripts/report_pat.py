"""Turn the PAT benchmark's JSON into the README's results: markdown tables and a plot.

Usage::

    python scripts/bench_pat.py --json > bench_pat.json
    python scripts/report_pat.py bench_pat.json [--readme README.md] [--plot docs/pat_results.png] [--check]

The input is the file bench_pat.py printed to; other lines (progress, warnings)
may come before the result, so the last line that is a JSON object with a
``"tasks"`` key is taken. Its shape (what is read here; see bench_pat.py)::

    {"seeds": 5, "quick": false,
     "tasks": [{"task": NAME, "runs": N, "paper": A | null,
                "methods": {"pat" | "in_silico" | "oracle" | "ablation" | "digital":
                            {"mean": A, "sd": S, "n": N, "values": [...], "val_mean": A, "seconds": T}},
                "logistic": A, "logistic_sd": S, "logistic_at_edge": K, "device_samples": {"pat": N, ...},
                "targets": {"pat_over_ablation": D, "pat_over_digital": D, "pat_over_logistic": D,
                            "oracle_minus_pat": D, "pat_minus_paper": D}}, ...],
     "sweep": [{"gap": G, "control": bool, "twin_nmse": E, "grad_cosine": C | null, "seeds": K,
                "oracle": A, "oracle_sd": S, "pat": A, "pat_sd": S, "in_silico": A, "in_silico_sd": S}, ...],
     "twins": [{"system": NAME, "noise_floor": E, "physics": E, "residual": E, "mlp": E,
                "device_samples": N, "best": KIND}, ...]}

``ablation`` is a fixed random orthogonal map in place of each physical layer
("random-map ablation"), ``digital`` a trainable MLP with as many parameters as
the device has settings ("digital (matched)"); ``paper`` is the paper's
accuracy on the task; ``targets`` are differences of mean accuracy (fractions,
shown in signed percentage points; any may be null); ``logistic_at_edge``
counts the runs whose regularisation was chosen at the grid's edge. The sweep's
control row (gap 0, no unmodelled physics, no drift) is where PAT must match
the oracle; ``grad_cosine`` is the cosine between PAT's gradient and the exact one.

Accuracies are fractions; they are shown in percent. Anything missing (a task
run without the oracle, no sweep, no twins, an older result without the
digital control, the paper, runs, targets or sds) shows as a dash or an empty
panel rather than failing, and keys not listed here are ignored.

What is written: the tables and an image link replace whatever lies between
``<!-- pat-results:start -->`` and ``<!-- pat-results:end -->`` in the README
(the markers themselves are placed by hand, under "Benchmarks"); the plot goes
to ``--plot``. ``--check`` writes nothing and exits 1 when the README's block
is not what this JSON gives, so a stale README is visible in review or CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_MARKER = "<!-- pat-results:start -->"
END_MARKER = "<!-- pat-results:end -->"

# table and plot order: the method under test first, then what it is measured against
METHODS = ("pat", "in_silico", "oracle", "ablation", "digital")
METHOD_LABELS = {"pat": "PAT", "in_silico": "in silico", "oracle": "oracle", "ablation": "random-map ablation",
                 "digital": "digital (matched)"}
SWEEP_METHODS = ("oracle", "pat", "in_silico")
# the targets table: each difference's key in the result and its column
TARGETS = (("pat_over_ablation", "PAT − ablation"), ("pat_over_digital", "PAT − digital"),
           ("pat_over_logistic", "PAT − logistic"), ("oracle_minus_pat", "oracle − PAT"),
           ("pat_minus_paper", "PAT − paper"))
TWIN_KINDS = ("physics", "residual", "mlp", "structured")
TWIN_LABELS = {"physics": "physics", "residual": "residual", "mlp": "MLP", "structured": "structured"}
DASH = "—"
MINUS = "−"


class ReportError(Exception):
    """A problem with the inputs that the user fixes (a file, the README's markers); one line says which."""


def number(value) -> float | None:
    """A finite number from the JSON, or None: a missing or malformed entry shows as a dash, not a crash."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def load_result(path: Path) -> dict:
    """The benchmark's result: the last line of ``path`` that is a JSON object with a "tasks" key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ReportError(f"{path}: cannot read it ({e.strerror or e})") from None
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("tasks"), list):
            return obj
    # a result saved pretty-printed (e.g. through `python -m json.tool`) is one object over many lines
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("tasks"), list):
        return obj
    raise ReportError(f"{path}: no JSON line with a \"tasks\" list "
                      "(expected the output of `python scripts/bench_pat.py --json`)")


def percent(fraction) -> str:
    x = number(fraction)
    return DASH if x is None else f"{100 * x:.1f}"


def mean_sd(entry) -> str:
    """ "91.2 ± 0.8" in percent; just the mean when the sd is missing, a dash when the method did not run."""
    if not isinstance(entry, dict) or number(entry.get("mean")) is None:
        return DASH
    sd = number(entry.get("sd"))
    mean = percent(entry["mean"])
    return mean if sd is None else f"{mean} ± {100 * sd:.1f}"


def points(difference) -> str:
    """A difference of fractions in signed percentage points ("+2.1", "−3.4"); "0.0" when it rounds to zero."""
    x = number(difference)
    if x is None:
        return DASH
    text = f"{abs(100 * x):.1f}"
    if text.strip("0.") == "":
        return text
    return ("+" if x > 0 else MINUS) + text


def count(value) -> str:
    n = number(value)
    return DASH if n is None else f"{int(n):,}"


def nmse(value) -> str:
    x = number(value)
    return DASH if x is None else f"{x:.1e}"


def dicts(items) -> list[dict]:
    """The entries of a JSON list that are objects (a missing list or a malformed entry is skipped)."""
    return [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []


def seeds_line(result: dict) -> str:
    tasks = dicts(result.get("tasks"))
    if any(number(t.get("runs")) is not None for t in tasks):
        # paired runs: their number differs by task (vowels runs one per fold), so the table gives it
        over = ("over each task's paired runs (column runs: all methods of a run share its device copies, "
                "noise streams, seed and data split)")
    else:
        seeds = number(result.get("seeds"))
        over = f"over {int(seeds)} seed{'s' if seeds != 1 else ''}" if seeds is not None else "over the seeds run"
    run = "a `--quick` run (smaller data, fewer epochs)" if result.get("quick") else "a full run (not `--quick`)"
    line = (f"Test accuracy on the simulated physical devices in percent, mean ± sd {over}; {run}. "
            "Random-map ablation: a fixed random orthogonal map in place of each physical layer; digital "
            "(matched): a trainable MLP with as many parameters as the device has settings; paper: the paper's "
            "figure. Device samples: every measurement PAT cost (calibration, initialisation and training).")
    edges = []
    for t in tasks:
        k, n = number(t.get("logistic_at_edge")), number(t.get("runs"))
        if k:
            edges.append(f"`{t.get('task', '?')}` {int(k)}" + (f" of {int(n)}" if n is not None else ""))
    if edges:
        line += (" Logistic regression's regularisation was chosen at its grid's edge in "
                 + ", ".join(edges) + " runs.")
    return line


def task_table(result: dict) -> str:
    header = [*(METHOD_LABELS[m] for m in METHODS), "logistic regression", "paper", "runs", "device samples (PAT)"]
    rows = ["| task | " + " | ".join(header) + " |",
            "|---|" + "---:|" * len(header)]
    for task in dicts(result.get("tasks")):
        methods = task.get("methods") if isinstance(task.get("methods"), dict) else {}
        samples = task.get("device_samples") if isinstance(task.get("device_samples"), dict) else {}
        # an older result has a bare logistic mean and no sd: mean_sd shows the mean alone
        logistic = {"mean": task.get("logistic"), "sd": task.get("logistic_sd")}
        cells = [f"`{task.get('task', '?')}`", *(mean_sd(methods.get(m)) for m in METHODS),
                 mean_sd(logistic), percent(task.get("paper")), count(task.get("runs")), count(samples.get("pat"))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets_table(result: dict) -> str:
    rows = ["| task | " + " | ".join(label for _, label in TARGETS) + " |",
            "|---|" + "---:|" * len(TARGETS)]
    for task in dicts(result.get("tasks")):
        targets = task.get("targets") if isinstance(task.get("targets"), dict) else {}
        cells = [f"`{task.get('task', '?')}`", *(points(targets.get(k)) for k, _ in TARGETS)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


TARGETS_LINE = ("Targets: differences of mean test accuracy in percentage points. PAT − ablation, − digital and "
                "− logistic: what the physical layers trained with PAT add over each control (positive: PAT is "
                "ahead); oracle − PAT: what training through the twin instead of the exact physics costs; "
                "PAT − paper: against the paper's figure (a dash where the paper has none).")


def gap_cell(point: dict) -> str:
    if point.get("control") is True:
        return "0 (control)"
    gap = number(point.get("gap"))
    return DASH if gap is None else f"{gap:g}"


def cosine(value) -> str:
    x = number(value)
    return DASH if x is None else f"{x:.3f}"


def sweep_table(result: dict) -> str:
    header = ["gap", "twin NMSE", "gradient cosine", *(METHOD_LABELS[m] for m in SWEEP_METHODS), "seeds"]
    rows = ["| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1)]
    for point in dicts(result.get("sweep")):
        cells = [gap_cell(point), nmse(point.get("twin_nmse")), cosine(point.get("grad_cosine")),
                 *(mean_sd({"mean": point.get(m), "sd": point.get(f"{m}_sd")}) for m in SWEEP_METHODS),
                 count(point.get("seeds"))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


SWEEP_LINE = ("Sweep: `hybrid_mnist` trained through the uncalibrated ideal twin while the devices' miscalibration "
              "(gap) grows; twin NMSE measured on the devices; gradient cosine: between PAT's gradient and the "
              "exact one on a validation batch (1: exact). Test accuracy in percent, mean ± sd over the seeds. The "
              "control row has no miscalibration, unmodelled physics or drift: the twin is the exact physics "
              "there, and PAT should match the oracle.")


def best_twin(twin: dict) -> str | None:
    """The twin kind the benchmark chose ("best"); the lowest NMSE shown only when it named none.

    The benchmark chooses on its early-stopping samples, not on the held-out
    NMSE in this table: picking again here by the lowest shown NMSE would be
    selecting on the validation split, and could disagree with the run.
    """
    fitted = {k: number(twin.get(k)) for k in TWIN_KINDS}
    fitted = {k: v for k, v in fitted.items() if v is not None}
    if twin.get("best") in fitted:
        return twin["best"]
    return min(fitted, key=fitted.get) if fitted else None


def twin_table(result: dict) -> str:
    header = ["system", "noise floor", *(TWIN_LABELS[k] for k in TWIN_KINDS), "best / floor", "device samples",
              "operating: floor", "best / floor", "sequential: samples to the best's NMSE"]
    rows = ["| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1)]
    for twin in dicts(result.get("twins")):
        best = best_twin(twin)
        # a row the last run did not measure again keeps its figures, said so (the JSON's "stale" says why)
        stale = " (earlier code)" if twin.get("stale") else ""
        cells = [f"`{twin.get('system', '?')}`{stale}", nmse(twin.get("noise_floor"))]
        # bold marks the best twin, so the ratio column needs no name
        cells += [f"**{nmse(twin[k])}**" if k == best else nmse(twin.get(k)) for k in TWIN_KINDS]
        floor = number(twin.get("noise_floor"))
        # a zero floor (a noiseless device) has no meaningful ratio
        ratio = f"{number(twin[best]) / floor:.1f}x" if best is not None and floor else DASH
        cells += [ratio, count(twin.get("device_samples"))]
        op = twin.get("operating") if isinstance(twin.get("operating"), dict) else {}
        op_floor, op_best = number(op.get("noise_floor")), number(op.get(best)) if best is not None else None
        cells += [nmse(op_floor), f"{op_best / op_floor:.1f}x" if op_best is not None and op_floor else DASH]
        seq = twin.get("sequential") if isinstance(twin.get("sequential"), dict) else {}
        if seq.get("reached"):
            cells.append(count(seq.get("samples")))
        elif seq:
            cells.append(f"not within {count(seq.get('budget'))}")
        else:
            cells.append(DASH)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


TWINS_LINE = ("Twin NMSE on held-out device measurements, next to the device's noise floor (the NMSE of one "
              "measurement against the noise-free output, estimated from repeats); bold: the twin the benchmark "
              "chose (on its early-stopping samples, not on this NMSE), whose "
              "ratio to the floor is shown. Near 1x, what the twin still misses is the device's own noise. "
              "Operating: the same twins on settings and inputs drawn from where a trained network ran the device, "
              "next to that region's own floor. Sequential: the device samples sequential calibration needed to "
              "reach the best twin's NMSE (target: half of its 20,000).")


def results_block(result: dict, image_link: str) -> str:
    """The markdown that goes between the README's markers."""
    parts = [task_table(result), "", seeds_line(result)]
    if any(isinstance(t.get("targets"), dict) for t in dicts(result.get("tasks"))):
        parts += ["", targets_table(result), "", TARGETS_LINE]
    if dicts(result.get("sweep")):
        parts += ["", sweep_table(result), "", SWEEP_LINE]
    if dicts(result.get("twins")):
        parts += ["", twin_table(result), "", TWINS_LINE]
    parts += ["", f"![PAT results]({image_link})"]
    return "\n".join(parts)


def replace_block(readme_text: str, block: str, readme_name: str = "README.md") -> str:
    """``readme_text`` with what lies between the markers replaced by ``block``."""
    start, end = readme_text.find(START_MARKER), readme_text.find(END_MARKER)
    if (start < 0 or end < 0 or end < start
            or readme_text.count(START_MARKER) != 1 or readme_text.count(END_MARKER) != 1):
        raise ReportError(f"{readme_name}: needs one '{START_MARKER}' line followed by one '{END_MARKER}' line; "
                          "add them under its Benchmarks section, where the results should go")
    head = readme_text[: start + len(START_MARKER)]
    return f"{head}\n{block}\n{readme_text[end:]}"


def image_link(plot: Path, readme: Path) -> str:
    # the link is resolved by whoever renders the README, so it is relative to the README's folder
    return Path(os.path.relpath(Path(plot).resolve(), Path(readme).resolve().parent)).as_posix()


def plot_results(result: dict, path: Path) -> None:
    """Left: each task's accuracy by method, logistic regression as a bar-wide line, the paper's figure as a
    black dash; right: accuracy against twin NMSE across the gap sweep, the control as stars."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window: this runs in CI and over ssh
    import matplotlib.pyplot as plt

    tasks = dicts(result.get("tasks"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": (3, 2)})
    colors = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:gray", "tab:purple")))
    width = 0.8 / len(METHODS)
    for j, m in enumerate(METHODS):
        xs, ys, errs = [], [], []
        for i, task in enumerate(tasks):
            methods = task.get("methods") if isinstance(task.get("methods"), dict) else {}
            entry = methods.get(m)
            mean = number(entry.get("mean")) if isinstance(entry, dict) else None
            if mean is None:
                continue  # not run for this task: a gap in the group, not a zero bar
            xs.append(i - 0.4 + (j + 0.5) * width)
            ys.append(100 * mean)
            errs.append(100 * (number(entry.get("sd")) or 0.0))
        if xs:
            left.bar(xs, ys, width, yerr=errs, capsize=2, color=colors[m], label=METHOD_LABELS[m])
    logistic = [(i, number(t.get("logistic"))) for i, t in enumerate(tasks)]
    logistic = [(i, v) for i, v in logistic if v is not None]
    for k, (i, v) in enumerate(logistic):
        left.hlines(100 * v, i - 0.45, i + 0.45, colors="tab:red", linestyles="--", linewidth=1.5,
                    label="logistic regression" if k == 0 else None)
    paper = [(i, number(t.get("paper"))) for i, t in enumerate(tasks)]
    paper = [(i, 100 * v) for i, v in paper if v is not None]
    if paper:
        # a thick black dash at the group's centre, distinct from logistic regression's dashed line
        left.plot(*zip(*paper), linestyle="none", marker="_", markersize=22, markeredgewidth=3,
                  color="black", label="paper")
    left.set_xticks(range(len(tasks)), [str(t.get("task", "?")) for t in tasks], fontsize=8)
    left.set_ylabel("test accuracy (%)")
    left.set_title("Accuracy by method")

    sweep = dicts(result.get("sweep"))
    # a log axis cannot show a zero NMSE (a perfect twin)
    sweep = sorted((p for p in sweep if (number(p.get("twin_nmse")) or 0) > 0), key=lambda p: p["twin_nmse"])
    control = [p for p in sweep if p.get("control") is True]
    gaps = [p for p in sweep if p.get("control") is not True]
    markers = dict(zip(SWEEP_METHODS, ("s", "o", "^")))
    for m in SWEEP_METHODS:
        line = [(p["twin_nmse"], 100 * number(p[m])) for p in gaps if number(p.get(m)) is not None]
        if line:
            right.plot(*zip(*line), marker=markers[m], color=colors[m], label=METHOD_LABELS[m])
        stars = [(p["twin_nmse"], 100 * number(p[m])) for p in control if number(p.get(m)) is not None]
        if stars:
            # the control (no gap, no unmodelled physics, no drift) is no point on the gap's curve
            right.plot(*zip(*stars), linestyle="none", marker="*", markersize=13, color=colors[m],
                       markeredgecolor="black", label="control (no gap)" if m == "pat" else None)
    for p in control:
        y = number(p.get("pat"))
        if y is not None:
            right.annotate("control", (p["twin_nmse"], 100 * y), textcoords="offset points", xytext=(8, 6),
                           fontsize=8)
    with_cosine = bool(sweep) and all(number(p.get("grad_cosine")) is not None for p in sweep)
    if with_cosine:
        # each point's gradient cosine, under its PAT marker
        for p in sweep:
            y = number(p.get("pat"))
            if y is not None:
                right.annotate(f"{number(p['grad_cosine']):.3g}", (p["twin_nmse"], 100 * y),
                               textcoords="offset points", xytext=(0, -13), ha="center", fontsize=7,
                               color=colors["pat"])
    right.set_xscale("log")
    right.set_xlabel("twin NMSE (log scale)" + ("; under PAT: its gradient cosine" if with_cosine else ""))
    right.set_ylabel("test accuracy (%)")
    right.set_title("Across the sim-reality gap")
    if not sweep:
        right.text(0.5, 0.5, "no sweep in this run", ha="center", va="center", transform=right.transAxes)

    fig.suptitle("Physics-aware training against in silico training" + (" (--quick)" if result.get("quick") else ""))
    # one legend under both panels (a method has one colour in both): inside the bar panel it would hide bars
    handles, labels = left.get_legend_handles_labels()
    for h, label in zip(*right.get_legend_handles_labels()):
        if label not in labels:
            handles.append(h)
            labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 9), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", type=Path, help="file holding the JSON line printed by bench_pat.py --json")
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "pat_results.png")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the README's results block is not what RESULT gives")
    args = p.parse_args(argv)
    try:
        result = load_result(args.result)
        try:
            readme_text = args.readme.read_text(encoding="utf-8")
        except OSError as e:
            raise ReportError(f"{args.readme}: cannot read it ({e.strerror or e})") from None
        block = results_block(result, image_link(args.plot, args.readme))
        updated = replace_block(readme_text, block, str(args.readme))
    except ReportError as e:
        print(f"report_pat: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if updated != readme_text:
            print(f"report_pat: {args.readme}'s results are stale: run "
                  f"`python scripts/report_pat.py {args.result}` and commit the README", file=sys.stderr)
            return 1
        print(f"{args.readme}: results block is up to date with {args.result}")
        return 0
    plot_results(result, args.plot)
    if updated != readme_text:
        args.readme.write_text(updated, encoding="utf-8")
    print(f"wrote the results block in {args.readme} and the plot {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
