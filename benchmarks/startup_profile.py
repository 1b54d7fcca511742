"""Where the default pipeline's wall time goes: per stage, and within each stage by component.

Two fresh copies of the project (tracked files only, default params.yaml, nothing cached):
1. `dvc repro` in the first: the figure a user sees (`make repro` less the install).
2. In the second, each stage's command run directly in order (`python -m pipeline.<stage>`,
   what DVC runs), timed; its start-up alone (`python -c "import pipeline.<stage>"`); and in a
   third copy under cProfile, every function's own time (tottime) summed by the component its
   code belongs to (a C function's time charged to its callers'): the import machinery,
   torch, MLflow (with SQLAlchemy and Alembic: the store), Optuna, ONNX / ONNX Runtime,
   matplotlib (plots), DVC, numpy / scikit-learn, the pipeline's own code, and the rest.
DVC's own share is (1) less the sum of the stage commands in (2). Last line: the total of (1)
against the issue's 45 s target, as `speedup: N.NNx` (above 1: under the target).

    python benchmarks/startup_profile.py
"""

from __future__ import annotations

import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine, print_table  # noqa: E402

STAGES = ("prepare", "train", "search", "compress", "export")
TARGET_S = 45.0
# (component, substrings of a function's file name), first match wins
COMPONENTS = (
    ("import", ("<frozen importlib", "importlib/", "<frozen zipimport")),
    ("pipeline", ("/pipeline/",)),
    ("mlflow store", ("/mlflow/", "/sqlalchemy/", "/alembic/", "sqlite3")),
    ("optuna", ("/optuna/",)),
    ("onnx / onnxruntime", ("/onnx/", "/onnxruntime/", "/onnxscript/", "/onnx_ir/", "/protobuf/")),
    ("torch", ("/torch/", "/torchvision/", "torch_pruning", "/sympy/")),
    ("plots", ("/matplotlib/", "/PIL/", "/fontTools/")),
    ("numpy / sklearn", ("/numpy/", "/sklearn/", "/scipy/")),
    ("dvc", ("/dvc/",)),
)


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    env = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b"}
    env |= {"GIT_COMMITTER_EMAIL": "b@b", "PATH": str(Path(sys.executable).parent) + ":/usr/bin"}
    subprocess.run(["git", "commit", "-qm", "copy"], cwd=dest, check=True, env=env)
    return dest


def component(filename: str) -> str:
    for name, keys in COMPONENTS:
        if any(k in filename for k in keys):
            return name
    return "other"


def by_component(profile: Path) -> dict[str, float]:
    """Own time per component. A C function (a torch kernel, a SQLite call) has no file: its
    time goes to the components of its callers, in proportion to what each caller spent in
    it (built-ins called by built-ins, after two hops: by name)."""
    stats = pstats.Stats(str(profile)).stats

    def owner(func, hops=0) -> str | None:
        filename, _, name = func
        if filename != "~":
            return component(filename)
        if hops < 2:
            return None
        return component(name)

    totals: dict[str, float] = {}

    def add(key: str, seconds: float) -> None:
        totals[key] = totals.get(key, 0.0) + seconds

    for func, (_, _, tottime, _, callers) in stats.items():
        key = owner(func, hops=2 if not callers else 0)
        if key is not None:
            add(key, tottime)
            continue
        spent = sum(c[2] for c in callers.values()) or 1.0
        for caller, timing in callers.items():
            up = owner(caller)
            if up is None:  # a built-in called by a built-in: that one's callers
                grand = stats.get(caller, (0, 0, 0, 0, {}))[4]
                up = next((owner(g) for g in grand if owner(g)), None) or owner(caller, 2)
            add(up, tottime * timing[2] / spent)
    return totals


def run_timed(cmd: list[str], cwd: Path) -> float:
    env_path = str(Path(sys.executable).parent)
    start = time.perf_counter()
    done = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PATH": f"{env_path}:/usr/bin:/bin", "HOME": str(cwd), "PYTHONUNBUFFERED": "1"},
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def main() -> None:
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        repro_dir = fresh_copy(Path(tmp) / "repro")
        total = run_timed([sys.executable, "-m", "dvc", "repro"], repro_dir)
        stages_dir = fresh_copy(Path(tmp) / "stages")
        bare = run_timed([sys.executable, "-c", "pass"], stages_dir)
        profiled_dir = fresh_copy(Path(tmp) / "profiled")
        rows, stage_sum, columns = [], 0.0, [c for c, _ in COMPONENTS] + ["other"]
        for stage in STAGES:
            seconds = run_timed([sys.executable, "-m", f"pipeline.{stage}"], stages_dir)
            imports = run_timed([sys.executable, "-c", f"import pipeline.{stage}"], stages_dir)
            prof = Path(tmp) / f"{stage}.prof"
            cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", f"pipeline.{stage}"]
            run_timed(cmd, profiled_dir)
            stage_sum += seconds
            parts = by_component(prof)
            profiled = sum(parts.values())
            share = {c: f"{parts.get(c, 0.0) * seconds / profiled:.1f}" for c in columns}
            row = {"stage": stage, "wall s": f"{seconds:.1f}", "start-up s": f"{imports:.1f}"}
            rows.append(row | share)
    print(
        f"\ndvc repro, fresh copy, default params: {total:.1f} s; the five stage commands run "
        f"directly: {stage_sum:.1f} s; DVC's own share: {total - stage_sum:.1f} s; a bare "
        f"interpreter start: {bare:.2f} s\n"
    )
    print(
        "seconds per stage (run without the profiler); start-up: `python -c 'import "
        "pipeline.<stage>'`; then the stage's time split by component (cProfile own time in a "
        "third copy, C functions charged to their callers, scaled to the wall time):"
    )
    print_table(rows, ["stage", "wall s", "start-up s", *columns])
    print(f"\ntarget {TARGET_S:.0f} s; dvc repro {total:.1f} s")
    print(f"speedup: {TARGET_S / total:.2f}x")


if __name__ == "__main__":
    main()
