"""``pnn-cluster bench``: run one of the repository's benchmarks (``scripts/bench_NAME.py``) by name."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

#: the checkout's scripts/ directory (benchmarks are not installed with the package)
DEFAULT_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="run a benchmark from scripts/ by name (bench_NAME.py), e.g. `pnn-cluster bench tracking`",
        description="Runs scripts/bench_NAME.py with this Python and passes the remaining arguments on "
                    "(e.g. `pnn-cluster bench tracking --json`). Every benchmark prints one JSON line with "
                    "--json. The exit code is the benchmark's; 2 when there is no such benchmark.",
    )
    p.add_argument("name", nargs="?", help="benchmark name (see --list)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (e.g. --json)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--scripts-dir", type=Path, default=DEFAULT_SCRIPTS,
                   help="where the bench_*.py scripts are (default: the checkout's scripts/)")
    p.set_defaults(func=run)


def available(scripts: Path) -> dict[str, Path]:
    return {f.stem.removeprefix("bench_"): f for f in sorted(scripts.glob("bench_*.py"))} if scripts.is_dir() else {}


def _summary(path: Path) -> str:
    import ast

    try:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    except (SyntaxError, OSError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def run(args: argparse.Namespace) -> int:
    from pnn_cluster.commands import UsageError

    benches = available(args.scripts_dir)
    if args.list or not args.name:
        if not benches:
            raise UsageError(f"no benchmarks (bench_*.py) in {args.scripts_dir}; pass --scripts-dir")
        width = max(len(n) for n in benches)
        for name, path in benches.items():
            print(f"{name.ljust(width)}  {_summary(path)}")
        return 0
    if args.name not in benches:
        raise UsageError(f"no benchmark {args.name!r} in {args.scripts_dir}; allowed: {', '.join(benches) or 'none'}")
    return subprocess.call([sys.executable, str(benches[args.name]), *args.args])
