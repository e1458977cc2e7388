"""Host-to-device copies that do not stall the host in the middle of a training step.

`cpu_tensor.to("cuda")` from ordinary (pageable) memory synchronizes the stream: Python waits until the GPU
has run everything queued so far. Inside a step (per-sample noise drawn on the CPU, token ids, cached encoder
outputs) that means the GPU first drains its queue and then idles while the host launches the next kernels
one by one, instead of the host running ahead. Copying from pinned memory with non_blocking=True queues the
copy like a kernel; PyTorch's pinned-memory allocator keeps the staging buffer until the copy has run, so the
source may be freed or reused at once.
"""

from __future__ import annotations

import torch


def to_device(
    tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`tensor.to(device, dtype)`, queued without a host sync when it copies from the CPU to a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device=device, dtype=dtype)
    if dtype is not None:
        tensor = tensor.to(dtype)
    return tensor.pin_memory().to(device, non_blocking=True)
