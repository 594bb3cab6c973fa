"""How long `camelid --help` and a sub-verb's help take, each in a fresh Python process as a user runs them.

The help is the first thing a new user waits for, and every verb's start pays the same parser-building cost.
Each command runs --runs times in subprocesses (`python -m camelid ...`, PYTHONPATH pointing at a source tree);
with --before PATH, the same commands run from that tree too, interleaved run by run so that both see the same
machine load, and the table gives the ratio before / now (above 1: now is faster).

    python bench/cli_help.py [--runs 10] [--subverb "data selfinstruct"]
    git worktree add /tmp/cli-before HEAD && python bench/cli_help.py --before /tmp/cli-before
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_dir(tree: Path) -> Path:
    """The directory to put on PYTHONPATH: a checkout's src/, or the given directory when it holds camelid."""
    return tree / "src" if (tree / "src" / "camelid").is_dir() else tree


def run_once(src: Path, args: list[str]) -> float:
    """Seconds for one `python -m camelid ARGS` from `src`; a failure stops the benchmark."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "camelid", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"python -m camelid {' '.join(args)} from {src} failed:\n{done.stderr}")
    return seconds


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs of each command per tree (default 10)")
    parser.add_argument("--subverb", default="data selfinstruct", help="the sub-verb whose help is also timed")
    parser.add_argument("--before", type=Path, metavar="PATH", help="a second source tree to compare with")
    args = parser.parse_args()

    trees = {"now": source_dir(ROOT)}
    if args.before:
        trees["before"] = source_dir(args.before.resolve())
    commands = {"camelid --help": ["--help"], f"camelid {args.subverb} --help": [*args.subverb.split(), "--help"]}
    times = {(command, tree): [] for command in commands for tree in trees}
    for tree, src in trees.items():  # once each, unmeasured: the first run also compiles the bytecode
        for argv in commands.values():
            run_once(src, argv)
    for _ in range(args.runs):
        for command, argv in commands.items():
            for tree, src in trees.items():
                times[command, tree].append(run_once(src, argv))

    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); Python {platform.python_version()}; {args.runs} runs each")
    header = f"{'command':<36}{'tree':<8}{'median s':>10}{'min s':>8}"
    print(header + (f"{'before/now':>12}" if args.before else ""))
    for command in commands:
        for tree in trees:
            runs = times[command, tree]
            row = f"{command:<36}{tree:<8}{statistics.median(runs):>10.3f}{min(runs):>8.3f}"
            if args.before and tree == "now":
                row += f"{statistics.median(times[command, 'before']) / statistics.median(runs):>11.2f}x"
            print(row)


if __name__ == "__main__":
    main()
