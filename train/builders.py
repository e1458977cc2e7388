"""Small builders that turn config sections into models, optimizers, schedulers and data streams.

The recipe (train/cycle.py) calls these and shows the loop; export and evaluation reuse them so a
checkpoint is always rebuilt exactly the way it was trained.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil

import torch
from diffusers.optimization import get_scheduler

from cycletune.data.shards import InMemoryShard, Shard, ShardedSource, read_shards
from cycletune.data.skips import SkipLedger
from cycletune.data.source_types import SOURCE_TYPES
from cycletune.data.sources import Record, SourceResult, SourceSettings
from cycletune.data.streams import Stream
from cycletune.evaluation.availability import require_package
from cycletune.evaluation.captions import CorpusCider
from cycletune.losses.cycle_modes import CaptionScorer
from cycletune.models.cache import DEFAULT_MAX_BYTES, FrozenEncoderCache
from cycletune.models.captioner import Captioner
from cycletune.models.denoising_chain import chain_policy
from cycletune.models.families import captioner_family, generator_family
from cycletune.models.generator import Generator
from cycletune.models.generator_bridge import GeneratorBridge
from cycletune.models.lora import add_captioner_lora, add_generator_lora, prepare_trainable
from cycletune.models.speed_levers import apply_denoiser_levers
from cycletune.train.config import (
    CaptionerSettings,
    Config,
    ConfigError,
    GeneratorSettings,
    ModelSettings,
    OptimizerSettings,
    Phase,
    check_model_source,
)

logger = logging.getLogger(__name__)

BASE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_captioner(settings: CaptionerSettings, mixed_precision: str = "no") -> tuple[Captioner, list[str]]:
    """Load the captioner, attach LoRA (or unfreeze everything) and return it with its trainable names."""
    check_model_source(settings, "captioner")
    family = captioner_family(settings.pretrained_model_name_or_path, revision=settings.revision)
    captioner = family.wrapper.from_pretrained(
        settings.pretrained_model_name_or_path,
        revision=settings.revision,
        max_length=settings.max_length,
        prompt=settings.prompt,
    )
    if settings.train_mode == "lora":
        add_captioner_lora(captioner, **_lora_kwargs(settings))
    if settings.gradient_checkpointing:
        captioner.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    # Loaded in eval mode; trained in train mode from update 1 (dropout and checkpointing act), while
    # models.modes.frozen puts it in eval mode whenever it serves as the partner.
    captioner.train()
    return captioner, prepare_trainable(
        captioner, train_mode=settings.train_mode, base_dtype=BASE_DTYPES[mixed_precision]
    )


def build_generator(settings: GeneratorSettings, mixed_precision: str = "no") -> tuple[Generator, list[str]]:
    """Load the generator parts, attach UNet LoRA (or unfreeze UNet + text encoder) and list trainables."""
    check_model_source(settings, "generator")
    family = generator_family(settings.pretrained_model_name_or_path, revision=settings.revision)
    generator = family.wrapper.from_pretrained(
        settings.pretrained_model_name_or_path,
        revision=settings.revision,
        resolution=settings.resolution,
        options=settings.family_options(),
    )
    if settings.train_mode == "lora":
        add_generator_lora(generator, **_lora_kwargs(settings))
    if settings.gradient_checkpointing:
        generator.denoiser.enable_gradient_checkpointing()
        if generator.vae is not None:  # the decoder carries a gradient on the T2I2T paths; frozen either way
            generator.vae.enable_gradient_checkpointing()
        if settings.train_mode == "full":
            for encoder in generator.text_encoders:
                encoder.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
    generator.train()  # as the captioner: train mode when trained, eval mode as the partner
    names = prepare_trainable(
        generator, train_mode=settings.train_mode, base_dtype=BASE_DTYPES[mixed_precision]
    )
    apply_denoiser_levers(generator, settings.denoiser_levers())  # on the final weights (memory format)
    return generator, names


def check_family_runs_the_modes(config: Config, generator: Generator) -> None:
    """Refuse, before the first step, a cycle mode the generator cannot run: T2I2T reward samples the
    stochastic form of the family's sampler (DDIM, or the flow-matching Euler sampler's SDE), built here
    once so that what it refuses (a DDIM scheduler with dynamic thresholding) fails before training."""
    settings = config.cycle.t2i2t
    if settings.mode == "reward":
        chain_policy(generator, settings.num_inference_steps, settings.eta)


def check_caption_scorer(config: Config) -> bool:
    """Whether the run scores re-captions (T2I2T reward cider_d), refusing it at start-up where this machine
    cannot: it needs pycocoevalcap (the [eval] extra) and Java (pycocoevalcap's PTB tokenizer)."""
    settings = config.cycle.t2i2t
    if settings.mode != "reward" or settings.reward != "cider_d":
        return False
    fallback = "or set cycle.t2i2t.reward=likelihood"
    try:
        require_package("pycocoevalcap")
    except ModuleNotFoundError:
        raise ConfigError(
            "cycle.t2i2t.reward=cider_d scores re-captions with pycocoevalcap, which is not installed: "
            f"pip install 'cycletune[eval]' ({fallback})"
        ) from None
    if shutil.which("java") is None:
        raise ConfigError(
            "cycle.t2i2t.reward=cider_d tokenizes captions with pycocoevalcap's PTB tokenizer, which runs "
            f"Java: install a Java runtime and put `java` on PATH ({fallback})"
        )
    return True


# A streamed source gives CIDEr-D's idf corpus only its first captions: reading it all would read every shard.
CIDER_CORPUS_STREAMED_CAPTIONS = 50_000


def build_caption_scorer(config: Config) -> CaptionScorer | None:
    """The T2I2T cider_d reward's scorer (None for the other rewards): CIDEr-D whose idf comes once from the
    training captions (data.paired and data.text_only, one document per caption), as self-critical sequence
    training takes it, so a chain's reward depends on its re-caption and caption alone (CorpusCider)."""
    if not check_caption_scorer(config):
        return None
    captions = [
        record.caption
        for role in ("paired", "text_only")
        for source in getattr(config.data, role)
        for record in load_records(
            [source],
            role,
            config.data.resolution,
            limit=CIDER_CORPUS_STREAMED_CAPTIONS if source.streamed() else None,
        )[0]
    ]
    logger.info("cycle.t2i2t.reward=cider_d: idf from %d training captions", len(captions))
    return CorpusCider(captions)


def build_encoder_cache(
    config: Config, generator: Generator, max_bytes: int = DEFAULT_MAX_BYTES, *, sharded: bool = False
) -> FrozenEncoderCache | None:
    """The frozen-encoder cache for generator.cache_frozen_encoders, each side only where reuse is exact.

    Text states change when the text encoder trains (train_mode full); image posteriors change when random
    augmentation (data.random_flip) alters the pixels, and a pixel-space generator has no VAE to skip.
    Under FSDP (`sharded`) it is off: each rank caches its own samples, and an encoder that runs on one rank
    (a miss) but not on another (a hit) would gather its shards on one rank alone, stalling every rank.
    """
    settings = config.generator
    if not settings.cache_frozen_encoders:
        return None
    if sharded:
        logger.info("encoder cache: off, FSDP shards the encoders (ranks must run them in step)")
        return None
    text_off = "the text encoder trains (generator.train_mode full)" if settings.train_mode == "full" else ""
    images_off = ""
    if config.data.random_flip:
        images_off = "data.random_flip augments the images"
    elif generator.vae is None:
        images_off = "the generator has no VAE (pixel space)"
    for side, off in (("text", text_off), ("images", images_off)):
        logger.info("encoder cache, %s side: %s", side, f"off, {off}" if off else "on")
    if text_off and images_off:
        return None
    return FrozenEncoderCache(text=not text_off, images=not images_off, max_bytes=max_bytes)


def _lora_kwargs(settings: ModelSettings) -> dict:
    lora = settings.lora
    return {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": lora.target_modules,
    }


def build_optimizer(
    module: torch.nn.Module, names: list[str], settings: OptimizerSettings
) -> torch.optim.AdamW:
    """AdamW over the named parameters; optimizer.fused picks torch's fused kernel (else torch's default,
    None, which keeps the param groups a checkpoint saves as they were before the key existed)."""
    wanted = set(names)
    params = [param for name, param in module.named_parameters() if name in wanted]
    if settings.fused:
        logger.info("%s optimizer: fused AdamW over %d tensors", type(module).__name__, len(params))
    return torch.optim.AdamW(
        params,
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
        fused=settings.fused or None,
    )


def phase_update_counts(schedule: list[Phase], max_train_steps: int) -> dict[str, int]:
    """How many optimizer updates each model gets: the schedule repeats until max_train_steps."""
    counts = {"captioner": 0, "generator": 0}
    for step in range(max_train_steps):
        counts[schedule[step % len(schedule)]] += 1
    return counts


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, settings: OptimizerSettings, num_updates: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Sized in this model's own updates; kept out of accelerator.prepare so it steps once per update."""
    return get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps,
        num_training_steps=max(num_updates, 1),
    )


def load_records(
    source_list: list[SourceSettings], role: str, resolution: int, limit: int | None = None
) -> tuple[list[Record], SkipLedger]:
    """Records of every source in a data role (the first `limit`), and the manifest rows the sources
    dropped reading them. A streaming source is read shard by shard only until the limit is reached.

    Unpaired roles keep only the side they use; each source also logs a summary of what it dropped.
    """
    records: list[Record] = []
    skips = SkipLedger()
    for settings in source_list:
        wanted = None if limit is None else limit - len(records)
        if wanted is not None and wanted <= 0:
            break
        source = SOURCE_TYPES[settings.type]
        if settings.streamed():
            loaded, source_skips = read_shards(source.shards(settings), wanted)
        else:
            loaded, source_skips = source.read(settings, resolution)
        logger.info("data.%s: %d records from a %s source", role, len(loaded), settings.type)
        records.extend(loaded[:wanted])
        skips.merge(source_skips)
    if role == "image_only":
        records = [dataclasses.replace(record, caption=None) for record in records]
    elif role == "text_only":
        records = [dataclasses.replace(record, image=None) for record in records]
    return records, skips


def _load_shards(
    source_list: list[SourceSettings], role: str, resolution: int
) -> tuple[ShardedSource, SkipLedger]:
    """A data role with a streaming source as one sharded source: the streaming sources' shards, and each
    in-memory source as one shard (read now, its dropped rows returned as load_records returns them)."""
    shards: list[Shard] = []
    skips = SkipLedger()
    for index, settings in enumerate(source_list):
        source = SOURCE_TYPES[settings.type]
        if settings.streamed():
            found = source.shards(settings)
            logger.info("data.%s: %d shards from a %s source", role, len(found), settings.type)
            shards.extend(found)
            continue
        loaded, source_skips = source.read(settings, resolution)
        logger.info("data.%s: %d records from a %s source", role, len(loaded), settings.type)
        skips.merge(source_skips)
        shards.append(
            Shard(f"data.{role}[{index}]:{settings.type}", InMemoryShard(SourceResult(loaded, SkipLedger())))
        )
    sides = {"images": role != "text_only", "captions": role != "image_only"}
    return ShardedSource(tuple(shards), **sides), skips


def _stream(
    records: list[Record] | ShardedSource, config: Config, role: str, rank: int, world_size: int
) -> Stream:
    data = config.data
    return Stream(
        records,
        batch_size=data.train_batch_size,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        resolution=data.resolution,
        center_crop=data.center_crop,
        random_flip=data.random_flip,
        num_workers=data.dataloader_num_workers,
        name=role,
    )


def build_streams(config: Config, rank: int, world_size: int) -> tuple[dict[str, Stream], SkipLedger]:
    """One resumable, rank-sharded stream per data role that has sources, and what the sources dropped.

    A role with a streaming source (settings.streamed()) reads shard by shard; the others in memory.
    The trainer's ledger starts from these build-time skips; batches then report records that fail to
    decode, and a sharded stream also the rows its shards drop, as its workers first read them.
    """
    streams = {}
    skips = SkipLedger()
    for role in ("paired", "image_only", "text_only"):
        source_list = getattr(config.data, role)
        if any(settings.streamed() for settings in source_list):
            records, role_skips = _load_shards(source_list, role, config.data.resolution)
        else:
            records, role_skips = load_records(source_list, role, config.data.resolution)
        skips.merge(role_skips)
        if records:
            streams[role] = _stream(records, config, role, rank, world_size)
    return streams, skips


def build_bridge(
    config: Config, captioner: Captioner, generator: Generator, device: torch.device
) -> GeneratorBridge | None:
    """The vocabulary bridge into each of the generator's text encoders, for the cycle modes that declare
    they need it (None when no chosen mode does)."""
    if not config.cycle.needs_bridge():
        return None
    bridge = GeneratorBridge.build(
        captioner.tokenizer,
        generator,
        end_token_id=captioner.spec.end_token_id(captioner.processor, captioner.model.config),
        source_vocab_size=captioner.vocab_size,
    )
    logger.info("vocabulary bridge coverage: %s", bridge.describe_coverage())
    return bridge.to(device)


def build_validation_batch(config: Config) -> dict:
    """A fixed batch for validation: the validation sources, or else the first paired records.

    Its "bad_records" also lists the rows the sources dropped, so everything skipped can reach the ledger.
    """
    role = "validation" if config.data.validation else "paired"
    records, skips = load_records(
        getattr(config.data, role), role, config.data.resolution, limit=config.train.num_validation_samples
    )
    count = len(records)
    batch_config = config.model_copy(deep=True)
    batch_config.data.train_batch_size = count
    batch_config.data.random_flip = False
    batch = _stream(records[:count], batch_config, role, rank=0, world_size=1).next()
    return {**batch, "bad_records": skips.entries() + batch["bad_records"]}
