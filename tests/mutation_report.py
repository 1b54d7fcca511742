"""Kill rate of the last `mutmut run` (`make mutation`): per module, killed / total, survivors.

    python tests/mutation_report.py [--min 0.85] [MUTANT_NAME_GLOB ...]

Reads mutmut's result files (`mutants/**/*.py.meta`), keeps the mutants whose names match the
globs (all when none is given; the same globs `make mutation` passes to `mutmut run`), and
prints one line per module, then every mutant that was not killed with the command that shows
its diff. A mutant counts as killed when a test failed or timed out on it. Exit code 1 when a
module's kill rate is below `--min`, or when mutants were not run at all.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# mutmut's exit code -> outcome (mutmut/stats.py `status_by_exit_code`)
KILLED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout"}
KILLED |= {255: "timeout"}
OTHER = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", None: "not checked"}
NAME = re.compile(r"^(?P<module>.+?)\.x(?P<function>[_ǁ].*)__mutmut_(?P<number>\d+)$")


def outcome(exit_code: int | None) -> str:
    if exit_code in KILLED:
        return KILLED[exit_code]
    return OTHER.get(exit_code, "suspicious")


def load_results(mutants_dir: Path, patterns: list[str]) -> dict[str, int | None]:
    """{mutant name: exit code} of the mutants matching any of `patterns`."""
    results = {}
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if not patterns or any(fnmatch.fnmatch(name, p) for p in patterns):
                results[name] = code
    return results


def function_name(mutant: str) -> str:
    """`pipeline.inference.xǁOnnxClassifierǁpreprocess__mutmut_3` -> `OnnxClassifier.preprocess`"""
    match = NAME.match(mutant)
    if match is None:
        return mutant
    function = match["function"]
    return function.strip("ǁ").replace("ǁ", ".") if "ǁ" in function else function[1:]


def report(results: dict[str, int | None], minimum: float) -> tuple[str, bool]:
    by_module: dict[str, list[str]] = defaultdict(list)
    for name in results:
        match = NAME.match(name)
        by_module[match["module"] if match else "?"].append(name)
    lines, ok = [], bool(results)
    total_killed = 0
    for module, names in sorted(by_module.items()):
        killed = [n for n in names if results[n] in KILLED]
        total_killed += len(killed)
        rate = len(killed) / len(names)
        ok &= rate >= minimum
        lines.append(f"{module:<22} {len(killed):>4} / {len(names):<4} killed  {rate:6.1%}")
    if results:
        rate = total_killed / len(results)
        lines.append(f"{'all':<22} {total_killed:>4} / {len(results):<4} killed  {rate:6.1%}")
    else:
        lines.append("no mutants matched: run `make mutation` (mutmut run) first")
    unrun = [n for n in results if results[n] is None]
    if unrun:
        lines.append(f"\n{len(unrun)} mutants were not run (an interrupted or failed mutmut run)")
    alive = [n for n in results if results[n] not in KILLED and results[n] is not None]
    if alive:
        lines.append(f"\nnot killed ({len(alive)}; `mutmut show NAME` prints the diff):")
        for name in sorted(alive, key=lambda n: (function_name(n), int(n.rsplit("_", 1)[1]))):
            lines.append(f"  {outcome(results[name]):<12} {name}")
    ok &= not unrun  # an interrupted run is not a result
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", help="mutant name globs (default: all)")
    parser.add_argument("--min", type=float, default=0.85, help="kill rate per module (0.85)")
    parser.add_argument("--mutants-dir", type=Path, default=Path("mutants"))
    args = parser.parse_args(argv)
    text, ok = report(load_results(args.mutants_dir, args.patterns), args.min)
    print(text)
    if not ok:
        print(
            f"\nmutation: below the {args.min:.0%} kill rate, or an incomplete run",
            file=sys.stderr,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
