"""The ``cuda`` marker (skipped by ``tests/conftest.py`` where torch sees no CUDA device)."""

import pytest
import torch

pytestmark = pytest.mark.cuda


def test_a_tensor_round_trips_through_the_gpu() -> None:
    assert torch.cuda.device_count() >= 1
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    on_gpu = x.to("cuda")
    doubled = on_gpu * 2  # a kernel runs on the device
    assert on_gpu.device.type == "cuda" and doubled.device == on_gpu.device
    torch.testing.assert_close(doubled.cpu(), x * 2, rtol=0, atol=0)
