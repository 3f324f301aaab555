"""Everything under tests/gpu needs a CUDA device: where there is none, each test is skipped."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
