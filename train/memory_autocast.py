"""CUDA's autocast rules on CPU tensors, so a CPU-only machine can see the dtypes a GPU step would produce.

Mixed precision decides most of a step's activation memory: CUDA autocast runs convolutions and matmuls in
bf16 but group_norm, layer_norm, softmax, upsampling and the losses in fp32, so the fp32 copies those ops
make are what the backward pass keeps. CPU autocast has different lists (its norms stay in bf16), and
the autograd engine cannot run a backward pass on (fake) CUDA tensors without a GPU. So the memory model
runs on CPU fake tensors with the CPU autocast that Accelerate enables, and `cuda_autocast_rules()`
temporarily replaces every AutocastCPU kernel: the ops torch registers for AutocastCUDA get CUDA's policy
(below, from torch's autocast_mode), and the CPU-only ones fall through, as they do on CUDA.

Not reproduced: the autocast weight cache (CUDA keeps one cast copy of each trainable fp32 leaf per
autocast region; here each use casts again, which costs the same where, as with LoRA, each weight is
used once per forward and saved by that use).
"""

# The op lists are written as text (names split on spaces), as torch lists them; ruff would want one literal
# per line.
# ruff: noqa: SIM905

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map_only

# CUDA's autocast policies by op overload ("name" is name.default), as torch registers them for AutocastCUDA.
LOWER_PRECISION = (
    "_convolution _convolution.deprecated conv1d conv2d conv3d conv_tbc conv_transpose1d "
    "conv_transpose2d.input conv_transpose3d.input convolution cudnn_convolution "
    "cudnn_convolution_transpose prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm "
    "baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell "
    "gru_cell rnn_tanh_cell rnn_relu_cell _cudnn_rnn _scaled_dot_product_flash_attention "
    "scaled_dot_product_attention"
).split()
FLOAT32 = (
    "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar "
    "pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm group_norm rms_norm "
    "frobenius_norm.dim nuclear_norm nuclear_norm.dim cosine_similarity poisson_nll_loss "
    "cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss "
    "huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss triplet_margin_loss "
    "multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp "
    "linalg_matrix_sqrth upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d "
    "_upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d "
    "upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d "
    "_upsample_bicubic2d_aa"
).split()
# Ops with an optional output dtype: computed (and returned) in fp32 unless the caller chose a dtype.
FLOAT32_OUTPUT = (
    "prod prod.dim_int softmax.int log_softmax.int cumprod cumsum linalg_vector_norm linalg_matrix_norm "
    "linalg_matrix_norm.str_ord sum sum.dim_IntList"
).split()
# norm overloads without a dtype: redispatched to the overload that takes one, with fp32.
FLOAT32_APPENDED = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
# Run in the widest floating dtype among the arguments.
PROMOTE = "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add".split()
# CUDA autocast refuses these (unsafe in lower precision).
BANNED = ("binary_cross_entropy",)

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _overload(name: str) -> torch._ops.OpOverload:
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


def _eligible(value: Any) -> bool:
    """What autocast casts: floating tensors other than float64."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


def _cast(values: Any, dtype: torch.dtype) -> Any:
    return tree_map_only(
        torch.Tensor, lambda t: t.to(dtype) if _eligible(t) and t.dtype != dtype else t, values
    )


def _first_tensor(args: tuple[Any, ...]) -> torch.Tensor | None:
    return next((arg for arg in args if isinstance(arg, torch.Tensor)), None)


def _kernel(name: str, policy: str) -> Callable[..., Any]:
    """An AutocastCPU kernel applying one CUDA policy, then running the op below autocast."""
    op = _overload(name)
    dtype_position = next(
        (index for index, argument in enumerate(op._schema.arguments) if argument.name == "dtype"), None
    )

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            lower = torch.get_autocast_dtype("cpu")
            if policy == "lower":
                return op(*_cast(args, lower), **_cast(kwargs, lower))
            if policy == "fp32":
                return op(*_cast(args, torch.float32), **_cast(kwargs, torch.float32))
            if policy == "fp32_output":
                if _eligible(_first_tensor(args)):
                    if dtype_position is not None and len(args) > dtype_position:
                        args = (
                            *args[:dtype_position],
                            args[dtype_position] or torch.float32,
                            *args[dtype_position + 1 :],
                        )
                    elif kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
            if policy == "fp32_appended":
                first = _first_tensor(args)
                dtype = torch.float32 if _eligible(first) else first.dtype
                return _overload(FLOAT32_APPENDED[name])(*args, **kwargs, dtype=dtype)
            if policy == "promote":
                floats = [t for t in tree_leaves((args, kwargs)) if _eligible(t)]
                widest = torch.float32 if any(t.dtype == torch.float32 for t in floats) else lower
                return op(*_cast(args, widest), **_cast(kwargs, widest))
            raise RuntimeError(f"CUDA autocast refuses aten::{name}; use its _with_logits form")

    return kernel


def cuda_policies() -> dict[str, str]:
    """Every op overload's CUDA autocast policy, by name."""
    policies = {name: "lower" for name in LOWER_PRECISION}
    policies |= {name: "fp32" for name in FLOAT32}
    policies |= {name: "fp32_output" for name in FLOAT32_OUTPUT}
    policies |= {name: "fp32_appended" for name in FLOAT32_APPENDED}
    policies |= {name: "promote" for name in PROMOTE}
    return policies | {name: "banned" for name in BANNED}


def autocast_kernels(dispatch_key: str) -> set[str]:
    """The aten op overloads with a kernel of their own for an autocast dispatch key, by name."""
    names = torch._C._dispatch_get_all_op_names()
    return {
        name.removeprefix("aten::")
        for name in names
        if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)
    }


@contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """Within: CPU autocast casts as CUDA autocast does (see the module doc); the CPU kernels come back after."""
    policies = cuda_policies()
    missing = autocast_kernels("AutocastCUDA") - policies.keys()
    if missing:
        raise RuntimeError(f"CUDA autocast policies unknown for {sorted(missing)}: extend memory_autocast.py")
    library = torch.library.Library("aten", "IMPL")
    try:
        for name, policy in policies.items():
            library.impl(name, _kernel(name, policy), "AutocastCPU")
        # Ops only CPU autocast casts fall through, so that a composite one (cross_entropy_loss) decomposes
        # into ops that meet the CUDA rules above, as on a GPU.
        for name in autocast_kernels("AutocastCPU") - policies.keys():
            library.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        yield
    finally:
        library._destroy()
