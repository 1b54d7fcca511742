"""`pipeline` command: one sub-command per stage, plus `predict`.

    pipeline prepare | train | search | compress | export     (same as python -m pipeline.<stage>)
    pipeline predict MODEL.onnx IMAGE... [--top-k K] [--device auto|cpu|cuda] [--json]
    pipeline search-worker [--wait-s S]   (one more machine on the search stage's study)
    pipeline --version;  pipeline <stage> --help (prints the stage's description, runs nothing)

Stages read params.yaml in the working directory; hyperparameters are never flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "prepare": "split the dataset into data/prepared/",
    "train": "train the baseline model",
    "search": "Optuna search over lr / batch size / weight decay, ship the best trial",
    "search-worker": "run trials of the search stage's study on one more machine",
    "compress": "prune, fine-tune and quantize the tuned model",
    "export": "export ONNX models with metadata, check parity and the GPU, time them",
    "predict": "classify images with an exported ONNX model",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tune-compress-pipeline")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Tune, compress and export PyTorch image classifiers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        # Each command parses its own arguments (so `pipeline predict --help` is predict's).
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    importlib.import_module(f"pipeline.{args.command.replace('-', '_')}").main(rest)


if __name__ == "__main__":
    main()
