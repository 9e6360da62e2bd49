"""The GPU benchmark can only run on a CUDA machine; its --smoke mode keeps the script from rotting."""

import subprocess
import sys

from conftest import REPO


def test_gpu_benchmark_script_runs_in_smoke_mode():
    res = subprocess.run(
        [sys.executable, "benchmarks/gpu_train_throughput.py", "--smoke"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "A. teacher inference: fair-esm" in res.stdout and "B. student training" in res.stdout
