"""The data-parallel train stage, end to end, in a scratch copy of the project.

Prepares digits, trains the tiny cnn with `train.nproc` processes (torchrun, one per GPU on
CUDA) and checks what rank 0 wrote: `reports/train.json` says `processes: N` on the asked
device with a sane test accuracy, and `models/baseline.pt` loads with `weights_only=True`.
`benchmarks/gpu_check.sh` runs it with one process per visible GPU (NCCL); on CPU (gloo):
    python benchmarks/ddp_check.py --device cpu --nproc 2
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import TINY_PARAMS, copy_project, subprocess_env, write_params  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    project = copy_project(Path(tempfile.mkdtemp(prefix="ddp-check-")) / "project")
    params = copy.deepcopy(TINY_PARAMS)
    params["device"] = args.device
    params["tracking"] = {"enabled": False}  # the check needs no MLflow on the GPU machine
    params["train"].update(epochs=args.epochs, batch_size=32 * args.nproc, nproc=args.nproc)
    write_params(project, params)
    for stage in ("prepare", "train"):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", f"pipeline.{stage}"],
            cwd=project,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(f"{stage}: rc {done.returncode} in {time.perf_counter() - start:.1f}s")
        if done.returncode != 0:
            print(done.stderr[-3000:])
            return 1
    print(done.stderr.strip().splitlines()[-1])
    report = json.loads((project / "reports" / "train.json").read_text())
    import torch

    blob = torch.load(project / "models" / "baseline.pt", weights_only=True)
    ok = (
        report["processes"] == args.nproc
        and report["device"].startswith(args.device)
        and report["test_accuracy"] > 0.8
        and not any(k.startswith("module.") for k in blob["state_dict"])
    )
    print(f"ddp check {'ok' if ok else 'FAILED'}: {json.dumps(report)}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
