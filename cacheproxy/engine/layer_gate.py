"""Layer-by-layer loads: the forward pass starts while a prefix's K/V still come from the CPU tier,
and each layer's attention waits, on the device, for that layer's blocks only.

The copies run layer-major on the store's copy stream: layer 0 of every block, then a 4-byte write
of the load's epoch into `flags[0]`, then layer 1, and so on; the compute stream's `target` gets the
same epoch (a fill kernel). Before attention, layer l's `wait` spins in a one-warp kernel until
`flags[l] == target`. A step's other work (projections, norms, the MLP, earlier layers) runs
meanwhile, so the loads hide behind the compute instead of preceding it. The wait is a kernel, not an
event, so the prefill CUDA graphs can hold it: when nothing is loading, `flags` already equal
`target` and it returns at once.

The store plans the copies at admission (`load`); the runner starts them (`start`) once the step's
inputs are on their way. Copies queue on the copy engines in the order they are issued, whatever
their stream: issued first, a prefix's gigabytes would hold back the step's own small uploads, and
with them the whole forward pass.

Epochs are values of a pinned array that never changes (`_values[e] == e`): a copy reads its value
whenever the DMA runs, so a later epoch can never overwrite an earlier one's source.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

import kernels
from cacheproxy.cache.cuda_driver import CudaDriver

_RING = 1 << 16  # epochs cycle through 1.._RING-1; the wait compares for equality


class LayerGate:
    def __init__(self, num_layers: int, device: torch.device, driver: CudaDriver) -> None:
        self.device = device
        self.driver = driver
        self.flags = torch.zeros(num_layers, dtype=torch.int32, device=device)
        self.target = torch.zeros(1, dtype=torch.int32, device=device)
        self._values = torch.arange(_RING, dtype=torch.int32).pin_memory()
        self._epoch = 0
        self._planned: list[tuple[list[list[tuple[int, int, int, int, int, int]]], torch.cuda.Stream]] = []
        self._issuing: list[tuple[list[list[tuple[int, int, int, int, int, int]]], torch.cuda.Stream]] = []
        self._next_layer = 0  # of `_issuing`: the first layer not issued yet
        # Loads were planned since the last prefill step launched: eager steps wait only then (the
        # prefill graphs always hold the waits).
        self.armed = False

    @classmethod
    def for_device(cls, num_layers: int, device: torch.device) -> LayerGate | None:
        driver = CudaDriver.get() if device.type == "cuda" and kernels.can_wait_on_device() else None
        return cls(num_layers, device, driver) if driver is not None else None

    def load(
        self, kv: torch.Tensor, runs: list[tuple[int, int, torch.Tensor]], stream: torch.cuda.Stream
    ) -> None:
        """Plans `runs` (pool block, count, pinned source of `count` blocks) for `stream`; `start`
        issues them. The sources must stay as they are until the copies have run. One stream for all
        the loads of a step: a layer's flag follows that layer's copies only on the stream it is on."""
        if self._planned and self._planned[0][1] is not stream:
            raise ValueError("the loads of one step go on one copy stream")
        self._planned.append((list(layer_copies(kv, runs)), stream))
        self.armed = True

    @property
    def has_planned(self) -> bool:
        return bool(self._planned or self._issuing)

    def start(self, layers: int | None = None) -> None:
        """Issues the planned loads, one layer of all of them at a time, each layer followed by its
        flag, and sets the current (compute) stream's target. With `layers`, only the first that many
        layers go now and the next call issues the rest: a step's graph can launch after layer 0's
        copies instead of after all of them (issuing 32 layers took ~0.5 ms of host time on an H200's
        host). The host waits for none of it."""
        if self._planned:
            if self._issuing:  # loads planned after a partial start: the earlier ones go out first
                self._issue(None)
            self.driver.bind(self.device)
            self._epoch = self._epoch % (_RING - 1) + 1
            self._issuing, self._planned = self._planned, []
            self._next_layer = 0
            self.target.fill_(self._epoch)
        if self._issuing:
            self._issue(layers)

    def _issue(self, layers: int | None) -> None:
        num_layers = self.flags.numel()
        end = num_layers if layers is None else min(num_layers, self._next_layer + layers)
        value = self._values.data_ptr() + 4 * self._epoch
        flags = self.flags.data_ptr()
        stream = self._issuing[0][1].cuda_stream
        for layer in range(self._next_layer, end):
            for per_layer, _ in self._issuing:
                for dst, dst_pitch, src, src_pitch, width, height in per_layer[layer]:
                    self.driver.copy_2d_to_device(dst, dst_pitch, src, src_pitch, width, height, stream)
            self.driver.copy_to_device(flags + 4 * layer, value, 4, stream)
        self._next_layer = end
        if end == num_layers:
            self._issuing = []

    def wait(self, layer: int) -> None:
        kernels.wait_layer(*self.wait_args(layer))

    def wait_args(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What a kernel that waits for layer `layer` itself takes (`kernels.rotary_and_write_kv`)."""
        return self.flags, self.target, layer


def layer_copies(
    kv: torch.Tensor, runs: list[tuple[int, int, torch.Tensor]]
) -> Iterator[list[tuple[int, int, int, int, int, int]]]:
    """Per layer of the pool `kv` [num_blocks, L, ...]: the 2D copies (dst, dst pitch, src, src pitch,
    row bytes, rows) that move that layer of every run, a row per block. Sources are contiguous
    spans of whole blocks shaped like the pool's."""
    num_layers = kv.shape[1]
    block_bytes = kv.stride(0) * kv.element_size()
    layer_bytes = kv.stride(1) * kv.element_size()
    if not kv[0].is_contiguous() or layer_bytes * num_layers != kv[0].numel() * kv.element_size():
        raise ValueError("each pool block must be one contiguous span, layer after layer")
    base = kv.data_ptr()
    spans = []
    for first, count, source in runs:
        if (
            not source.is_contiguous() or source.dtype != kv.dtype
            or source.shape[1:] != kv.shape[1:] or source.shape[0] != count
        ):  # fmt: skip
            raise ValueError(
                f"a source must be {count} contiguous {kv.dtype} blocks of shape {tuple(kv.shape[1:])}"
            )
        spans.append(
            (base + first * block_bytes, source.data_ptr(), source[0].numel() * source.element_size(), count)
        )
    for layer in range(num_layers):
        offset = layer * layer_bytes
        yield [
            (dst + offset, block_bytes, src + offset, pitch, layer_bytes, count)
            for dst, src, pitch, count in spans
        ]
