"""Evaluation tests: no socket may open (a metric that reaches for a download fails loudly), tiny local encoders."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to connect anywhere raises, so 'never downloads' is checked by every test here."""

    def refuse_lookup(host: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"evaluation code tried to look up the network host {host!r}")

    def refuse_connection(self: socket.socket, address: object) -> None:
        raise AssertionError(f"evaluation code tried to connect to {address!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_connection)


@pytest.fixture(scope="session")
def tiny_clip_folder(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random whole CLIP checkpoint (text and vision) with its image processor and tokenizer, as on the hub.

    The sub-configs keep the default projection size (512) while the model projects to 16, as in checkpoints
    where only the top-level config carries projection_dim: loaders must take the top-level one.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.generator / "tokenizer")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    for file in (tiny_models.generator / "tokenizer").iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def tiny_dino_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ViT without a pooler (as DINO checkpoints are) and its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny_dino")
    config = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
