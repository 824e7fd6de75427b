"""The golden and identity tests once more without vector kernels (ATEN_CPU_CAPABILITY=default: torch's scalar CPU
kernels), as on a CPU other than the one that wrote the golden files: their tolerances (tests/tolerances.py) must
hold for any kernels, not only for this machine's. CI runs it as part of ./run.sh test."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/test_golden.py", "tests/test_identities.py"]
GUARD = "MULOCAL_SCALAR_KERNEL_PASS"  # set in the inner run: it never starts another


def test_golden_and_identities_pass_without_vector_kernels():
    if os.environ.get(GUARD) or os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        pytest.skip("this run already has no vector kernels")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", GUARD: "1"}
    cap = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert cap.stdout.strip() == "DEFAULT", (cap.stdout, cap.stderr[-2000:])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-2000:]
