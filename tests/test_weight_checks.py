"""The loader's per-tensor check finds every non-finite value, in every float dtype a checkpoint uses."""

import pytest
import torch

from specoffload.errors import CheckpointError
from specoffload.models.weight_checks import check_tensor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 4097, -1])  # first, middle and last element
def test_a_single_non_finite_value_is_found(dtype, bad, where):
    t = torch.randn(64, 128).to(dtype)
    t.view(-1)[where] = bad
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        check_tensor("ckpt", "w", t, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_finite_and_empty_tensors_pass(dtype):
    t = torch.randn(64, 128).to(dtype)
    t[0, 0] = torch.finfo(dtype).max  # the largest finite value is finite
    check_tensor("ckpt", "w", t, t)
    check_tensor("ckpt", "w", t[:0], t[:0])


def test_integer_tensors_are_refused_by_dtype():
    t = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(CheckpointError, match="has dtype int32, expected a floating-point dtype"):
        check_tensor("ckpt", "w", t, t.float())


@pytest.mark.parametrize("nan_byte", [0x7F, 0xFF])  # e4m3fn's two NaNs, positive and negative
@pytest.mark.parametrize("where", [0, 4097, -1])
def test_an_fp8_nan_is_found(nan_byte, where):
    from specoffload.models.fp8_checkpoint import check_finite_fp8

    t = torch.randn(64, 128).to(torch.float8_e4m3fn)
    t.view(torch.uint8).view(-1)[where] = nan_byte
    with pytest.raises(CheckpointError, match="holds NaN values"):
        check_finite_fp8("ckpt", "w", t)


def test_finite_fp8_passes():
    from specoffload.models.fp8_checkpoint import check_finite_fp8

    t = torch.randn(64, 128).to(torch.float8_e4m3fn)
    t.view(torch.uint8)[0, :2] = torch.tensor([0x7E, 0xFE], dtype=torch.uint8)  # +-448, the largest finite
    check_finite_fp8("ckpt", "w", t)
    check_finite_fp8("ckpt", "w", t[:0])
