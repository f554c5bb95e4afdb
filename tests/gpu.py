"""Marks for tests that need a CUDA GPU. CI has none: they are skipped there and run on a GPU
machine by scripts/gpu_check.py (`pytest -m cuda`)."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def cuda_only(reason: str):
    """Decorator: the test runs only where CUDA is, and `pytest -m cuda` selects it."""
    def mark(f):
        return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason=reason)(f))
    return mark


# A "device" parameter value whose case runs only on a GPU (and is selected by -m cuda).
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")])
