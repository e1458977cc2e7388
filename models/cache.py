"""Reuse the frozen text encoder's and VAE encoder's outputs across epochs instead of recomputing them.

In LoRA training only the denoiser changes, so a caption's text-encoder states and an image's VAE posterior are
the same every time the sample comes back. The cache keeps:

- text: the text encoders' conditioning per caption text (caption dropout's "" is one shared entry);
- images: the VAE posterior's mean and std per sample id. The latent is still sampled afresh every step as
  mean + std * vae_noise, with the caller's noise, so training is unchanged in distribution.

Entries live on the CPU in the encoder's dtype, under one byte budget (`max_bytes`, DEFAULT_MAX_BYTES per
process). Once it is spent new entries are no longer stored (first come, kept): with the uniformly shuffled
epochs of training every policy gets the same hit rate (budget / data size), and keeping costs nothing where
evicting would copy every miss to the CPU for an entry gone before it comes back.

Each entry is computed alone (a batch of one), so its value never depends on which batch it first appeared
in: runs with the cache stay bit-for-bit reproducible across resumes and process counts. (Batched VAE
convolutions round differently from single-image ones, by about 1e-7, so a cached batch matches an uncached
one to that precision and a single-image step matches it exactly.)

An image entry also records a fingerprint of the pixels it was computed from: if a sample id comes back with
different pixels (two sources naming files alike), the entry is recomputed, never silently reused.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from cycletune.models.device_transfer import to_device

logger = logging.getLogger(__name__)

# Per process. SD 1.5 at 512 px in bf16 needs ~64 KiB per image and ~115 KiB per caption: 4 GiB hold about
# 60k images or 35k captions (COCO Karpathy train has 113k images, 566k captions).
DEFAULT_MAX_BYTES = 4 * 2**30
# A summary line every this many cached batches.
LOG_EVERY_BATCHES = 1000
_FINGERPRINT_SEED = 20240601
_FINGERPRINT_PROJECTIONS = 4


@dataclass(frozen=True)
class _ImageEntry:
    mean: torch.Tensor
    std: torch.Tensor
    fingerprint: torch.Tensor


def _nbytes(entry: torch.Tensor | _ImageEntry) -> int:
    tensors = (entry.mean, entry.std, entry.fingerprint) if isinstance(entry, _ImageEntry) else (entry,)
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class EncodingModel(Protocol):
    """What the cache calls on the model it serves (models/generator.py's Generator, which holds the cache
    as `encoder_cache`): named here so that this module does not import the generator's."""

    @property
    def text_encoders(self) -> list[torch.nn.Module]: ...

    @property
    def vae(self) -> torch.nn.Module | None: ...

    @property
    def device(self) -> torch.device: ...

    def tokenize(self, captions: list[str]) -> torch.Tensor: ...

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def latent_distribution(self, pixels01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def latents_from_distribution(
        self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor: ...


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A compact CPU copy (a posterior's mean is a view of a twice-larger tensor; don't keep that alive)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


class FrozenEncoderCache:
    """Text-encoder states by caption and VAE posteriors by sample id, for a generator whose encoders are frozen.

    `text` and `images` say which sides are valid to cache; the generator (Generator.encode_captions,
    Generator.data_latents) asks the cache only for those and computes the other side itself.
    """

    def __init__(self, *, text: bool, images: bool, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.text = text
        self.images = images
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self.counts: Counter[str] = Counter()
        self._text_states: dict[str, torch.Tensor] = {}
        self._image_entries: dict[str, _ImageEntry] = {}
        # Per image shape and device: kept where the pixels are, so no step copies them (25 MB at 512 px).
        self._projections: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self._warned_full = False
        self._warned_stale = False

    @property
    def text_entries(self) -> int:
        return len(self._text_states)

    @property
    def image_entries(self) -> int:
        return len(self._image_entries)

    def text_states(self, generator: EncodingModel, captions: Sequence[str]) -> torch.Tensor:
        """encode_text(tokenize(captions)) [B, T, D], each caption's states computed once and then reused."""
        if any(param.requires_grad for encoder in generator.text_encoders for param in encoder.parameters()):
            raise ValueError(
                "the encoder cache's text side is on but the text encoder trains (generator.train_mode "
                "'full'?): its outputs change every update; build the cache with text=False"
            )
        rows, device = [], generator.device
        for caption in captions:
            states = self._text_states.get(caption)
            if states is None:
                self.counts["text_misses"] += 1
                states = generator.encode_text(generator.tokenize([caption]))[0]
                self._store(self._text_states, caption, _cpu_copy(states))
            else:
                self.counts["text_hits"] += 1
            rows.append(to_device(states, device))
        self._count_batch()
        return torch.stack(rows)

    def image_latents(
        self,
        generator: EncodingModel,
        pixels01: torch.Tensor,
        ids: Sequence[str],
        vae_noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """encode_images(pixels01, vae_noise) without a graph, the VAE posterior of each id computed once."""
        if generator.vae is None:
            raise ValueError("the encoder cache's image side needs a VAE; a pixel-space generator has none")
        if len(ids) != pixels01.shape[0]:
            raise ValueError(f"{pixels01.shape[0]} images need as many ids, got {len(ids)}")
        fingerprints = self._fingerprints(pixels01)
        means, stds, device = [], [], generator.device
        for row, sample_id in enumerate(ids):
            entry = self._image_entries.get(sample_id)
            if entry is not None and not torch.allclose(entry.fingerprint, fingerprints[row], rtol=1e-9):
                self.counts["image_stale"] += 1
                self._warn_stale(sample_id)
                self._drop(self._image_entries, sample_id)
                entry = None
            if entry is None:
                self.counts["image_misses"] += 1
                with torch.no_grad():
                    mean, std = generator.latent_distribution(pixels01[row : row + 1])
                mean, std = mean[0], std[0]
                stored = _ImageEntry(_cpu_copy(mean), _cpu_copy(std), fingerprints[row].clone())
                self._store(self._image_entries, sample_id, stored)
            else:
                self.counts["image_hits"] += 1
                mean, std = to_device(entry.mean, device), to_device(entry.std, device)
            means.append(mean)
            stds.append(std)
        self._count_batch()
        return generator.latents_from_distribution(torch.stack(means), torch.stack(stds), vae_noise)

    def stats(self) -> dict[str, float]:
        """Hit and miss counts per side, entries, and bytes used: for logs and benchmarks."""
        summary: dict[str, float] = {
            name: self.counts[name]
            for name in (
                "text_hits",
                "text_misses",
                "image_hits",
                "image_misses",
                "image_stale",
                "not_stored",
            )
        }
        for side in ("text", "image"):
            looked_up = summary[f"{side}_hits"] + summary[f"{side}_misses"]
            summary[f"{side}_hit_rate"] = summary[f"{side}_hits"] / looked_up if looked_up else 0.0
        summary |= {
            "text_entries": self.text_entries,
            "image_entries": self.image_entries,
            "bytes_used": self.bytes_used,
            "max_bytes": self.max_bytes,
        }
        return summary

    def summary_line(self) -> str:
        stats = self.stats()
        return (
            f"encoder cache: text {stats['text_hit_rate']:.1%} hits ({self.text_entries} captions), images "
            f"{stats['image_hit_rate']:.1%} hits ({self.image_entries} ids), "
            f"{self.bytes_used / 2**20:.1f} of {self.max_bytes / 2**20:.0f} MiB"
        )

    def _store(self, table: dict, key: str, entry: torch.Tensor | _ImageEntry) -> None:
        size = _nbytes(entry)
        if self.bytes_used + size > self.max_bytes:
            self.counts["not_stored"] += 1
            if not self._warned_full:
                self._warned_full = True
                logger.warning(
                    "encoder cache reached its cap of %.0f MiB (%d captions, %d image ids); new entries are "
                    "computed every time from now on",
                    self.max_bytes / 2**20,
                    self.text_entries,
                    self.image_entries,
                )
            return
        table[key] = entry
        self.bytes_used += size

    def _drop(self, table: dict, key: str) -> None:
        self.bytes_used -= _nbytes(table.pop(key))

    def _count_batch(self) -> None:
        self.counts["batches"] += 1
        if self.counts["batches"] % LOG_EVERY_BATCHES == 0:
            logger.info(self.summary_line())

    def _fingerprints(self, pixels01: torch.Tensor) -> torch.Tensor:
        """[B, P] fixed random projections of each image (float64): equal for equal pixels, and a flip,
        crop or different picture changes them."""
        place = (tuple(pixels01.shape[1:]), pixels01.device)
        if place not in self._projections:
            generator = torch.Generator().manual_seed(_FINGERPRINT_SEED)
            size = pixels01[0].numel()
            projections = torch.randn(size, _FINGERPRINT_PROJECTIONS, generator=generator).double()
            self._projections[place] = projections.to(pixels01.device)
        projections = self._projections[place]
        # The one wait of a cached step: hits and misses are decided on the host.
        with torch.no_grad():
            return (pixels01.detach().flatten(1).double() @ projections).cpu()

    def _warn_stale(self, sample_id: str) -> None:
        if not self._warned_stale:
            self._warned_stale = True
            logger.warning(
                "encoder cache: sample id %r came back with different pixels (ids shared by two sources, or "
                "augmented images?); such entries are recomputed",
                sample_id,
            )
