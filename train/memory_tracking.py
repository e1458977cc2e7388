"""The two dispatch modes behind the memory model: live bytes by kind, and values for fake tensors' questions.

Under FakeTensorMode every tensor has its real shape, dtype and strides and autograd saves what it saves,
but no storage holds data. `LiveBytes` sees every op's outputs and keeps, per storage, its bytes as the
CUDA caching allocator hands them out (rounded up to 512), until the storage is freed; the peak of their
sum is what torch.cuda.max_memory_allocated would report, without the allocator's own slack.

`FakeValues` answers what a fake tensor cannot: ops whose inputs carry no fake tensor (draws from seeded
generators, masks from host lists, token ids) run for real, so caption dropout, timesteps and per-sample
draws are the trainer's own; fake values are taken to be finite (x == x, |x| != inf), so the trainer's
checks for non-finite losses and gradients pass; whole-tensor comparisons (`allclose`, `equal`) are True
(the encoder cache finds an image's pixels unchanged, as from the second epoch on); and any other
question a step asks of a fake value (`.item()`, `bool()`, `.tolist()`) gets False or 0, which makes
decoding loops run to their full length (no caption ends early: the most memory a loop can take) and
error checks pass ("is anything wrong?" False). Each such answer is recorded by call site.
"""

from __future__ import annotations

import math
import traceback
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, unset_fake_temporarily
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# The CUDA caching allocator's smallest block and rounding unit.
ALLOCATION_UNIT = 512
KINDS = ("weights", "gradients", "optimizer", "activations")
_REPO = Path(__file__).resolve().parents[1]
_aten = torch.ops.aten


def allocated_bytes(storage: torch.UntypedStorage) -> int:
    return math.ceil(storage.nbytes() / ALLOCATION_UNIT) * ALLOCATION_UNIT


class LiveBytes(TorchDispatchMode):
    """Bytes of every live storage by kind (KINDS), and the peak of their sum with its breakdown and stage.

    Storages made inside an optimizer step count as optimizer memory (AdamW's moments, and while the step
    runs its temporaries); gradients are relabelled as they land on the parameters; everything else an op
    makes is an activation (saved tensors, temporaries, the gradients of activations, the batch).
    """

    def __init__(self) -> None:
        super().__init__()
        self._entries = WeakIdKeyDictionary()
        self.live: Counter[str] = Counter()
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.peak_stage = ""
        self.stage = ""
        self._kind = "activations"

    def add(self, tensor: torch.Tensor, kind: str) -> None:
        """Count a tensor's storage under `kind` once, until the storage is freed."""
        storage = tensor.untyped_storage()
        if storage in self._entries:
            return
        entry = [allocated_bytes(storage), kind]

        def freed(_: weakref.ref, entry: list = entry) -> None:
            self.live[entry[1]] -= entry[0]

        self._entries[storage] = (entry, weakref.ref(storage, freed))
        self.live[kind] += entry[0]
        self._note_peak()

    def relabel(self, tensor: torch.Tensor, kind: str) -> None:
        entry, _ = self._entries[tensor.untyped_storage()]
        self.live[entry[1]] -= entry[0]
        entry[1] = kind
        self.live[kind] += entry[0]

    def track_modules(self, modules: Iterable[torch.nn.Module]) -> None:
        """Weights (parameters and buffers) counted, and each trainable parameter's gradient relabelled."""
        for module in modules:
            for param in module.parameters():
                self.add(param, "weights")
                if param.requires_grad:
                    param.register_post_accumulate_grad_hook(
                        lambda param: self.relabel(param.grad, "gradients")
                    )
            for buffer in module.buffers():
                self.add(buffer, "weights")

    @contextmanager
    def optimizer_steps_tracked(self) -> Iterator[None]:
        """Within: what an optimizer step allocates is optimizer state."""

        def entering(*_: Any) -> None:
            self._kind = "optimizer"

        def leaving(*_: Any) -> None:
            self._kind = "activations"

        handles = (register_optimizer_step_pre_hook(entering), register_optimizer_step_post_hook(leaving))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _note_peak(self) -> None:
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.at_peak, self.peak_stage = total, dict(self.live), self.stage

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.add(tensor, self._kind)
        return out


def _is_fake_float(value: Any) -> bool:
    return isinstance(value, FakeTensor) and value.is_floating_point()


def _known_finite(func: Any, args: tuple[Any, ...]) -> bool | None:
    """What `x == x`, `x != x`, `x == inf` and `x != inf` are for a finite fake x; None for anything else."""
    if not args or not _is_fake_float(args[0]):
        return None
    if func in (_aten.eq.Tensor, _aten.ne.Tensor) and len(args) > 1 and args[1] is args[0]:
        return func is _aten.eq.Tensor
    if func in (_aten.eq.Scalar, _aten.ne.Scalar) and len(args) > 1 and math.isinf(args[1]):
        return func is _aten.ne.Scalar
    return None


def _call_site() -> str:
    """The innermost frame of this repository's code that asked (this module's own frames skipped)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        inside = path.is_relative_to(_REPO) and ".venv" not in path.relative_to(_REPO).parts
        if inside and path.name != Path(__file__).name:
            return f"{path.relative_to(_REPO)}:{frame.lineno}"
    return "?"


class FakeValues(TorchDispatchMode):
    """Real values where they exist, finite fake values, and recorded answers for the rest (module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not any(isinstance(value, FakeTensor) for value in tree_leaves((args, kwargs))):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        known = _known_finite(func, args)
        if known is not None:
            with unset_fake_temporarily():
                return torch.full(args[0].shape, known, dtype=torch.bool)
        try:
            return func(*args, **kwargs)
        except DataDependentOutputException:
            self.answered[_call_site()] += 1
            if func is not _aten._local_scalar_dense.default:
                return True  # allclose, equal
            return False if args[0].dtype == torch.bool else 0
