"""Attach LoRA adapters, decide what trains in which dtype, checkpoint the trainable part, and export.

The exports are the formats users already load: a PEFT adapter folder for the captioner, a diffusers
`pytorch_lora_weights.safetensors` (optionally also a kohya/A1111 file) for the generator, and standalone
merged models that plain `from_pretrained` loads without peft.
"""

from __future__ import annotations

import copy
import json
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict, Unpack

import safetensors.torch
import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from cycletune.models.modes import frozen as frozen  # re-exported: defined with the other mode helpers

if TYPE_CHECKING:
    from cycletune.models.captioner import Captioner
    from cycletune.models.generator import Generator

TrainMode = Literal["lora", "full"]
TRAIN_MODES: tuple[str, ...] = ("lora", "full")
# Parts of a wrapper that no train mode ever updates (the generator's autoencoder).
NEVER_TRAINED_PARTS = ("vae",)
ADAPTER_NAME = "default"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "pytorch_lora_weights_kohya.safetensors"


class LoraShape(TypedDict):
    """The keywords add_captioner_lora and add_generator_lora take (the config's lora section), typed once
    for both; target_modules None or absent means the default targets above."""

    rank: int
    alpha: float
    dropout: NotRequired[float]
    target_modules: NotRequired[list[str] | str | None]


def _lora_config(
    default_targets: list[str] | str,
    peft_options: dict[str, Any],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
) -> LoraConfig:
    """LoraShape as a peft config; an unknown or missing keyword fails here, as a TypeError."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=default_targets if target_modules is None else target_modules,
        **peft_options,
    )


def add_captioner_lora(captioner: Captioner, **shape: Unpack[LoraShape]) -> None:
    """Wrap `captioner.model` in a peft LoRA model.

    No task_type: peft's CAUSAL_LM wrapper would reroute forward() to arguments BLIP does not take.
    """
    config = _lora_config(captioner.spec.lora_targets, {}, **shape)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` here: noise with nothing to act on.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        captioner.model = get_peft_model(captioner.model, config, adapter_name=ADAPTER_NAME)


def add_generator_lora(generator: Generator, **shape: Unpack[LoraShape]) -> None:
    """Inject LoRA into the denoiser the way diffusers' LoRA trainers do, so its savers and loaders apply."""
    config = _lora_config(generator.spec.lora_targets, {"init_lora_weights": "gaussian"}, **shape)
    generator.denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)


def _is_lora_parameter(name: str) -> bool:
    """peft names every adapter tensor lora_A / lora_B / lora_embedding_* / lora_magnitude_vector."""
    return "lora_" in name


def _never_trained_parameter_ids(module: nn.Module) -> set[int]:
    parts = (getattr(module, name, None) for name in NEVER_TRAINED_PARTS)
    return {id(param) for part in parts if isinstance(part, nn.Module) for param in part.parameters()}


def prepare_trainable(
    module: nn.Module, *, train_mode: TrainMode, base_dtype: torch.dtype = torch.float32
) -> list[str]:
    """Set requires_grad and dtypes for a train mode; return the sorted names of trainable parameters.

    Trainable parameters are kept in fp32 whatever base_dtype is: fp16 trainable weights make GradScaler
    fail with "Attempting to unscale FP16 gradients", and bf16 ones lose small updates. Frozen weights are
    cast to base_dtype to save memory. "lora" trains only adapter tensors; "full" trains every parameter
    except NEVER_TRAINED_PARTS (the generator's VAE).
    """
    if train_mode not in TRAIN_MODES:
        raise ValueError(f"unknown train_mode {train_mode!r}; expected one of {TRAIN_MODES}")
    never_trained = _never_trained_parameter_ids(module)
    trainable = []
    for name, param in module.named_parameters():
        trains = id(param) not in never_trained and (train_mode == "full" or _is_lora_parameter(name))
        param.requires_grad_(trains)
        param.data = param.data.to(torch.float32 if trains else base_dtype)
        if trains:
            trainable.append(name)
    if not trainable:
        raise ValueError(
            f"train_mode={train_mode!r} left nothing to train in {type(module).__name__}: "
            "attach adapters first (add_captioner_lora / add_generator_lora)"
        )
    return sorted(trainable)


def _parameters_named(module: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    params = dict(module.named_parameters())
    absent = sorted(set(names) - params.keys())
    if absent:
        raise ValueError(f"{type(module).__name__} has no parameters named {absent}")
    return {name: params[name] for name in names}


def trainable_state_dict(module: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of just the trained tensors: checkpoints stay small and independent of later updates."""
    return {name: param.detach().clone() for name, param in _parameters_named(module, names).items()}


def load_trainable_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], names: Sequence[str]
) -> None:
    """Restore trainable_state_dict() exactly; refuse partial or mismatched checkpoints, naming each key."""
    params = _parameters_named(module, names)
    missing = sorted(params.keys() - state.keys())
    unexpected = sorted(state.keys() - params.keys())
    mismatched = [
        f"{name}: checkpoint {tuple(state[name].shape)} vs model {tuple(param.shape)}"
        for name, param in sorted(params.items())
        if name in state and state[name].shape != param.shape
    ]
    problems = [
        f"{label}: {keys}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"cannot restore {type(module).__name__} trainable state: " + "; ".join(problems))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


@contextmanager
def _sets_sorted(config: LoraConfig) -> Iterator[None]:
    """The config's set fields (target_modules, exclude_modules) as sorted lists while it is written.

    peft and diffusers write a set in iteration order, which follows string hashes and so differs between
    processes (PYTHONHASHSEED): sorted, two identical runs write identical files.
    """
    sets = {name: value for name, value in vars(config).items() if isinstance(value, set)}
    try:
        for name, value in sets.items():
            setattr(config, name, sorted(value))
        yield
    finally:
        for name, value in sets.items():
            setattr(config, name, value)


def _canonical_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's header in one fixed order: sorted metadata, then tensors by offset.

    safetensors writes `__metadata__` from a Rust hash map, randomly ordered per process, so files with more
    than one metadata entry would differ in bytes between identical runs. The tensor data is left as it is.
    """
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    tensors = json.loads(data[8 : 8 + length])
    metadata = tensors.pop("__metadata__", None)
    header = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    header.update(sorted(tensors.items(), key=lambda item: item[1]["data_offsets"]))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def _require_peft_captioner(captioner: Captioner) -> PeftModel:
    if not isinstance(captioner.model, PeftModel):
        raise ValueError(
            "captioner has no LoRA adapter (full fine-tuning?): export it with save_merged_captioner"
        )
    return captioner.model


def save_captioner_adapter(captioner: Captioner, out_dir: Path) -> Path:
    """PEFT folder (adapter_model.safetensors + adapter_config.json) for PeftModel.from_pretrained(base, dir).

    base_model_name_or_path is filled from the base model's source so the folder says what it adapts; the
    config's sets are written sorted, so identical runs write identical folders.
    """
    model = _require_peft_captioner(captioner)
    config = model.peft_config[ADAPTER_NAME]
    base = model.get_base_model()
    config.base_model_name_or_path = config.base_model_name_or_path or base.config._name_or_path or None
    with _sets_sorted(config):
        model.save_pretrained(out_dir)
    return Path(out_dir)


def _require_generator_lora(generator: Generator) -> LoraConfig:
    config = getattr(generator.denoiser, "peft_config", {}).get(ADAPTER_NAME)
    if config is None:
        raise ValueError(
            f"generator {generator.spec.denoiser} has no LoRA adapter (full fine-tuning?): use save_merged_generator"
        )
    return config


def _kohya_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet LoRA in kohya/A1111 keys (lora_unet_<path>.lora_down/.lora_up/.alpha).

    diffusers' convert_state_dict_to_kohya writes every `.alpha` as the rank (len(lora_down)), which would
    rescale a LoRA trained with alpha != rank by rank/alpha; each is overwritten with the layer's real alpha.
    """
    peft_state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    kohya = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in peft_state.items()})
    for name, layer in unet.named_modules():
        if isinstance(layer, LoraLayer):
            alpha_key = f"lora_unet_{name.replace('.', '_')}.alpha"
            if alpha_key not in kohya:
                raise RuntimeError(f"kohya conversion produced no {alpha_key}; diffusers' key layout changed")
            kohya[alpha_key] = torch.tensor(float(layer.lora_alpha[ADAPTER_NAME]))
    return kohya


def _scale_folded(unet: nn.Module, peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft_state with every layer's lora_B multiplied by its scale (alpha / rank), so that alpha = rank
    reproduces the trained layer."""
    folded = dict(peft_state)
    for name, layer in unet.named_modules():
        if isinstance(layer, LoraLayer):
            key = f"{name}.lora_B.weight"
            if key not in folded:
                raise RuntimeError(f"the UNet's LoRA state dict has no {key}; peft's key layout changed")
            folded[key] = folded[key] * layer.scaling[ADAPTER_NAME]
    return folded


def save_generator_lora(generator: Generator, out_dir: Path, *, kohya: bool = False) -> Path:
    """diffusers `pytorch_lora_weights.safetensors` (and a kohya/A1111 file if asked) for load_lora_weights.

    Each layer's alpha / rank scale is folded into its lora_B weights and the file says alpha = rank: a loader
    that drops the safetensors metadata (which carries the LoraConfig) infers alpha = rank, so it applies the
    LoRA at full strength too, instead of at rank / alpha of it. Identical runs write byte-identical files
    (sorted sets, canonical headers).
    """
    config = _require_generator_lora(generator)
    if kohya and not generator.spec.kohya_export:
        raise ValueError(
            f"export.kohya: kohya/A1111 LoRA files are written for the UNet families (sd, sdxl), not "
            f"{generator.spec.name}; its diffusers file is the format its pipeline's load_lora_weights reads"
        )
    out_dir = Path(out_dir)
    denoiser = generator.denoiser
    peft_state = _scale_folded(denoiser, get_peft_model_state_dict(denoiser, adapter_name=ADAPTER_NAME))
    with _sets_sorted(config):
        metadata = config.to_dict() | {"lora_alpha": config.r, "alpha_pattern": dict(config.rank_pattern)}
    # The family pipeline's own saver (StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline, ...):
    # its key prefix and layout are what its load_lora_weights reads.
    generator.spec.pipeline_class.save_lora_weights(
        out_dir,
        **generator.spec.lora_save_arguments(
            convert_state_dict_to_diffusers(peft_state) if generator.spec.converts_lora_keys else peft_state,
            metadata,
        ),
        weight_name=DIFFUSERS_LORA_FILE,
    )
    _canonical_safetensors_header(out_dir / DIFFUSERS_LORA_FILE)
    if kohya:
        kohya_metadata = {
            "format": "pt",
            "ss_network_module": "networks.lora",
            "ss_network_dim": json.dumps(config.r),
            "ss_network_alpha": json.dumps(config.lora_alpha),
        }
        safetensors.torch.save_file(
            {key: value.contiguous() for key, value in _kohya_state_dict(generator.denoiser).items()},
            out_dir / KOHYA_LORA_FILE,
            metadata=kohya_metadata,
        )
        _canonical_safetensors_header(out_dir / KOHYA_LORA_FILE)
    return out_dir


def _fp32_cpu_copy(module: nn.Module) -> nn.Module:
    """Merge on a copy so training can go on, and in fp32 so merging bf16 bases loses nothing further.

    .float(), not .to(dtype=...): diffusers' ModelMixin.to warns about fp32-kept modules on any dtype cast.
    """
    return copy.deepcopy(module).to("cpu").float()


def save_merged_captioner(captioner: Captioner, out_dir: Path) -> Path:
    """A standalone fp32 model folder (LoRA merged, processor included) for plain from_pretrained."""
    model = _fp32_cpu_copy(captioner.model)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    captioner.processor.save_pretrained(out_dir)
    return Path(out_dir)


def save_merged_generator(generator: Generator, out_dir: Path) -> Path:
    """A standalone fp32 pipeline folder of the generator's family with the LoRA fused into the denoiser.

    Full fine-tuning has nothing to fuse: the trained denoiser and text encoders are saved as they are. The
    pipeline keeps the base model's sampling scheduler (with any prediction_type override the model was
    trained to), not the process training drew noise from, so its default sampling stays the base's.
    """
    denoiser = _fp32_cpu_copy(generator.denoiser)
    if getattr(denoiser, "peft_config", None):
        denoiser.fuse_lora()
        denoiser.unload_lora()
    copies = {
        slot.encoder: _fp32_cpu_copy(getattr(generator, slot.encoder))
        for slot in generator.spec.text_encoders
    }
    pipeline = generator.pipeline(
        **copies,
        **{generator.spec.denoiser: denoiser},
        vae=None if generator.vae is None else _fp32_cpu_copy(generator.vae),
    )
    pipeline.save_pretrained(out_dir)
    return Path(out_dir)
