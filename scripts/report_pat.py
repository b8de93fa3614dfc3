"""Turn the PAT benchmark's JSON into the README's results: two markdown tables and a plot.

Usage::

    python scripts/bench_pat.py --json > bench_pat.json
    python scripts/report_pat.py bench_pat.json [--readme README.md] [--plot docs/pat_results.png] [--check]

The input is the file bench_pat.py printed to; other lines (progress, warnings)
may come before the result, so the last line that is a JSON object with a
``"tasks"`` key is taken. Its shape::

    {"seeds": 5, "quick": false,
     "tasks": [{"task": NAME, "methods": {"oracle" | "pat" | "in_silico" | "ablation":
                                              {"mean": A, "sd": S, "values": [...]}},
                "logistic": A, "device_samples": {"pat": N, ...}}, ...],
     "sweep": [{"gap": G, "twin_nmse": E, "oracle": A, "pat": A, "in_silico": A, "seeds": K}, ...],
     "twins": [{"system": NAME, "noise_floor": E, "physics": E, "residual": E, "mlp": E,
                "device_samples": N, "best": KIND}, ...]}

Accuracies are fractions; they are shown in percent. Anything missing (a task
run without the oracle, no sweep, no twins) shows as a dash or an empty
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
METHODS = ("pat", "in_silico", "oracle", "ablation")
METHOD_LABELS = {"pat": "PAT", "in_silico": "in silico", "oracle": "oracle", "ablation": "digital ablation"}
SWEEP_METHODS = ("oracle", "pat", "in_silico")
TWIN_KINDS = ("physics", "residual", "mlp")
TWIN_LABELS = {"physics": "physics", "residual": "residual", "mlp": "MLP"}
DASH = "—"


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


def count(value) -> str:
    n = number(value)
    return DASH if n is None else f"{int(n):,}"


def nmse(value) -> str:
    x = number(value)
    return DASH if x is None else f"{x:.1e}"


def seeds_line(result: dict) -> str:
    seeds = number(result.get("seeds"))
    over = f"over {int(seeds)} seed{'s' if seeds != 1 else ''}" if seeds is not None else "over the seeds run"
    run = "a `--quick` run (smaller data, fewer epochs)" if result.get("quick") else "a full run (not `--quick`)"
    return (f"Test accuracy on the simulated physical devices in percent, mean ± sd {over}; {run}. "
            "Device samples: every measurement PAT cost (calibration, initialisation and training).")


def task_table(result: dict) -> str:
    header = [*(METHOD_LABELS[m] for m in METHODS), "logistic regression", "device samples (PAT)"]
    rows = ["| task | " + " | ".join(header) + " |",
            "|---|" + "---:|" * len(header)]
    for task in result.get("tasks", []):
        if not isinstance(task, dict):
            continue
        methods = task.get("methods") if isinstance(task.get("methods"), dict) else {}
        samples = task.get("device_samples") if isinstance(task.get("device_samples"), dict) else {}
        cells = [f"`{task.get('task', '?')}`", *(mean_sd(methods.get(m)) for m in METHODS),
                 percent(task.get("logistic")), count(samples.get("pat"))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


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
    header = ["system", "noise floor", *(TWIN_LABELS[k] for k in TWIN_KINDS), "best / floor", "device samples"]
    rows = ["| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1)]
    for twin in result.get("twins") or []:
        if not isinstance(twin, dict):
            continue
        best = best_twin(twin)
        cells = [f"`{twin.get('system', '?')}`", nmse(twin.get("noise_floor"))]
        # bold marks the best twin, so the ratio column needs no name
        cells += [f"**{nmse(twin[k])}**" if k == best else nmse(twin.get(k)) for k in TWIN_KINDS]
        floor = number(twin.get("noise_floor"))
        # a zero floor (a noiseless device) has no meaningful ratio
        ratio = f"{number(twin[best]) / floor:.1f}x" if best is not None and floor else DASH
        cells += [ratio, count(twin.get("device_samples"))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


TWINS_LINE = ("Twin NMSE on held-out device measurements, next to the device's noise floor (the NMSE of one "
              "measurement against the noise-free output, estimated from repeats); bold: the twin the benchmark "
              "chose (on its early-stopping samples, not on this NMSE), whose "
              "ratio to the floor is shown. Near 1x, what the twin still misses is the device's own noise.")


def results_block(result: dict, image_link: str) -> str:
    """The markdown that goes between the README's markers."""
    parts = [task_table(result), "", seeds_line(result)]
    if result.get("twins"):
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
    """Left: each task's accuracy by method, logistic regression as a bar-wide line; right: the gap sweep."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window: this runs in CI and over ssh
    import matplotlib.pyplot as plt

    tasks = [t for t in result.get("tasks", []) if isinstance(t, dict)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:gray")))
    width = 0.8 / len(METHODS)
    for j, m in enumerate(METHODS):
        xs, ys, errs = [], [], []
        for i, task in enumerate(tasks):
            entry = (task.get("methods") or {}).get(m)
            mean = number(entry.get("mean")) if isinstance(entry, dict) else None
            if mean is None:
                continue  # not run for this task: a gap in the group, not a zero bar
            xs.append(i - 0.4 + (j + 0.5) * width)
            ys.append(100 * mean)
            errs.append(100 * (number(entry.get("sd")) or 0.0))
        if xs:
            left.bar(xs, ys, width, yerr=errs, capsize=3, color=colors[m], label=METHOD_LABELS[m])
    logistic = [(i, number(t.get("logistic"))) for i, t in enumerate(tasks)]
    logistic = [(i, v) for i, v in logistic if v is not None]
    for k, (i, v) in enumerate(logistic):
        left.hlines(100 * v, i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1.5,
                    label="logistic regression" if k == 0 else None)
    left.set_xticks(range(len(tasks)), [str(t.get("task", "?")) for t in tasks])
    left.set_ylabel("test accuracy (%)")
    left.set_title("Accuracy by method")

    sweep = [p for p in result.get("sweep") or [] if isinstance(p, dict)]
    # a log axis cannot show a zero NMSE (a perfect twin)
    sweep = sorted((p for p in sweep if (number(p.get("twin_nmse")) or 0) > 0), key=lambda p: p["twin_nmse"])
    markers = dict(zip(SWEEP_METHODS, ("s", "o", "^")))
    for m in SWEEP_METHODS:
        points = [(p["twin_nmse"], 100 * number(p[m])) for p in sweep if number(p.get(m)) is not None]
        if points:
            right.plot(*zip(*points), marker=markers[m], color=colors[m], label=METHOD_LABELS[m])
    right.set_xscale("log")
    right.set_xlabel("twin NMSE (log scale)")
    right.set_ylabel("test accuracy (%)")
    right.set_title("Across the sim-reality gap")
    if not sweep:
        right.text(0.5, 0.5, "no sweep in this run", ha="center", va="center", transform=right.transAxes)

    fig.suptitle("Physics-aware training against in silico training" + (" (--quick)" if result.get("quick") else ""))
    # one legend under both panels (a method has one colour in both): inside the bar panel it would hide bars
    handles, labels = left.get_legend_handles_labels()
    if not handles:
        handles, labels = right.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
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
