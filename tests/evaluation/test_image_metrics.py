"""Image metrics with tiny random networks standing in for Inception, CLIP, DINO and the LPIPS backbone."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from cycletune.evaluation.image_metrics import (
    ImageMetricOptions,
    embedding_similarity,
    image_metrics,
    kernel_distance,
    load_image_encoder,
    load_lpips,
    lpips_distance,
    psnr,
    ssim,
)


def _pixels(count: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _batches(
    references: torch.Tensor, generated: torch.Tensor, size: int = 10
) -> list[tuple[torch.Tensor, ...]]:
    """Uneven batches (10, 10, 4 for 24 pairs), so averaging over batches of different sizes is exercised."""
    return list(zip(references.split(size), generated.split(size), strict=True))


class CountingFeatures(nn.Module):
    """A fixed random conv net ([N, 3, H, W] -> [N, 8]) that counts the images it has seen."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        ).eval()
        self.images_seen = 0

    def forward(self, pixels01: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(pixels01)
        return self.layers(pixels01)


def test_fid_and_kid_are_zero_for_a_set_against_itself_and_positive_for_a_shifted_set() -> None:
    references = _pixels(24, seed=1)
    shifted = references * 0.5 + 0.5
    network = CountingFeatures()
    options = ImageMetricOptions(fid_feature_network=network)
    itself = image_metrics(_batches(references, references), options, metrics=["fid", "kid"])
    assert network.images_seen == 48, "FID and KID must share one feature pass"
    moved = image_metrics(_batches(references, shifted), options, metrics=["fid", "kid"])
    assert list(itself) == ["fid", "kid", "kid_std"]
    assert abs(itself["fid"].value) < 1e-6
    assert moved["fid"].value > 1e-3
    assert abs(itself["kid"].value) < 0.01 * moved["kid"].value
    assert moved["kid_std"].value >= 0


def test_kid_adapts_its_subset_to_small_sets_and_is_reproducible() -> None:
    """torchmetrics refuses sets below its 1000-image subset; the subset shrinks, draws stay seeded and local."""
    first, second = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64) + 1
    rng_before = torch.get_rng_state()
    once = kernel_distance(first, second, subset_size=1000, subsets=20)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert kernel_distance(first, second, subset_size=1000, subsets=20) == once
    assert once[0] > 0 and once[1] > 0, "subsets of 6 from 9 generated features differ, so KID varies"
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(first[:1], second)


def test_fid_from_an_inception_weights_file(tmp_path: Path) -> None:
    """The Inception path: torch-fidelity's network read from a local file (random weights here), uint8 input."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        """Builds torch-fidelity's layers and keeps their random init, only to write a weights file."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    torch.save({}, tmp_path / "empty.pth")
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(RandomInception("random", ["64"], str(tmp_path / "empty.pth")).state_dict(), weights)

    references = _pixels(4, seed=2)
    options = ImageMetricOptions(fid_feature_weights=weights, fid_inception_dim=64)
    itself = image_metrics([(references, references)], options, metrics=["fid"])
    moved = image_metrics([(references, references * 0.5)], options, metrics=["fid"])
    assert abs(itself["fid"].value) < 1e-3 * moved["fid"].value


@pytest.fixture(scope="module")
def alexnet_backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's AlexNet layout with random weights (the feature layers, all LPIPS reads)."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features
    path = tmp_path_factory.mktemp("lpips") / "alexnet_random.pth"
    torch.save({f"features.{name}": value for name, value in features.state_dict().items()}, path)
    return path


def test_lpips_is_zero_for_identical_images_and_positive_otherwise(alexnet_backbone_file: Path) -> None:
    distance = lpips_distance(load_lpips(alexnet_backbone_file))
    references, others = _pixels(3, seed=3, size=64), _pixels(3, seed=4, size=64)
    assert distance(references, references).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-7)
    different = distance(references, others)
    assert different.shape == (3,) and bool((different > 0).all())
    options = ImageMetricOptions(lpips_backbone_weights=alexnet_backbone_file)
    mean = image_metrics(_batches(references, others, size=2), options, metrics=["lpips"])["lpips"].value
    assert mean == pytest.approx(float(different.mean()), rel=1e-5)


def test_lpips_finds_the_backbone_torchvision_cached(
    alexnet_backbone_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(alexnet_backbone_file, checkpoints / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    images, others = _pixels(2, seed=5, size=64), _pixels(2, seed=6, size=64)
    cached = lpips_distance(load_lpips())(images, others)
    explicit = lpips_distance(load_lpips(alexnet_backbone_file))(images, others)
    assert torch.equal(cached, explicit)


def test_lpips_rejects_a_file_that_is_not_a_torchvision_backbone(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pth: no 'features\.0\.weight'"):
        load_lpips(wrong)
    with pytest.raises(FileNotFoundError, match=r"evaluation\.lpips_backbone_weights"):
        load_lpips(tmp_path / "missing.pth")


def test_psnr_and_ssim_known_values() -> None:
    gray = torch.full((3, 3, 32, 32), 0.5)
    checkerboard = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2 - 1  # +-1
    noisy = gray + 0.1 * checkerboard  # mean squared error exactly 0.01
    assert psnr(gray, gray).tolist() == [math.inf] * 3
    assert psnr(gray, noisy).tolist() == pytest.approx([20.0] * 3, rel=1e-5)
    assert ssim(gray, gray).tolist() == pytest.approx([1.0] * 3)
    # Constant images have no variance, so SSIM is its luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1).
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
    assert ssim(gray, torch.full_like(gray, 0.6)).tolist() == pytest.approx([expected] * 3, rel=1e-5)


def test_pair_metrics_average_over_all_pairs_of_uneven_batches() -> None:
    gray = torch.full((4, 3, 32, 32), 0.5)
    checkerboard = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2 - 1
    noise = torch.tensor([0.1, 0.1, 0.1, 0.01])[:, None, None, None] * checkerboard  # 20, 20, 20 and 40 dB
    results = image_metrics(
        [(gray[:3], gray[:3] + noise[:3]), (gray[3:], gray[3:] + noise[3:])], metrics=["psnr"]
    )
    assert results["psnr"].value == pytest.approx(25.0, rel=1e-5)


def test_clip_image_similarity_uses_the_projected_embedding_of_a_whole_clip_checkpoint(
    tiny_clip_folder,
) -> None:
    from transformers import CLIPImageProcessor, CLIPModel

    images, others = _pixels(3, seed=7, size=40), _pixels(3, seed=8, size=40)
    encoder = load_image_encoder(tiny_clip_folder)
    clip = CLIPModel.from_pretrained(tiny_clip_folder).eval()
    pixel_values = CLIPImageProcessor.from_pretrained(tiny_clip_folder)(
        images=images, return_tensors="pt", do_rescale=False
    ).pixel_values
    with torch.no_grad():
        expected = clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output)
    assert torch.allclose(encoder(images), expected, atol=1e-5)
    similarity = embedding_similarity(encoder)
    assert similarity(images, images).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    assert bool((similarity(images, others) < 1 - 1e-4).all())


def test_dino_similarity_uses_the_cls_token(tiny_dino_folder) -> None:
    from transformers import ViTImageProcessor, ViTModel

    images = _pixels(2, seed=9)
    vit = ViTModel.from_pretrained(tiny_dino_folder, add_pooling_layer=False).eval()
    pixel_values = ViTImageProcessor.from_pretrained(tiny_dino_folder)(
        images=images, return_tensors="pt", do_rescale=False
    ).pixel_values
    with torch.no_grad():
        expected = vit(pixel_values=pixel_values).last_hidden_state[:, 0]
    assert torch.allclose(load_image_encoder(tiny_dino_folder)(images), expected, atol=1e-5)


def test_image_metrics_take_encoder_folders_or_callables(tiny_clip_folder, tiny_dino_folder) -> None:
    images, others = _pixels(4, seed=10), _pixels(4, seed=11)
    options = ImageMetricOptions(clip_image_encoder=tiny_clip_folder, dino_image_encoder=tiny_dino_folder)
    metrics = ["clip_image_similarity", "dino_similarity"]
    itself = image_metrics(_batches(images, images, size=3), options, metrics)
    assert [result.value for result in itself.values()] == pytest.approx([1.0, 1.0], abs=1e-5)
    flattened = ImageMetricOptions(clip_image_encoder=lambda pixels: pixels.flatten(1))
    direct = image_metrics([(images, others)], flattened, ["clip_image_similarity"])["clip_image_similarity"]
    expected = torch.nn.functional.cosine_similarity(images.flatten(1), others.flatten(1)).mean()
    assert direct.value == pytest.approx(float(expected), rel=1e-5)


def test_bad_images_are_named(tmp_path: Path) -> None:
    images = _pixels(2, seed=12)
    with pytest.raises(ValueError, match=r"batch 1: generated images must be float pixels in \[0, 1\]"):
        image_metrics([(images, images), (images, images * 2 - 1)], metrics=["psnr"])
    with pytest.raises(ValueError, match=r"batch 0: reference images must be a \[B, 3, H, W\] tensor"):
        image_metrics([(images[:, :1], images)], metrics=["psnr"])
    with pytest.raises(ValueError, match="psnr compares pixels"):
        image_metrics([(images, _pixels(2, seed=13, size=16))], metrics=["psnr"])
    with pytest.raises(ValueError, match="not both"):
        image_metrics(
            [(images, images)],
            ImageMetricOptions(fid_feature_weights="x.pth", fid_feature_network=CountingFeatures()),
            ["fid"],
        )
    with pytest.raises(FileNotFoundError, match=r"no preprocessor_config\.json"):
        load_image_encoder(tmp_path)
