"""What can build engines here: the CUDA device, the TensorRT builder module, the GPUs to target.

Its own module because it is the one part of the builder that touches the machine rather than the
bundle: it must run (and fail with the fix) before any TensorRT object exists, since constructing one
without a GPU can crash the process; the tests swap its imports for fakes; the benchmarks read its
list of GPUs that TensorRT-RTX does not target (`RTX_ELSEWHERE`) without the builder.
TensorRT builds for the GPU it runs on (checked with cuda-python); TensorRT-RTX builds ahead of time
for a list of compute capabilities, no GPU needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hgad_edge.core.cuda_api import CudaError, CudaPython, import_cudart
from hgad_edge.core.engine_records import BuildError
from hgad_edge.core.errors import BackendUnavailableError
from hgad_edge.core.trt_common import TARGETS, TrtTarget, cc_text, import_target, rtx_capabilities, version_tuple

__all__ = [
    "NO_DEVICE_FIX",
    "NO_TRT_FIX",
    "RTX_ELSEWHERE",
    "import_builder",
    "import_tensorrt_builder",
    "require_cuda_device",
    "target_capabilities",
    "trt_major",
]

NO_DEVICE_FIX = (
    "TensorRT engines are built on the target GPU (Jetson / desktop): copy the bundle there and run hgad-edge build, "
    "or build a TensorRT-RTX engine here for RTX GPUs (--target rtx)"
)
NO_TRT_FIX = TARGETS["tensorrt"].install
# Why a compute capability is not a TensorRT-RTX target, and what to use instead.
RTX_ELSEWHERE = {
    "8.7": "Jetson Orin: use --target tensorrt with JetPack's TensorRT",
    "7.2": "Jetson Xavier: use --target tensorrt",
    "9.0": "Hopper (data-centre): use --target tensorrt (TensorRT 10/11) or Triton",
}


def require_cuda_device(device: int = 0, cudart: Any = None) -> tuple[Any, str, str]:
    """(cudart, compute capability "8.7", GPU name) of `device`; BuildError when there is no GPU.

    Runs before TensorRT is touched: building a TensorRT object without a GPU can segfault.
    """
    try:
        cudart = cudart if cudart is not None else import_cudart()
    except BackendUnavailableError as err:
        raise BuildError(f"cuda-python is missing ({err}); {NO_TRT_FIX}") from err
    cuda = CudaPython(cudart)
    count, reason = cuda.device_count()
    if count == 0:
        raise BuildError(f"no CUDA device ({reason}): {NO_DEVICE_FIX}")
    if not 0 <= device < count:
        raise BuildError(f"CUDA device {device} does not exist (this machine has {count}); pass device=0..{count - 1}")
    try:
        cuda.set_device(device)
        capability = cuda.compute_capability(device)
    except CudaError as err:
        raise BuildError(
            f"CUDA device {device} is not usable ({err}); check the driver (nvidia-smi / tegrastats)"
        ) from err
    return cudart, capability, cuda.device_name(device)


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def import_tensorrt_builder() -> Any:
    """The full `tensorrt` package (the lean runtime cannot build); BuildError naming the install."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BuildError(f"TensorRT is not installed ({err}): {NO_TRT_FIX}") from err
    if not hasattr(trt, "Builder"):
        raise BuildError(
            f"this tensorrt package ({getattr(trt, '__version__', '?')}) is a runtime-only build without the builder: "
            f"{NO_TRT_FIX}"
        )
    if trt_major(trt) < 10:
        raise BuildError(
            f"hgad-edge builds with TensorRT 10 or newer, found {trt.__version__} (JetPack 6 ships 10.3): {NO_TRT_FIX}"
        )
    return trt


def import_builder(target: str) -> Any:
    """The builder module of `target`; BuildError naming the install when it is missing."""
    if target == "tensorrt":
        return import_tensorrt_builder()
    try:
        return import_target(target, build=True)
    except BackendUnavailableError as err:
        raise BuildError(str(err)) from err


def target_capabilities(trt: Any, target: TrtTarget, requested: Sequence[str] | None) -> tuple[list[str], bool]:
    """(compute capabilities the engine is for, whether they were requested explicitly) of an
    ahead-of-time target; BuildError naming the supported list for anything else."""
    every, default = rtx_capabilities(trt)
    if not requested:
        return list(default), False
    wanted = []
    for value in requested:
        try:
            cc = cc_text(value)
        except (TypeError, ValueError):
            raise BuildError(f"--compute-capability {value!r} is not a compute capability like 8.6") from None
        if cc not in every:
            why = RTX_ELSEWHERE.get(cc, "not an RTX-class GPU")
            raise BuildError(
                f"{target.label} cannot target compute capability {cc} ({why}); it supports {', '.join(every)}"
            )
        wanted.append(cc)
    return sorted(set(wanted), key=lambda c: version_tuple(c, 2)), True
