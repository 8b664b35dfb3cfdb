"""Kernel tests run every Triton kernel on CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before the process first imports triton (``tests/conftest.py``
does it first thing; see ``kernels._triton`` for why). Each test here checks that it took effect,
so a Triton test can never silently pass on the PyTorch fallback, and sets the variable again (a
test may delete it to check that fallback).
"""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _interpreter_and_clean_dispatch(monkeypatch):
    # the package re-exports the function ``attention``, which hides the submodule of that name
    attention_module = importlib.import_module("kernels.attention")
    from kernels._triton import interpreter_ready  # noqa: PLC0415

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreter_ready(), ("triton was imported before TRITON_INTERPRET=1 was set: run pytest from the "
                                 "repository root so tests/conftest.py sets it first")
    monkeypatch.delenv("DIFFDIS_ATTENTION", raising=False)
    monkeypatch.setattr(attention_module, "_configured", "auto")
    monkeypatch.setattr(attention_module, "_logged", set())
    torch.manual_seed(0)
