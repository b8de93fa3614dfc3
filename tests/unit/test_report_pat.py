"""scripts/report_pat.py: the PAT benchmark's JSON becomes the README's tables and plot.

The results here are synthetic (round numbers like 0.5 and 0.6): these tests
check the formatting and the README round trip, not any measurement.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import ROOT

SCRIPT = ROOT / "scripts" / "report_pat.py"
START, END = "<!-- pat-results:start -->", "<!-- pat-results:end -->"


def load_script():
    # scripts/ is not a package: load the file as a module of its own
    spec = importlib.util.spec_from_file_location("report_pat", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_pat = load_script()


def synthetic_result() -> dict:
    return {
        "seeds": 3,
        "quick": True,
        "tasks": [
            {"task": "task_a",
             "methods": {"oracle": {"mean": 0.6, "sd": 0.01, "values": [0.59, 0.6, 0.61]},
                         "pat": {"mean": 0.5, "sd": 0.02},
                         "in_silico": {"mean": 0.4, "sd": 0.03, "values": [0.37, 0.4, 0.43]},
                         "ablation": {"mean": 0.3, "sd": 0.0}},
             "logistic": 0.45,
             "device_samples": {"pat": 1000, "in_silico": 100, "oracle": 500, "ablation": 0}},
            # no oracle (a real device has none) and no sd: dashes and a bare mean, not a crash
            {"task": "task_b",
             "methods": {"pat": {"mean": 0.7}, "in_silico": {"mean": 0.6, "sd": 0.05},
                         "ablation": {"mean": 0.55, "sd": 0.01}},
             "logistic": 0.65, "device_samples": {"pat": 2000},
             "unknown_key": "ignored"},
        ],
        "sweep": [
            {"gap": 1.0, "twin_nmse": 0.1, "oracle": 0.6, "pat": 0.55, "in_silico": 0.4, "seeds": 3},
            {"gap": 0.5, "twin_nmse": 0.01, "oracle": 0.6, "pat": 0.58, "in_silico": 0.5, "seeds": 3},
        ],
        "twins": [
            {"system": "system_x", "noise_floor": 0.01, "physics": 0.05, "residual": 0.012, "mlp": 1.5,
             "device_samples": 3000, "operating": {"noise_floor": 0.002, "residual": 0.003},
             "sequential": {"reached": True, "samples": 1200, "budget": 1500}},
            # the benchmark chose physics on its early-stopping samples although residual shows less here
            {"system": "system_y", "noise_floor": 0.02, "physics": 0.05, "residual": 0.03, "mlp": 0.5,
             "device_samples": 4000, "best": "physics", "best_ratio": 2.5},
        ],
        "seconds": 1.0,
        "extra_top_level": {"anything": 1},
    }


@pytest.fixture
def lab(tmp_path):
    """A result file, a README holding the markers, and where the plot goes."""
    result = tmp_path / "bench_pat.json"
    result.write_text("progress line from stderr that ended up here\n" + json.dumps(synthetic_result()) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Benchmarks\n\n{START}\nold results\n{END}\n\n## After\n", encoding="utf-8")
    plot = tmp_path / "docs" / "pat_results.png"
    return result, readme, plot


def run(lab, *extra):
    result, readme, plot = lab
    return report_pat.main([str(result), "--readme", str(readme), "--plot", str(plot), *extra])


def block_of(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    return text[text.index(START) + len(START): text.index(END)]


def test_tables_plot_and_image_link_replace_what_lies_between_the_markers(lab):
    result, readme, plot = lab
    assert run(lab) == 0

    block = block_of(readme)
    assert "old results" not in block
    lines = block.splitlines()
    header = ("| task | PAT | in silico | oracle | random-map ablation | digital (matched) | logistic regression "
              "| paper | runs | device samples (PAT) |")
    assert header in lines
    # an older result: no digital control, a bare logistic mean, no paper or runs: dashes
    assert "| `task_a` | 50.0 ± 2.0 | 40.0 ± 3.0 | 60.0 ± 1.0 | 30.0 ± 0.0 | — | 45.0 | — | — | 1,000 |" in lines
    assert "| `task_b` | 70.0 | 60.0 ± 5.0 | — | 55.0 ± 1.0 | — | 65.0 | — | — | 2,000 |" in lines
    assert "PAT − ablation" not in block  # no targets in it, so no targets table
    assert "| 0.5 | 1.0e-02 | — | 60.0 | 58.0 | 50.0 | 3 |" in lines  # sweep rows without sds or cosines
    assert any("over 3 seeds" in line and "`--quick` run" in line for line in lines)
    # no structured twin on this system; its operating region's floor and the best twin's ratio there; the
    # samples sequential calibration needed
    assert ("| `system_x` | 1.0e-02 | 5.0e-02 | **1.2e-02** | 1.5e+00 | — | 1.2x | 3,000 | 2.0e-03 | 1.5x | 1,200 |"
            in lines)
    assert "| `system_y` | 2.0e-02 | **5.0e-02** | 3.0e-02 | 5.0e-01 | — | 2.5x | 4,000 | — | — | — |" in lines
    assert "![PAT results](docs/pat_results.png)" in lines

    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\n## Benchmarks\n\n") and text.endswith(f"{END}\n\n## After\n")
    assert plot.is_file() and plot.stat().st_size > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_passes_right_after_writing_and_fails_once_the_results_change(lab, capsys):
    result, readme, plot = lab
    assert run(lab) == 0
    written = readme.read_text(encoding="utf-8")
    plot.unlink()

    assert run(lab, "--check") == 0

    changed = synthetic_result()
    changed["tasks"][0]["methods"]["pat"]["mean"] = 0.55
    result.write_text(json.dumps(changed) + "\n")
    capsys.readouterr()
    assert run(lab, "--check") == 1
    assert "stale" in capsys.readouterr().err
    # --check writes nothing: neither the README nor the plot
    assert readme.read_text(encoding="utf-8") == written
    assert not plot.exists()


def test_a_readme_without_the_markers_is_refused_naming_them_and_left_untouched(lab, capsys):
    result, readme, plot = lab
    readme.write_text("# Title\n\n## Benchmarks\n", encoding="utf-8")
    assert run(lab) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert START in err and END in err and "Benchmarks" in err
    assert readme.read_text(encoding="utf-8") == "# Title\n\n## Benchmarks\n"
    assert not plot.exists()


def test_a_file_with_no_result_line_is_refused_naming_the_file(lab, capsys):
    result, readme, plot = lab
    result.write_text('progress only\n{"not": "a result"}\nnot json {\n')
    assert run(lab) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(result) in err and "tasks" in err


def test_the_last_result_line_wins_over_earlier_ones(tmp_path):
    first, last = synthetic_result(), synthetic_result()
    last["seeds"] = 7
    path = tmp_path / "two_runs.json"
    path.write_text(json.dumps(first) + "\n" + json.dumps(last) + "\ntrailing log line\n")
    assert report_pat.load_result(path)["seeds"] == 7


def test_a_run_without_sweep_or_twins_still_gives_a_table_and_a_plot(lab):
    result, readme, plot = lab
    bare = {"tasks": [{"task": "task_c", "methods": {"pat": {"mean": 0.5, "sd": 0.1}}}]}
    result.write_text(json.dumps(bare) + "\n")
    assert run(lab) == 0
    block = block_of(readme)
    assert "| `task_c` | 50.0 ± 10.0 | — | — | — | — | — | — | — | — |" in block.splitlines()
    assert "system" not in block  # no twins table when the run measured no twins
    assert "twin NMSE" not in block  # nor a sweep table without a sweep
    assert "a full run" in block
    assert plot.stat().st_size > 0


def new_format_result() -> dict:
    """bench_pat.py's current shape: five methods, paired runs, the paper, targets, a sweep with its control."""
    def method(mean, sd, n=3):
        return {"mean": mean, "sd": sd, "n": n, "values": [mean] * n, "val_mean": mean, "seconds": 2.0}

    return {
        "seeds": 3,
        "quick": False,
        "tasks": [
            {"task": "task_a", "runs": 3, "paper": 0.52,
             "methods": {"pat": method(0.5, 0.02), "in_silico": method(0.4, 0.03), "oracle": method(0.6, 0.01),
                         "ablation": method(0.3, 0.0), "digital": method(0.479, 0.015)},
             "logistic": 0.45, "logistic_sd": 0.004, "logistic_val": 0.46, "logistic_C": [1.0, 1.0, 1e4],
             "logistic_at_edge": 1, "device_samples": {"pat": 1000, "digital": 0},
             "targets": {"pat_over_ablation": 0.2, "pat_over_digital": 0.021, "pat_over_logistic": 0.05,
                         "oracle_minus_pat": 0.1, "pat_minus_paper": -0.034}},
            # the paper has no figure for this task: a dash in both tables
            {"task": "task_b", "runs": 20, "paper": None,
             "methods": {"pat": method(0.7, 0.01, 20), "in_silico": method(0.6, 0.05, 20),
                         "oracle": method(0.72, 0.02, 20), "ablation": method(0.55, 0.01, 20),
                         "digital": method(0.65, 0.02, 20)},
             "logistic": 0.65, "logistic_sd": 0.01, "logistic_at_edge": 0, "device_samples": {"pat": 2000},
             "targets": {"pat_over_ablation": 0.15, "pat_over_digital": 0.05, "pat_over_logistic": 0.05,
                         "oracle_minus_pat": 0.02, "pat_minus_paper": None}},
        ],
        "sweep": [
            {"gap": 0.0, "control": True, "twin_nmse": 0.001, "grad_cosine": 0.999, "seeds": 2,
             "oracle": 0.6, "oracle_sd": 0.01, "pat": 0.6, "pat_sd": 0.01, "in_silico": 0.6, "in_silico_sd": 0.01},
            {"gap": 0.5, "control": False, "twin_nmse": 0.01, "grad_cosine": 0.95, "seeds": 2,
             "oracle": 0.6, "oracle_sd": 0.01, "pat": 0.58, "pat_sd": 0.02, "in_silico": 0.5, "in_silico_sd": 0.04},
            {"gap": 2.5, "control": False, "twin_nmse": 0.1, "grad_cosine": 0.7, "seeds": 2,
             "oracle": 0.6, "oracle_sd": 0.01, "pat": 0.55, "pat_sd": 0.03, "in_silico": 0.4, "in_silico_sd": 0.05},
        ],
        "twins": [
            {"system": "system_x", "noise_floor": 0.01, "physics": 0.05, "residual": 0.012, "mlp": 1.5,
             "device_samples": 3000, "best": "residual"},
        ],
        "seconds": 10.0,
    }


@pytest.fixture
def new_lab(lab):
    result, readme, plot = lab
    result.write_text(json.dumps(new_format_result()) + "\n")
    return lab


def test_a_new_format_result_fills_the_digital_paper_and_runs_columns(new_lab):
    result, readme, plot = new_lab
    assert run(new_lab) == 0
    lines = block_of(readme).splitlines()
    assert ("| `task_a` | 50.0 ± 2.0 | 40.0 ± 3.0 | 60.0 ± 1.0 | 30.0 ± 0.0 | 47.9 ± 1.5 | 45.0 ± 0.4 | 52.0 "
            "| 3 | 1,000 |") in lines
    assert ("| `task_b` | 70.0 ± 1.0 | 60.0 ± 5.0 | 72.0 ± 2.0 | 55.0 ± 1.0 | 65.0 ± 2.0 | 65.0 ± 1.0 | — "
            "| 20 | 2,000 |") in lines
    assert any("paired runs" in line and "a full run" in line and "`task_a` 1 of 3" in line for line in lines)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_targets_table_shows_signed_percentage_points_and_dashes_for_null(new_lab):
    result, readme, plot = new_lab
    assert run(new_lab) == 0
    lines = block_of(readme).splitlines()
    assert "| task | PAT − ablation | PAT − digital | PAT − logistic | oracle − PAT | PAT − paper |" in lines
    assert "| `task_a` | +20.0 | +2.1 | +5.0 | +10.0 | −3.4 |" in lines
    assert "| `task_b` | +15.0 | +5.0 | +5.0 | +2.0 | — |" in lines


def test_the_sweep_table_names_the_control_row_and_shows_the_gradient_cosine(new_lab):
    result, readme, plot = new_lab
    assert run(new_lab) == 0
    lines = block_of(readme).splitlines()
    assert "| gap | twin NMSE | gradient cosine | oracle | PAT | in silico | seeds |" in lines
    assert "| 0 (control) | 1.0e-03 | 0.999 | 60.0 ± 1.0 | 60.0 ± 1.0 | 60.0 ± 1.0 | 2 |" in lines
    assert "| 2.5 | 1.0e-01 | 0.700 | 60.0 ± 1.0 | 55.0 ± 3.0 | 40.0 ± 5.0 | 2 |" in lines


def test_a_new_format_result_round_trips_through_check(new_lab, capsys):
    result, readme, plot = new_lab
    assert run(new_lab) == 0
    assert run(new_lab, "--check") == 0
    changed = new_format_result()
    changed["sweep"][0]["grad_cosine"] = 0.5
    result.write_text(json.dumps(changed) + "\n")
    capsys.readouterr()
    assert run(new_lab, "--check") == 1
    assert "stale" in capsys.readouterr().err


def test_signed_points_round_and_keep_zero_unsigned():
    assert report_pat.points(0.021) == "+2.1"
    assert report_pat.points(-0.034) == "−3.4"
    assert report_pat.points(-0.0001) == "0.0"
    assert report_pat.points(None) == report_pat.points("x") == "—"


def test_a_sweep_with_missing_cosines_or_a_zero_nmse_control_still_plots(new_lab):
    result, readme, plot = new_lab
    partial = new_format_result()
    partial["sweep"][1]["grad_cosine"] = None
    partial["sweep"][0]["twin_nmse"] = 0.0  # off a log axis: left out of the plot, kept in the table
    partial["tasks"][0]["methods"].pop("digital")
    result.write_text(json.dumps(partial) + "\n")
    assert run(new_lab) == 0
    lines = block_of(readme).splitlines()
    assert "| 0 (control) | 0.0e+00 | 0.999 | 60.0 ± 1.0 | 60.0 ± 1.0 | 60.0 ± 1.0 | 2 |" in lines
    assert "| 0.5 | 1.0e-02 | — | 60.0 ± 1.0 | 58.0 ± 2.0 | 50.0 ± 4.0 | 2 |" in lines
    assert plot.stat().st_size > 0
