"""`pipeline` command: one sub-command per stage (same as `python -m pipeline.<stage>`).

pipeline prepare | train
"""

from __future__ import annotations

import argparse
import importlib
import sys

STAGES = {
    "prepare": "split the dataset into data/prepared/",
    "train": "train the baseline model",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Tune, compress and export PyTorch image classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in STAGES.items():
        sub.add_parser(name, help=help_text, description=f"Run the {name} stage (params.yaml).")
    args, rest = parser.parse_known_args(argv)
    importlib.import_module(f"pipeline.{args.command}").main(rest)


if __name__ == "__main__":
    main()
