"""scripts/report_pat.py: the PAT benchmark's JSON becomes the README's tables and plot.

The results here are synthetic (round numbers like 0.5 and 0.6): these tests
check the formatting and the README round trip, not any measurement.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "report_pat.py"
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
             "device_samples": 3000},
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
    header = "| task | PAT | in silico | oracle | digital ablation | logistic regression | device samples (PAT) |"
    assert header in lines
    assert "| `task_a` | 50.0 ± 2.0 | 40.0 ± 3.0 | 60.0 ± 1.0 | 30.0 ± 0.0 | 45.0 | 1,000 |" in lines
    assert "| `task_b` | 70.0 | 60.0 ± 5.0 | — | 55.0 ± 1.0 | 65.0 | 2,000 |" in lines
    assert any("over 3 seeds" in line and "`--quick` run" in line for line in lines)
    assert "| `system_x` | 1.0e-02 | 5.0e-02 | **1.2e-02** | 1.5e+00 | 1.2x | 3,000 |" in lines
    assert "| `system_y` | 2.0e-02 | **5.0e-02** | 3.0e-02 | 5.0e-01 | 2.5x | 4,000 |" in lines
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
    assert "| `task_c` | 50.0 ± 10.0 | — | — | — | — | — |" in block.splitlines()
    assert "system" not in block  # no twins table when the run measured no twins
    assert "a full run" in block
    assert plot.stat().st_size > 0
