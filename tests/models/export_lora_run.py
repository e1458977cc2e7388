"""Export LoRA-trained tiny models in a fresh process: `python tests/models/export_lora_run.py CAPTIONER
GENERATOR OUT`.

test_lora runs it under different PYTHONHASHSEED values and compares the files byte for byte: Python's string
hashes (and so set order) change between processes, which one process cannot show.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.lora import (
    add_captioner_lora,
    add_generator_lora,
    prepare_trainable,
    save_captioner_adapter,
    save_generator_lora,
    save_merged_captioner,
    save_merged_generator,
)

# A list (peft keeps it as a set), so the adapter config has a set whose order hashing could decide.
CAPTIONER_TARGETS = ["query", "key", "value", "dense"]


def main(captioner_path: str, generator_path: str, out: Path) -> None:
    torch.manual_seed(0)
    captioner = Captioner.from_pretrained(captioner_path)
    add_captioner_lora(captioner, rank=4, alpha=8.0, target_modules=CAPTIONER_TARGETS)
    generator = Generator.from_pretrained(generator_path)
    add_generator_lora(generator, rank=4, alpha=8.0)
    with torch.no_grad():
        for module in (captioner, generator):
            params = dict(module.named_parameters())
            for name in prepare_trainable(module, train_mode="lora"):
                params[name].add_(0.1 * torch.randn(params[name].shape))
    save_captioner_adapter(captioner, out / "captioner_adapter")
    save_merged_captioner(captioner, out / "captioner_merged")
    save_generator_lora(generator, out / "generator_lora", kohya=True)
    save_merged_generator(generator, out / "generator_merged")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
