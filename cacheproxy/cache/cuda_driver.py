"""The CUDA driver calls torch does not expose: asynchronous copies from pinned host memory to the
device, strided (2D) and plain, and a graph's upload ahead of its first launch.

A pool block holds every layer of its tokens (`[L, 2, block_size, H, D]`), so one layer of many blocks
is a strided region: `Tensor.copy_` would stage it through pageable temporaries, where
`cuMemcpy2DAsync` moves it as one DMA. The driver library comes with every CUDA install; the calls
go through ctypes because the runtime library's name changes with each CUDA release.

The source is declared host memory: declared "unified", a 2D copy from pinned memory ran synchronously
(the host waited for the stream; measured on an H200 with a sleeping kernel ahead of the copy).
"""

from __future__ import annotations

import ctypes
import threading
import time

import torch

_MEMORYTYPE_HOST = 1
_MEMORYTYPE_DEVICE = 2


class _Memcpy2D(ctypes.Structure):
    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t),
        ("srcY", ctypes.c_size_t),
        ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p),
        ("srcDevice", ctypes.c_uint64),
        ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t),
        ("dstY", ctypes.c_size_t),
        ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p),
        ("dstDevice", ctypes.c_uint64),
        ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t),
        ("Height", ctypes.c_size_t),
    ]


class CudaDriverError(RuntimeError):
    pass


class CudaDriver:
    """Bound once per process (`CudaDriver.get()`); None where there is no CUDA driver."""

    _instance: CudaDriver | None = None
    _tried = False
    _lock = threading.Lock()

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._copy_2d = lib.cuMemcpy2DAsync_v2
        self._copy_2d.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
        self._copy = lib.cuMemcpyHtoDAsync_v2
        self._copy.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self._ctx_get = lib.cuCtxGetCurrent
        self._ctx_get.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        self._graph_upload = getattr(lib, "cuGraphUpload", None)  # CUDA 11.1 on; the copies need no more
        if self._graph_upload is not None:
            self._graph_upload.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._bound = threading.local()

    @classmethod
    def get(cls) -> CudaDriver | None:
        with cls._lock:
            if not cls._tried:
                cls._tried = True
                if torch.cuda.is_available():
                    try:
                        cls._instance = cls(ctypes.CDLL("libcuda.so.1"))
                    except (OSError, AttributeError):
                        cls._instance = None
            return cls._instance

    def bind(self, device: torch.device) -> None:
        """The driver calls act on the calling thread's current context: make it torch's for
        `device` (the engine thread may not have made a runtime call yet)."""
        if getattr(self._bound, "device", None) == device:
            return
        ctx = ctypes.c_void_p()
        self._check(self._ctx_get(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            torch.cuda.set_device(device)  # initialises the runtime, whose primary context becomes current
            torch.cuda.current_stream(device).synchronize()
            self._check(self._ctx_get(ctypes.byref(ctx)), "cuCtxGetCurrent")
            if not ctx.value:
                raise CudaDriverError("no CUDA context is current on this thread")
        self._bound.device = device

    def copy_2d_to_device(
        self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, stream: int
    ) -> None:
        """`height` rows of `width` bytes from pinned host memory at `src` to the device at `dst`, rows
        `src_pitch` / `dst_pitch` bytes apart."""
        p = _Memcpy2D(
            srcMemoryType=_MEMORYTYPE_HOST, srcHost=src, srcPitch=src_pitch,
            dstMemoryType=_MEMORYTYPE_DEVICE, dstDevice=dst, dstPitch=dst_pitch,
            WidthInBytes=width, Height=height,
        )  # fmt: skip
        self._check(self._copy_2d(ctypes.byref(p), stream), "cuMemcpy2DAsync")

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """`nbytes` from pinned host memory at `src` to the device at `dst`."""
        self._check(self._copy(dst, src, nbytes, stream), "cuMemcpyHtoDAsync")

    def upload_graph(self, graph_exec: int, stream: int) -> None:
        """Puts an instantiated CUDA graph (a `cudaGraphExec_t`) on the device ahead of its first launch."""
        if self._graph_upload is None:
            raise CudaDriverError("this CUDA driver has no cuGraphUpload")
        self._check(self._graph_upload(graph_exec, stream), "cuGraphUpload")

    @staticmethod
    def _check(status: int, call: str) -> None:
        if status != 0:
            raise CudaDriverError(f"{call} failed with CUresult {status}")


# A sleeping kernel of this many cycles (~10 ms at 2 GHz) on a candidate stream, while an event on the
# compute stream should complete at once.
_PROBE_CYCLES = 20_000_000
_PROBE_BLOCKED_S = 2e-3


def independent_stream(device: torch.device, tries: int = 16) -> tuple[torch.cuda.Stream, bool]:
    """A side stream whose work does not hold back the current stream's, and whether one was found.

    Streams share the device's hardware work queues (CUDA_DEVICE_MAX_CONNECTIONS, 8 by default); two
    streams on one queue run in submission order whatever their dependencies, so copies queued on a
    side stream would hold back the compute stream that was meant to run beside them. Each candidate
    gets a sleeping kernel; if an event recorded on the current stream then waits for it, the next
    stream of torch's pool is tried."""
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    sleep = getattr(torch.cuda, "_sleep", None)  # torch's own test helper: a kernel that spins
    if sleep is None:
        return stream, True  # cannot probe here: torch's stream as it comes
    for _ in range(tries):
        torch.cuda.synchronize(device)
        with torch.cuda.stream(stream):
            sleep(_PROBE_CYCLES)
        done = torch.cuda.Event()
        done.record(current)
        t0 = time.perf_counter()
        done.synchronize()
        blocked = time.perf_counter() - t0 > _PROBE_BLOCKED_S
        torch.cuda.synchronize(device)
        if not blocked:
            return stream, True
        stream = torch.cuda.Stream(device)
    return stream, False
