"""Layer-by-layer loads, the host side: which bytes each layer's strided copies move.

The copies themselves run on the GPU's copy engine (tests/gpu/test_layer_gate_gpu.py); here they are
replayed row by row with memmove on host tensors, so that every address and pitch is checked.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from cacheproxy.cache.tiered_store import copy_runs
from cacheproxy.engine.layer_gate import layer_copies

SHAPE = (3, 2, 4, 2, 8)  # layers, k/v, block_size, heads, head_dim


def _replay(copies: list[tuple[int, int, int, int, int, int]]) -> None:
    for dst, dst_pitch, src, src_pitch, width, height in copies:
        for row in range(height):
            ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_layer_copies_move_every_layer_of_every_run(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    pool = torch.full((12, *SHAPE), float("nan"), dtype=dtype)
    slab = torch.randn((10, *SHAPE), generator=g).to(dtype)
    # Pool blocks and slab slots: two runs that follow on (3, 2 blocks), and three singles, one of them
    # a view of a non-leading slot.
    copies = [(2, slab[0]), (3, slab[1]), (4, slab[2]), (7, slab[5]), (8, slab[6]), (0, slab[9]), (11, slab[4]),
              (5, slab[8])]  # fmt: skip
    runs = copy_runs(copies)
    assert [count for _, count, _ in runs] == [3, 2, 1, 1, 1]
    expected = pool.clone()
    for block, source in copies:
        expected[block] = source
    per_layer = list(layer_copies(pool, runs))
    assert len(per_layer) == SHAPE[0]
    for layer, layer_list in enumerate(per_layer):
        _replay(layer_list)
        # after layer l's copies, layers 0..l of every copied block are in place and the rest untouched
        for block, source in copies:
            assert torch.equal(pool[block, : layer + 1], source[: layer + 1])
            assert pool[block, layer + 1 :].isnan().all()
    assert torch.equal(pool.nan_to_num(7.0), expected.nan_to_num(7.0))  # nothing outside the copied blocks


def test_layer_copies_refuse_sources_that_are_not_whole_blocks() -> None:
    pool = torch.zeros((4, *SHAPE))
    slab = torch.zeros((4, *SHAPE))
    with pytest.raises(ValueError, match="contiguous"):
        list(layer_copies(pool, [(0, 1, slab[:, 0:1].transpose(0, 1))]))
    with pytest.raises(ValueError, match="contiguous"):
        list(layer_copies(pool, [(0, 2, slab[0:1])]))  # fewer blocks than the run claims
    with pytest.raises(ValueError, match="contiguous"):
        list(layer_copies(pool, [(0, 1, slab[0:1].half())]))
    with pytest.raises(ValueError, match="one contiguous span"):
        list(layer_copies(pool[:, :, :, ::2], []))
