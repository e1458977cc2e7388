"""The soft-caption path into every generator family: a one-hot caption through the bridge gives exactly the
conditioning the family's own tokenizers and encoders give the caption (SDXL's two CLIPs and the second one's
pooled output read at the eos; SD3's two CLIPs and T5; Flux's pooled CLIP and T5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.generator_bridge import GeneratorBridge
from cycletune.models.generators import SPECS
from cycletune.models.tiny import TINY_GENERATORS

# Words of the tiny vocabulary, captions of different lengths so one is padded.
CAPTIONS = ["a red circle on the left of a blue square", "a small green triangle"]


@pytest.fixture(scope="module", params=[spec.name for spec in SPECS])
def family_generator(request, tmp_path_factory) -> Generator:
    folder = TINY_GENERATORS[request.param](
        tmp_path_factory.mktemp(request.param) / "generator", resolution=16
    )
    return Generator.from_pretrained(str(folder)).requires_grad_(False)


def _soft_caption(captioner: Captioner, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot rows of the captions from the prefix's last slot on (the start slot), as the soft modes pass them."""
    tokens = captioner.tokenize(captions)
    ids, mask = captioner.caption_part(tokens["input_ids"]), captioner.caption_part(tokens["attention_mask"])
    return F.one_hot(ids, captioner.vocab_size).float(), mask


def test_one_hot_soft_caption_conditions_exactly_as_the_caption(
    frozen_captioner: Captioner, family_generator: Generator
) -> None:
    """Also: gradient reaches every valid caption position (the start slot becomes bos, or is dropped)."""
    bridge = GeneratorBridge.build(
        frozen_captioner.tokenizer, family_generator, source_vocab_size=frozen_captioner.vocab_size
    )
    probs, mask = _soft_caption(frozen_captioner, CAPTIONS)
    assert not mask.all()
    probs.requires_grad_(True)
    soft = bridge.encode(family_generator, probs, mask)
    hard = family_generator.encode_text(family_generator.tokenize(CAPTIONS))
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-6)
    assert bridge.mass_coverage(probs, mask) == 1.0
    soft.square().sum().backward()
    reached = probs.grad.abs().sum(dim=-1) > 0
    assert torch.equal(reached[:, 1:], mask[:, 1:].bool())
