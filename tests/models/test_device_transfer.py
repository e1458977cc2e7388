"""models/transfer.to_device: same values as Tensor.to, and (on CUDA) no host sync for host-to-device copies."""

from __future__ import annotations

import pytest
import torch

from cycletune.models.device_transfer import to_device


def test_to_device_on_the_cpu_is_tensor_to() -> None:
    draws = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_device(draws, "cpu", torch.float64), draws.double())
    assert to_device(draws, "cpu") is draws


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_to_cuda_copy_is_queued_without_a_sync() -> None:
    draws = torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
    try:
        on_gpu = to_device(draws, "cuda", torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.bfloat16
    assert torch.equal(on_gpu.cpu(), draws.bfloat16())
