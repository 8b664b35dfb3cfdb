"""Kernel tests run every Triton kernel on CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` is set here, before any test module is imported, and again per test (a test
may delete it to check the PyTorch fallback). Our kernels read it at call time and pick the
interpreter by the tensors' device (``kernels._triton``), so this holds even when another test
imported the kernel modules first.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _interpreter_and_clean_dispatch(monkeypatch):
    # the package re-exports the function ``attention``, which hides the submodule of that name
    attention_module = importlib.import_module("kernels.attention")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DIFFDIS_ATTENTION", raising=False)
    monkeypatch.setattr(attention_module, "_configured", "auto")
    monkeypatch.setattr(attention_module, "_logged", set())
    torch.manual_seed(0)
