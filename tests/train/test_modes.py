"""The mode policy on the trainer's models: the trained model trains (gradient checkpointing recomputes from
the first update), and the frozen partner's loss is a function of its inputs and draws even with LoRA dropout."""

from __future__ import annotations

import pytest
import torch
from cycle_runs import tiny_config

from cycletune.losses.phases import captioner_phase, generator_phase
from cycletune.models.lora import frozen
from cycletune.models.randomness import DrawKey
from cycletune.train.builders import build_bridge, build_captioner, build_generator

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center"]


def _pixels() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("phase", ["captioner", "generator"])
def test_partner_phase_loss_is_identical_across_calls_with_lora_dropout(tiny_models, phase: str) -> None:
    config = tiny_config(
        tiny_models,
        "captioner.lora.dropout=0.1",
        "generator.lora.dropout=0.1",
        "cycle.i2t2i.mode=soft",
        "cycle.t2i2t.mode=one_step",
    )
    captioner, captioner_names = build_captioner(config.captioner)
    generator, generator_names = build_generator(config.generator)
    bridge = build_bridge(config, captioner, generator, "cpu")
    captioner.train()
    generator.train()
    trained, partner, partner_names, function, term = (
        (captioner, generator, generator_names, captioner_phase, "i2t2i_soft")
        if phase == "captioner"
        else (generator, captioner, captioner_names, generator_phase, "t2i2t_one_step")
    )
    # The trained model's adapters are as at the first update (LoRA B = 0), so its own dropout cannot change
    # its output; the partner's carry values (as after its own updates), so its dropout would change the loss.
    params = dict(partner.named_parameters())
    with torch.no_grad():
        for name in partner_names:
            params[name].normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    batch = {"kind": "paired", "ids": ["a", "b"], "captions": CAPTIONS, "pixels": _pixels()}

    def cycle_loss() -> torch.Tensor:
        with frozen(partner):
            output = trained(
                lambda model: function(
                    model, partner=partner, batch=batch, config=config, key=DrawKey(0, 0), bridge=bridge
                )
            )
        return output.terms[term].detach()

    assert torch.equal(cycle_loss(), cycle_loss())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_captioner_checkpointing_recomputes_from_the_first_update(tiny_models, checkpointing: bool) -> None:
    config = tiny_config(tiny_models, f"captioner.gradient_checkpointing={str(checkpointing).lower()}")
    captioner, _ = build_captioner(config.captioner)  # as built: the trainer's first update sees it so
    layer = captioner.model.get_base_model().text_decoder.bert.encoder.layer[0]
    calls = []
    # Hooked inside the layer: transformers checkpoints a layer's forward, not its __call__, so hooks on the
    # layer itself stay outside the recomputation.
    hook = layer.intermediate.register_forward_hook(lambda *_: calls.append(None))
    captioner.caption_loss(_pixels(), **captioner.tokenize(CAPTIONS)).sum().backward()
    hook.remove()
    assert len(calls) == (2 if checkpointing else 1)
