"""Optional test oracles. The runtime needs only numpy, numba and scipy; torch is a second oracle where installed.

    from tests.optional import F, requires_torch, torch

    if torch is not None:          # extra comparison in a test that also checks the NumPy reference
        ...
    @requires_torch                # a test that is only about torch
"""
from __future__ import annotations

import importlib

import pytest


def optional_import(name: str):
    """The module, or None when it (or something it needs) is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


torch = optional_import("torch")
F = None if torch is None else optional_import("torch.nn.functional")

requires_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (optional oracle)")
