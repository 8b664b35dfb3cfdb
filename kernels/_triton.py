"""When a fused kernel may run, and how it is launched: compiled on CUDA, interpreted on CPU.

Triton decides between its compiler and its interpreter when ``@triton.jit`` *decorates* a function
(it reads ``TRITON_INTERPRET`` then). Two consequences:

- our kernels are plain Python functions, wrapped at launch time by the tensors' device
  (``JITFunction`` for CUDA, ``InterpretedFunction`` for CPU), so importing our modules early is harmless;
- Triton's *own* library (``tl.sum``, ``tl.max``, ``tl.sigmoid`` are ``@jit`` functions) is decorated
  when ``triton`` is first imported, and DeepSpeed imports it early. The interpreter can only run our
  kernels if ``TRITON_INTERPRET=1`` was set before that first import (``tests/conftest.py`` does it
  first thing). :func:`interpreter_ready` checks this, and a CPU tensor takes the Triton path only
  then; otherwise the PyTorch reference runs (with one warning if the variable was set too late).

So production CPU runs keep the fast PyTorch paths and only tests pay for the interpreter.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401, PLC0415 - optional: the test and cuda extras
    except Exception:
        return False
    return True


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


log = logging.getLogger("kernels")


@lru_cache(maxsize=1)
def _library_interpreted() -> bool:
    from triton.language import standard  # noqa: PLC0415

    return type(standard.sum).__name__ == "InterpretedFunction"


def interpreter_ready() -> bool:
    """``TRITON_INTERPRET=1`` is set *and* was set when triton was imported (its library is interpreted)."""
    if not (interpreter_requested() and triton_importable()):
        return False
    if _library_interpreted():
        return True
    if not _warned:
        _warned.append(True)
        log.warning("TRITON_INTERPRET=1 was set after triton was imported (its library is compiled): fused "
                    "kernels fall back to PyTorch on CPU. Set it before the process imports triton or deepspeed.")
    return False


_warned: list[bool] = []


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """True when a Triton kernel can take ``tensor``: CUDA with Triton installed, or CPU under the interpreter."""
    if tensor.device.type == "cuda":
        return triton_importable()
    return tensor.device.type == "cpu" and interpreter_ready()


@lru_cache(maxsize=None)
def _wrapped(fn, interpret: bool):
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    return JITFunction(fn)


def launch(fn, grid: tuple[int, ...], device: torch.device, *args, **meta) -> None:
    """Run kernel ``fn`` (an undecorated Triton function) over ``grid`` for tensors on ``device``:
    interpreted on CPU, and on CUDA too when the process imported triton in interpreter mode (its
    library functions could not be compiled into our kernel then), as ``TRITON_INTERPRET=1`` means."""
    _wrapped(fn, device.type != "cuda" or _library_interpreted())[grid](*args, **meta)
