"""Chooses which kind of batch each micro-batch is: paired, image-only or text-only.

A captioner-phase micro-batch is image-only with probability `image_only_ratio` (else paired); a
generator-phase micro-batch is text-only with probability `text_only_ratio`. The caller supplies the
uniform draw (from the loss randomness keyed by seed, update and micro-batch), so every rank makes the same
choice, computes the same terms, and a resumed run makes the choices of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

from cycletune.data.streams import Stream

UNPAIRED_KIND = {"captioner": "image_only", "generator": "text_only"}


class BatchMixer:
    def __init__(
        self, streams: dict[str, Stream], *, image_only_ratio: float, text_only_ratio: float
    ) -> None:
        if "paired" not in streams:
            raise ValueError("the mixer needs a paired stream")
        self.streams = streams
        self.ratios = {"image_only": image_only_ratio, "text_only": text_only_ratio}
        for kind, ratio in self.ratios.items():
            if ratio > 0 and kind not in streams:
                raise ValueError(
                    f"{kind} batches were asked for (ratio {ratio}) but there is no {kind} stream"
                )

    def kind(self, phase: str, draw: float) -> str:
        unpaired = UNPAIRED_KIND[phase]
        return unpaired if draw < self.ratios[unpaired] else "paired"

    def next(self, phase: str, draw: float) -> dict[str, Any]:
        """The next batch of the kind `draw` picks for `phase`, tagged with that kind."""
        kind = self.kind(phase, draw)
        return {**self.streams[kind].next(), "kind": kind}
