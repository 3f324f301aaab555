"""Runs Triton kernels under TRITON_INTERPRET=1 in a child process, for CPU tests.

The interpreter has to be chosen before `triton` is imported, and the parent test process may already
have imported it for real; so a test module hands all its cases to one child (itself, run as a
script) and reads the outputs back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def run_interpreted(script: str, cases: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Saves `cases`, runs `python script CASES RESULTS` with the interpreter on, returns the results."""
    cases_path, results_path = folder / "cases.pt", folder / "results.pt"
    torch.save(cases, cases_path)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.run(
        [sys.executable, script, str(cases_path), str(results_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert child.returncode == 0, f"interpreter run failed:\n{child.stderr[-4000:]}"
    return torch.load(results_path)
