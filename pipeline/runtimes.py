"""Run the exported ONNX files in other runtimes than ONNX Runtime, and compare them with it.

Runtimes (`RUNTIMES`): `onnxruntime` (CPU), `onnx_reference` (`onnx.reference.ReferenceEvaluator`,
the ONNX specification in Python), `opencv5` and `opencv4` (OpenCV's DNN module,
`cv2.dnn.readNetFromONNX`, default engine). Two OpenCV versions cannot share one site-packages:
`make setup` installs 5.x into the venv (the `dev` extra) and 4.x with `pip install --target
.venv/opencv4`; a version that is not the one `import cv2` gives here runs in a subprocess with
that folder first on PYTHONPATH (`opencv_site`).

- `model_input(path, images)`: prepared uint8 N x C x H x W images as the model's declared input
  (read from the graph's input type and shape, and its metadata): uint8 NHWC or NCHW pixels
  as they are, or float32 NCHW normalised with the metadata's mean / std.
- `runtime_logits(runtime, path, x, batch_size)`: float32 logits of one runtime, `batch_size`
  images per call; `RuntimeUnavailable` when the runtime is not installed here.
- `runtime_matrix(paths, images, labels)`: per variant and runtime, top-1 agreement with ONNX
  Runtime CPU (and accuracy) at batch 1 and batch 64, or the error that runtime gave.
- `matrix_failures(matrix)`: one line per cell under `MIN_AGREEMENT` or in error.

Run it on the exported models: `python -m pipeline.runtimes` (after `dvc repro`; it reads
`exported_models/` and the prepared test split, prints the matrix as Markdown, exits 1 when a
cell fails). Measured figures and the OpenCV pitfalls the int8 graph avoids: README, "Runs in
other runtimes".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from pipeline.errors import DataError, StageFailed, UserError, stage_entry

RUNTIMES = ("onnxruntime", "onnx_reference", "opencv5", "opencv4")
BATCH_SIZES = (1, 64)
MIN_AGREEMENT = 0.99  # top-1 agreement with ONNX Runtime CPU every cell must reach
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # so a subprocess imports this package


class RuntimeUnavailable(UserError):
    """The runtime is not installed here (`make setup` installs every one): exit 2."""


def _input_layout(graph_dims: list, meta: dict, chw: tuple[int, int, int]) -> str:
    """NHWC or NCHW: from the graph input's fixed dims; the metadata decides a tie."""
    c, h, w = chw
    if len(graph_dims) != 4:
        raise ValueError(f"model input has rank {len(graph_dims)}; expected N x C x H x W or NHWC")
    fits = {
        layout: all(d in (None, want) for d, want in zip(graph_dims[1:], order, strict=True))
        for layout, order in (("NCHW", (c, h, w)), ("NHWC", (h, w, c)))
    }
    if fits["NCHW"] and fits["NHWC"]:
        return meta.get("input_layout", "NCHW")
    for layout, fit in fits.items():
        if fit:
            return layout
    raise ValueError(f"model input dims {graph_dims[1:]} fit neither NCHW nor NHWC {chw}")


def model_input(path: str | Path, images: np.ndarray) -> np.ndarray:
    """Prepared uint8 N x C x H x W `images` as what the model at `path` declares it takes.

    A uint8 input gets the pixels (transposed to NHWC when that is the input's layout); a float
    input gets float32 (x / 255 - mean) / std with the metadata's `mean` / `std`.
    """
    proto = onnx.load(str(path), load_external_data=False)
    tensor_type = proto.graph.input[0].type.tensor_type
    dims = [d.dim_value or None for d in tensor_type.shape.dim]
    meta = {p.key: p.value for p in proto.metadata_props}
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"model_input needs uint8 N x C x H x W images, got {images.dtype}")
    layout = _input_layout(dims, meta, images.shape[1:])
    x = images.transpose(0, 2, 3, 1) if layout == "NHWC" else images
    if tensor_type.elem_type == onnx.TensorProto.UINT8:
        return np.ascontiguousarray(x)
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ValueError(f"{path}: input type {tensor_type.elem_type} is neither uint8 nor float")
    shape = (1, -1, 1, 1) if layout == "NCHW" else (1, 1, 1, -1)
    mean = np.asarray(json.loads(meta["mean"]), np.float32).reshape(shape)
    std = np.asarray(json.loads(meta["std"]), np.float32).reshape(shape)
    return np.ascontiguousarray((x.astype(np.float32) / np.float32(255.0) - mean) / std)


def _batches(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int):
    outs = [
        np.asarray(run(np.ascontiguousarray(x[i : i + batch_size]))).reshape(
            len(x[i : i + batch_size]), -1
        )
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32)


def onnxruntime_logits(path: str | Path, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """ONNX Runtime with the CPU provider: the reference every other runtime is compared to."""
    from pipeline import onnx_tools

    session, _ = onnx_tools.session_for(path, "CPUExecutionProvider")
    return onnx_tools.run_logits(session, x, batch_size)


def reference_logits(path: str | Path, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """`onnx.reference.ReferenceEvaluator`: the operators as the ONNX specification defines."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    name = evaluator.input_names[0]
    return _batches(lambda b: evaluator.run(None, {name: b})[0], x, batch_size)


def opencv_site(major: int) -> Path:
    """Where `make setup` installs OpenCV `major` when it is not the venv's own `cv2`."""
    return Path(sys.prefix) / f"opencv{major}"


def _local_cv2_major() -> int | None:
    try:
        import cv2
    except ImportError:
        return None
    return int(cv2.__version__.split(".")[0])


def _opencv_in_process(path: str | Path, x: np.ndarray, batch_size: int) -> np.ndarray:
    import cv2

    net = cv2.dnn.readNetFromONNX(str(path))  # the default engine of this version

    def run(batch):
        net.setInput(batch)
        return net.forward()

    return _batches(run, x, batch_size)


def _opencv_subprocess(
    path: str | Path, x: np.ndarray, batch_size: int, major: int, site: Path
) -> np.ndarray:
    """OpenCV from `site` (another version than this process's): a worker process."""
    with tempfile.TemporaryDirectory(prefix="opencv-") as tmp:
        inputs, outputs = Path(tmp) / "x.npy", Path(tmp) / "logits.npy"
        np.save(inputs, x)
        code = "import sys; from pipeline.runtimes import _opencv_worker; _opencv_worker(sys.argv)"
        args = [str(path), str(inputs), str(outputs), str(batch_size), str(major)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(site), str(_PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        done = subprocess.run(
            [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
            raise RuntimeError(lines[-1])
        return np.load(outputs)


def _opencv_worker(argv: Sequence[str]) -> None:
    """Subprocess side of `_opencv_subprocess`: model, input .npy, output .npy, batch, major."""
    path, inputs, outputs, batch_size, major = argv[1:6]
    found = _local_cv2_major()
    if found != int(major):
        sys.exit(f"OpenCV {major}.x expected on PYTHONPATH, found {found}")
    try:
        logits = _opencv_in_process(path, np.load(inputs), int(batch_size))
    except Exception as err:  # cv2.error: its last line names the failed assertion
        sys.exit(" ".join(str(err).split()))
    np.save(outputs, logits)


def opencv_logits(
    path: str | Path, x: np.ndarray, batch_size: int = 64, major: int = 5
) -> np.ndarray:
    """OpenCV `major`.x's DNN module (default engine): this process's `cv2` when it is that
    version, else the copy `make setup` put in `opencv_site(major)`, in a subprocess."""
    if _local_cv2_major() == major:
        return _opencv_in_process(path, x, batch_size)
    site = opencv_site(major)
    if not (site / "cv2").is_dir():
        raise RuntimeUnavailable(
            f"OpenCV {major}.x: not importable here and {site} missing; run `make setup`"
        )
    return _opencv_subprocess(path, x, batch_size, major, site)


RUNNERS: dict[str, Callable[..., np.ndarray]] = {
    "onnxruntime": onnxruntime_logits,
    "onnx_reference": reference_logits,
    "opencv5": lambda path, x, batch_size=64: opencv_logits(path, x, batch_size, major=5),
    "opencv4": lambda path, x, batch_size=64: opencv_logits(path, x, batch_size, major=4),
}


def runtime_logits(runtime: str, path: str | Path, x: np.ndarray, batch_size: int = 64):
    """Float32 logits (N x classes) of `runtime` (one of `RUNTIMES`) on the model input `x`."""
    if runtime not in RUNNERS:
        raise ValueError(f"runtime {runtime!r}; expected one of {', '.join(RUNNERS)}")
    return RUNNERS[runtime](path, x, batch_size)


def _cell(runtime, path, x, labels, reference, batch_sizes) -> dict:
    """One runtime on one model: agreement / accuracy per batch size, or its error."""
    cell = {}
    for batch in batch_sizes:
        try:
            predictions = runtime_logits(runtime, path, x, batch).argmax(1)
        except RuntimeUnavailable:
            raise
        except Exception as err:  # a runtime that cannot load or run the model: the finding
            return {"error": " ".join(str(err).split())[:300] or type(err).__name__}
        cell[f"agreement_b{batch}"] = float((predictions == reference).mean())
        cell[f"accuracy_b{batch}"] = float((predictions == labels).mean())
    return cell


def runtime_matrix(
    paths: dict[str, str | Path],
    images: np.ndarray,
    labels: np.ndarray,
    runtimes: Sequence[str] = RUNTIMES,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> dict[str, dict[str, dict]]:
    """variant -> runtime -> {agreement_b1, accuracy_b1, agreement_b64, ...} or {error}.

    `paths`: variant name -> ONNX file; `images`: prepared uint8 N x C x H x W (each model gets
    them as its input declares, `model_input`); `labels`: N class indices. Agreement is top-1
    against ONNX Runtime CPU at batch 64. Raises `RuntimeUnavailable` for a runtime not
    installed here (a missing runtime is a set-up error, not a result).
    """
    labels = np.asarray(labels)
    matrix = {}
    for variant, path in paths.items():
        x = model_input(path, images)
        reference = onnxruntime_logits(path, x, 64).argmax(1)
        matrix[variant] = {
            runtime: _cell(runtime, path, x, labels, reference, batch_sizes)
            for runtime in runtimes
        }
    return matrix


def matrix_failures(matrix: dict, min_agreement: float = MIN_AGREEMENT) -> list[str]:
    """One line per (variant, runtime) that errs or agrees with ONNX Runtime on too few images."""
    lines = []
    for variant, row in matrix.items():
        for runtime, cell in row.items():
            if "error" in cell:
                lines.append(f"{variant} in {runtime}: {cell['error']}")
                continue
            for key, value in cell.items():
                if key.startswith("agreement_") and value < min_agreement:
                    lines.append(
                        f"{variant} in {runtime} at batch {key.split('_b')[1]}: agreement "
                        f"{value:.4f} < {min_agreement}"
                    )
    return lines


def matrix_table(matrix: dict) -> str:
    """Markdown: a row per variant, a column per runtime, `b1 / b64` agreement in percent."""
    runtimes = list(next(iter(matrix.values())))
    rows = ["| variant | " + " | ".join(runtimes) + " |", "|---" * (len(runtimes) + 1) + "|"]
    for variant, row in matrix.items():
        cells = []
        for runtime in runtimes:
            cell = row[runtime]
            if "error" in cell:  # OpenCV's messages end with the failed check: keep the end
                text = cell["error"]
                cells.append(f"error: {'...' if len(text) > 60 else ''}{text[-60:]}")
            else:
                agreements = [v for k, v in cell.items() if k.startswith("agreement_")]
                cells.append(" / ".join(f"{100 * a:.1f} %" for a in agreements))
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


@stage_entry
def main(argv: list[str] | None = None) -> None:
    """The matrix of the exported models on the prepared test split, printed as Markdown."""
    from pipeline.data import load_prepared
    from pipeline.variants import VARIANTS

    files = {v.name: v.exported for v in VARIANTS if v.exported.is_file()}
    if not files:
        raise DataError(f"{VARIANTS[0].exported.parent}: no exported model; run `dvc repro`")
    images, labels = load_prepared().splits["test"]
    matrix = runtime_matrix(files, images.numpy(), labels.numpy())
    print(matrix_table(matrix))
    failures = matrix_failures(matrix)
    if failures:
        raise StageFailed(f"{len(failures)} runtime checks failed: {'; '.join(failures)}")


if __name__ == "__main__":
    main()
