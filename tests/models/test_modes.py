"""Module-mode helpers on the tiny captioner with LoRA: frozen() and eval_mode() put every submodule in eval
and restore each one's exact previous mode (and requires_grad) on exit, errors included."""

from __future__ import annotations

import pytest
import torch

from cycletune.models.captioner import Captioner
from cycletune.models.lora import add_captioner_lora, frozen, prepare_trainable
from cycletune.models.modes import eval_mode, module_modes


def _mixed_mode_captioner(tiny_models) -> Captioner:
    """Train mode except the vision encoder and one LoRA dropout: module.train() alone would not restore it."""
    captioner = Captioner.from_pretrained(str(tiny_models.captioner))
    add_captioner_lora(captioner, rank=4, alpha=8.0, dropout=0.1)
    prepare_trainable(captioner, train_mode="lora")
    captioner.train()
    captioner.model.get_base_model().vision_model.eval()
    next(module for name, module in captioner.named_modules() if name.endswith("lora_dropout.default")).eval()
    return captioner


def _requires_grad(module: torch.nn.Module) -> list[bool]:
    return [param.requires_grad for param in module.parameters()]


@pytest.mark.parametrize("context", [frozen, eval_mode])
def test_contexts_switch_every_submodule_to_eval_and_restore_a_mixed_state_exactly(
    tiny_models, context
) -> None:
    captioner = _mixed_mode_captioner(tiny_models)
    modes, requires_grad = module_modes(captioner), _requires_grad(captioner)
    assert len(set(modes.values())) == 2, "the state under test must mix train and eval"
    with pytest.raises(RuntimeError, match="inside"), context(captioner):
        assert not any(module.training for module in captioner.modules())
        if context is frozen:
            assert not any(_requires_grad(captioner))
        else:
            assert _requires_grad(captioner) == requires_grad
        raise RuntimeError("inside")
    assert module_modes(captioner) == modes
    assert _requires_grad(captioner) == requires_grad


def test_frozen_lora_dropout_is_off_so_the_partner_is_deterministic(tiny_models) -> None:
    captioner = _mixed_mode_captioner(tiny_models).train()
    with torch.no_grad():
        for name, param in captioner.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would hide the dropout on the adapter path
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    pixels01 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = captioner.tokenize(["a red circle", "a big blue square"])

    def loss() -> torch.Tensor:
        return captioner.caption_loss(pixels01, **tokens)

    assert not torch.equal(loss(), loss()), "LoRA dropout should be active in train mode"
    with frozen(captioner):
        assert torch.equal(loss(), loss())
