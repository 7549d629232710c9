"""A tiny CUDA adapter for the TensorRT backend: pinned host memory, device memory, copies, streams.

Two implementations behind one interface: cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` in
releases before 12.6), which NVIDIA's TensorRT samples use since 10.14 and which installs without a
compiler, preferred; else pycuda, which JetPack users often have. Both use the device's primary
context, the one TensorRT's runtime API uses. Errors become CudaError (a ModelError) with CUDA's error name.
"""

from __future__ import annotations

import ctypes
import logging
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from gateway.errors import ModelError
from gateway.inference import BackendUnavailable

logger = logging.getLogger(__name__)


class CudaError(ModelError):
    """A CUDA call failed (out of memory, a lost device); the message names the call and CUDA's error."""


class CudaApi(Protocol):
    """What the TensorRT backend needs from CUDA, on device 0.

    Host buffers are uint8 numpy arrays over pinned memory (views of them may be copied); device
    buffers and streams are integer handles. Call everything from the thread that loaded the
    backend (the inference worker): pycuda's context is current only there.
    """

    name: str

    def device_properties(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor") of device 0; BackendUnavailable without one."""
        ...

    def alloc_host_pinned(self, nbytes: int) -> np.ndarray:
        """A page-locked host buffer of `nbytes` bytes (uint8), for asynchronous copies."""
        ...

    def alloc_device(self, nbytes: int) -> int:
        """A device buffer of `nbytes` bytes; returns its device pointer."""
        ...

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: int) -> None:
        """Queue a copy of all of `src` (pinned, contiguous) to device pointer `dst` on `stream`."""
        ...

    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: int) -> None:
        """Queue a copy of `dst.nbytes` bytes from device pointer `src` into `dst` (pinned) on `stream`."""
        ...

    def stream_create(self) -> int:
        """A new CUDA stream."""
        ...

    def stream_synchronize(self, stream: int) -> None:
        """Wait until everything queued on `stream` is done."""
        ...

    def free(self, buffer: np.ndarray | int) -> None:
        """Release a pinned host buffer (the array alloc_host_pinned returned) or a device pointer."""
        ...

    def stream_destroy(self, stream: int) -> None:
        """Release a stream."""
        ...


class CudaPython:
    """CudaApi on cuda-python's runtime bindings; every call returns (error, *results)."""

    name = "cuda-python"

    def __init__(self, cudart: ModuleType) -> None:
        self._rt = cudart
        self._streams: dict[int, Any] = {}
        self._host: dict[int, np.ndarray] = {}

    def _error_name(self, err: Any) -> str:
        name = self._rt.cudaGetErrorName(err)[1]
        return name.decode() if isinstance(name, bytes) else str(name)

    def _check(self, call: str, result: tuple[Any, ...]) -> Any:
        err, *values = result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise CudaError(f"CUDA {call} failed: {self._error_name(err)}")
        return values[0] if len(values) == 1 else values

    def device_properties(self) -> tuple[str, str]:
        """(GPU name, compute capability) of device 0."""
        err, count = self._rt.cudaGetDeviceCount()
        if err != self._rt.cudaError_t.cudaSuccess:
            raise BackendUnavailable(f"no CUDA device: {self._error_name(err)}")
        if count < 1:
            raise BackendUnavailable("no CUDA device")
        prop = self._check("cudaGetDeviceProperties", self._rt.cudaGetDeviceProperties(0))
        raw = prop.name
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"

    def alloc_host_pinned(self, nbytes: int) -> np.ndarray:
        """Pinned host memory as a uint8 array."""
        ptr = self._check("cudaMallocHost", self._rt.cudaMallocHost(nbytes))
        array = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(int(ptr)))
        self._host[array.ctypes.data] = array
        return array

    def alloc_device(self, nbytes: int) -> int:
        """Device memory; its pointer."""
        return int(self._check("cudaMalloc", self._rt.cudaMalloc(nbytes)))

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: int) -> None:
        """Host to device, queued on `stream`."""
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(
            "cudaMemcpyAsync",
            self._rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self._streams[stream]),
        )

    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: int) -> None:
        """Device to host, queued on `stream`."""
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(
            "cudaMemcpyAsync",
            self._rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self._streams[stream]),
        )

    def stream_create(self) -> int:
        """A new stream; its handle."""
        stream = self._check("cudaStreamCreate", self._rt.cudaStreamCreate())
        self._streams[int(stream)] = stream
        return int(stream)

    def stream_synchronize(self, stream: int) -> None:
        """Block until `stream` is idle."""
        self._check("cudaStreamSynchronize", self._rt.cudaStreamSynchronize(self._streams[stream]))

    def free(self, buffer: np.ndarray | int) -> None:
        """Free pinned host or device memory."""
        if isinstance(buffer, np.ndarray):
            self._host.pop(buffer.ctypes.data)
            self._check("cudaFreeHost", self._rt.cudaFreeHost(buffer.ctypes.data))
        else:
            self._check("cudaFree", self._rt.cudaFree(buffer))

    def stream_destroy(self, stream: int) -> None:
        """Destroy a stream."""
        self._check("cudaStreamDestroy", self._rt.cudaStreamDestroy(self._streams.pop(stream)))


class PyCuda:
    """CudaApi on pycuda, with the device's primary context pushed on the loading thread."""

    name = "pycuda"

    def __init__(self, driver: ModuleType) -> None:
        self._drv = driver
        try:
            driver.init()
            if driver.Device.count() < 1:
                raise BackendUnavailable("no CUDA device (pycuda sees none)")
            self._device = driver.Device(0)
            # The primary context is the one TensorRT (CUDA runtime API) uses; a context of our own
            # (make_context) would hold buffers TensorRT cannot see.
            self._context = self._device.retain_primary_context()
            self._context.push()
        except driver.Error as exc:
            raise BackendUnavailable(f"no usable CUDA device: {exc}") from exc
        self._streams: dict[int, Any] = {}
        self._device_buffers: dict[int, Any] = {}
        self._host: dict[int, np.ndarray] = {}

    def _call(self, call: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._drv.Error as exc:
            raise CudaError(f"CUDA {call} failed: {exc}") from exc

    def device_properties(self) -> tuple[str, str]:
        """(GPU name, compute capability) of device 0."""
        major, minor = self._device.compute_capability()
        return str(self._device.name()).strip(), f"{major}.{minor}"

    def alloc_host_pinned(self, nbytes: int) -> np.ndarray:
        """Pinned host memory as a uint8 array."""
        array = self._call("pagelocked_empty", self._drv.pagelocked_empty, nbytes, np.uint8)
        self._host[array.ctypes.data] = array
        return array

    def alloc_device(self, nbytes: int) -> int:
        """Device memory; its pointer."""
        allocation = self._call("mem_alloc", self._drv.mem_alloc, nbytes)
        self._device_buffers[int(allocation)] = allocation
        return int(allocation)

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: int) -> None:
        """Host to device, queued on `stream`."""
        self._call("memcpy_htod_async", self._drv.memcpy_htod_async, dst, src, self._streams[stream])

    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: int) -> None:
        """Device to host, queued on `stream`."""
        self._call("memcpy_dtoh_async", self._drv.memcpy_dtoh_async, dst, src, self._streams[stream])

    def stream_create(self) -> int:
        """A new stream; its handle."""
        stream = self._call("Stream", self._drv.Stream)
        self._streams[int(stream.handle)] = stream
        return int(stream.handle)

    def stream_synchronize(self, stream: int) -> None:
        """Block until `stream` is idle."""
        self._call("Stream.synchronize", self._streams[stream].synchronize)

    def free(self, buffer: np.ndarray | int) -> None:
        """Free pinned host or device memory."""
        if isinstance(buffer, np.ndarray):
            allocation: Any = self._host.pop(buffer.ctypes.data).base  # pycuda's HostAllocation
            self._call("HostAllocation.free", allocation.free)
        else:
            self._call("DeviceAllocation.free", self._device_buffers.pop(buffer).free)

    def stream_destroy(self, stream: int) -> None:
        """Forget a stream (pycuda destroys it with its last reference)."""
        self._streams.pop(stream)


def _import_cudart() -> ModuleType | None:
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python < 12.6

        return cudart
    except ImportError:
        return None


def load_cuda() -> CudaApi:
    """cuda-python when importable, else pycuda; BackendUnavailable naming both when neither is."""
    cudart = _import_cudart()
    if cudart is not None:
        return CudaPython(cudart)
    try:
        import pycuda.driver as driver
    except ImportError as exc:
        raise BackendUnavailable(
            "neither cuda-python nor pycuda is installed (pip install cuda-python, or JetPack's pycuda)"
        ) from exc
    return PyCuda(driver)
