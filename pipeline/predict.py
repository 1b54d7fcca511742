"""`pipeline predict`: classify image files with an exported ONNX model.

    pipeline predict exported_models/model_int8.onnx samples/seven.png samples/three.png --top-k 3
    pipeline predict MODEL IMAGE... [--top-k K] [--device auto|cpu|cuda] [--json]

The image size, mode and labels come from the model's metadata; each image is resized and fed
as uint8 pixels, the graph scales and normalises them (`pipeline.inference.OnnxClassifier`).
Images are files Pillow reads (PNG, JPEG, ...) or `.npy` uint8 arrays (HxW or HxWxC). Prints a
table, or with `--json` a JSON list with one object per image:
`{"image": path, "top": [{"label": ..., "probability": ...}, ...]}`. A missing or unreadable
image, a file that is not an ONNX model, a model without the pipeline's metadata (or of its
older format), or an array with a wrong channel count: exit code 2 and one line naming the file
and the problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from pipeline.errors import cli_entry
from pipeline.inference import DEVICES, DeviceFallbackWarning, OnnxClassifier


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline predict",
        description="Classify images with an ONNX model written by the export stage.",
    )
    parser.add_argument("model", metavar="MODEL", help="an exported .onnx file")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files (or .npy)")
    parser.add_argument("--top-k", type=_positive, default=3, help="labels per image (3)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto (default)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def format_table(images: list[str], results: list[list[tuple[str, float]]]) -> str:
    """One row per image: its path, then `label (probability)` for each of the top k."""
    cells = [[f"{label} ({100 * p:.1f}%)" for label, p in top] for top in results]
    k = max((len(row) for row in cells), default=0)
    width = max(len("image"), *(len(i) for i in images))
    col = max([len(f"top-{k}"), *(len(c) for row in cells for c in row)])
    header = f"{'image':<{width}}  " + "  ".join(f"{f'top-{i + 1}':<{col}}" for i in range(k))
    rows = [
        f"{image:<{width}}  " + "  ".join(f"{c:<{col}}" for c in row)
        for image, row in zip(images, cells, strict=True)
    ]
    return "\n".join(line.rstrip() for line in [header, *rows])


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeviceFallbackWarning)
        classifier = OnnxClassifier(args.model, device=args.device)
    for warning in caught:
        if issubclass(warning.category, DeviceFallbackWarning):
            print(f"warning: {warning.message}", file=sys.stderr)  # one line, no source line
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    results = classifier.predict(args.images, top_k=args.top_k)
    if args.json:
        payload = [
            {"image": image, "top": [{"label": lb, "probability": round(p, 6)} for lb, p in top]}
            for image, top in zip(args.images, results, strict=True)
        ]
        print(json.dumps(payload, indent=2))
    else:
        print(format_table(args.images, results))
        print(f"({args.model} on {classifier.provider})")


if __name__ == "__main__":
    main()
