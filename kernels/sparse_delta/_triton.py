"""Triton, imported only when a Triton backend is asked for, and the checks and helpers its kernels share.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors, but only when the variable is
set before ``triton`` is first imported: the ``@triton.jit`` functions of ``triton.language`` itself
(``tl.zeros``, ``tl.sum``...) are built for one mode at import time. torch imports triton early
(``torch._dynamo`` does, and transformers and peft import that), so the variable must be in the environment
before Python starts; ``language_mode_mismatch`` detects when it was set too late.
"""

import functools
import os
from typing import Optional

try:  # an optional extra: ``pip install triton`` (the ``[triton]`` extra of an install from source)
    import triton
    import triton.language as tl

    jit = triton.jit
    IMPORT_ERROR: Optional[BaseException] = None
except Exception as error:  # noqa: BLE001 - ImportError, or a broken install raising anything else
    triton = None
    IMPORT_ERROR = error

    class tl:  # noqa: N801 - a stand-in so that kernel signatures (``BLOCK: tl.constexpr``) still parse
        constexpr = None

    def jit(fn):
        return fn


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), on any device's tensors."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads it through knobs (which may also be set in code)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def language_mode_mismatch() -> Optional[str]:
    """Why kernels cannot run in the mode now in force (None when they can): ``triton.language`` was imported
    in the other mode (compiled vs interpreted)."""
    jit_function = getattr(getattr(triton, "runtime", None), "JITFunction", None)
    zeros = getattr(tl, "zeros", None)
    if jit_function is None or zeros is None:
        return None  # cannot tell (another triton layout): let the launch speak
    language_compiled = isinstance(zeros, jit_function)
    if interpreting() and language_compiled:
        return (
            "TRITON_INTERPRET=1 was set after triton was imported (torch imports it early); "
            "set it in the environment before starting Python"
        )
    if not interpreting() and not language_compiled:
        return "triton was imported with TRITON_INTERPRET=1, which is no longer set"
    return None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_target(device) -> int:
    """Programs that keep a GPU busy (a few per SM); 1 in the interpreter, where they only cost time."""
    if interpreting() or device.type != "cuda":
        return 1
    import torch

    return 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def dot_upcast(dtype) -> bool:
    """Upcast bf16 tiles to fp32 before ``tl.dot`` in the interpreter, whose bf16 ``tl.dot`` returns garbage
    (triton 3.9: numpy has no bfloat16); compiled kernels keep bf16 tensor-core dots."""
    import torch

    return interpreting() and dtype == torch.bfloat16


def pow2_bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 16): a size bucket that keys the autotuners."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def autotune(kernel, configs: list[dict], key: list[str], reset_to_zero=None):
    """``triton.autotune`` over ``configs`` (dicts of meta-parameters plus ``num_warps`` / ``num_stages``), or
    None without triton. The plain ``kernel`` stays launchable with fixed meta-parameters."""
    if triton is None:
        return None
    built = []
    for config in configs:
        config = dict(config)
        warps, stages = config.pop("num_warps", 4), config.pop("num_stages", 3)
        built.append(triton.Config(config, num_warps=warps, num_stages=stages))
    return triton.autotune(configs=built, key=key, reset_to_zero=reset_to_zero)(kernel)
