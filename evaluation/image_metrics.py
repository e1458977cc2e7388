"""Image metrics for reconstructions (I2T2I) and generations (T2I): set statistics and pairwise similarities.

FID and KID compare the feature distributions of reference and generated images (torchmetrics computes them);
CLIP-I and DINO similarity, LPIPS, PSNR and SSIM compare each generated image with its own reference. Images are
float [B, 3, H, W] tensors in [0, 1] ("pixels01"), given in paired batches so large sets stream through.
The networks behind FID, KID, CLIP-I, DINO and LPIPS load only from local paths the user names.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cycletune.evaluation.availability import (
    MetricResult,
    PathLike,
    check_metric_names,
    load_clip_tower,
    option_path,
    prepare,
    require_package,
)
from cycletune.models.hub_kernels import WITHOUT_HUB_KERNELS

IMAGE_METRICS = ("fid", "kid", "clip_image_similarity", "dino_similarity", "lpips", "psnr", "ssim")

FeatureNetwork = Callable[[Tensor], Tensor]
"""Any image encoder: pixels01 [N, 3, H, W] -> features [N, D] (an nn.Module or a plain function)."""
PairScore = Callable[[Tensor, Tensor], Tensor]
"""Two pixels01 batches [B, 3, H, W] -> one score per pair [B]; usable directly for reranking."""

_LPIPS_TORCHVISION_WEIGHTS = {
    "alex": "AlexNet_Weights",
    "vgg": "VGG16_Weights",
    "squeeze": "SqueezeNet1_1_Weights",
}


@dataclass(frozen=True)
class ImageMetricOptions:
    """Where the weight-needing image metrics find their networks; each path field is option evaluation.<field>.

    fid_feature_network (Python only) replaces the Inception file with any encoder returning [N, D] features.
    """

    fid_feature_weights: PathLike | None = None
    fid_feature_network: FeatureNetwork | None = None
    fid_inception_dim: int = 2048
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    clip_image_encoder: PathLike | FeatureNetwork | None = None
    dino_image_encoder: PathLike | FeatureNetwork | None = None
    lpips_backbone_weights: PathLike | None = None
    lpips_net: str = "alex"
    device: str | torch.device = "cpu"


def image_metrics(
    pairs: Iterable[tuple[Tensor, Tensor]],
    options: ImageMetricOptions = ImageMetricOptions(),
    metrics: Sequence[str] = IMAGE_METRICS,
) -> dict[str, MetricResult]:
    """Stream (reference, generated) pixels01 batches once through every requested metric.

    Pairwise metrics are averaged over all pairs; KID adds "kid_std" (spread over its random subsets).
    Metrics whose weights are not given come back skipped, naming the option to set.
    """
    names = check_metric_names(metrics, IMAGE_METRICS)
    builders = _accumulator_builders(options)
    accumulators, skipped = prepare(names, lambda name: builders[name]())
    distinct = list({id(accumulator): accumulator for accumulator in accumulators.values()}.values())
    pair_count = 0
    for batch_index, (references, generated) in enumerate(pairs):
        _check_pair_batch(batch_index, references, generated)
        pair_count += len(references)
        for accumulator in distinct:
            accumulator.update(references, generated)
    if pair_count == 0:
        raise ValueError("no image pairs were given")
    ordered: dict[str, MetricResult] = {}
    for name in names:
        if name in skipped:
            ordered[name] = skipped[name]
        else:
            values = accumulators[name].results(name)
            ordered.update({key: MetricResult(key, value) for key, value in values.items()})
    return ordered


def psnr(references: Tensor, generated: Tensor) -> Tensor:
    """Per-pair PSNR in dB for pixels01 (data range 1); identical images give inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_same_size("psnr", references, generated)
    return peak_signal_noise_ratio(generated, references, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(references: Tensor, generated: Tensor) -> Tensor:
    """Per-pair SSIM (11x11 Gaussian window, data range 1); identical images give 1."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_same_size("ssim", references, generated)
    return structural_similarity_index_measure(generated, references, data_range=1.0, reduction="none")


def frechet_distance(reference_features: Tensor, generated_features: Tensor) -> float:
    """FID between two feature sets [N, D], computed by torchmetrics so values match its FID."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if min(len(reference_features), len(generated_features)) < 2:
        raise ValueError("FID needs at least 2 reference and 2 generated images")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(reference_features.shape[1]))
    metric.update(reference_features, real=True)
    metric.update(generated_features, real=False)
    return float(metric.compute())


def kernel_distance(
    reference_features: Tensor,
    generated_features: Tensor,
    *,
    subset_size: int = 1000,
    subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID mean and std over random subsets, by torchmetrics; the subset shrinks to the smaller set's size.

    torchmetrics refuses sets smaller than subset_size (1000 by default), which every small evaluation is.
    The subsets are drawn from a seeded generator so a rerun gives the same value and training randomness
    is untouched.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    fitted_size = min(subset_size, len(reference_features), len(generated_features))
    if fitted_size < 2:
        raise ValueError("KID needs at least 2 reference and 2 generated images")
    with warnings.catch_warnings():  # its "features are kept in memory" notice: they are, by design, here too
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_GivenFeatures(reference_features.shape[1]), subsets=subsets, subset_size=fitted_size
        )
    metric.update(reference_features, real=True)
    metric.update(generated_features, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def load_inception_features(
    weights: PathLike, dim: int = 2048, device: str | torch.device = "cpu"
) -> nn.Module:
    """torch-fidelity's FID Inception-v3 (via torchmetrics) read from a local file, taking pixels01.

    Resizing follows torch-fidelity (TF1-style bilinear, no antialias) so values compare with the reference
    FID; pixels are rounded to uint8 as the network expects, which keeps images that came from 8-bit files exact.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    inception = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(dim)],
        feature_extractor_weights_path=str(weights),
        antialias=False,
    )
    return _Pixels01ToUint8(inception).to(device)


def load_image_encoder(folder: PathLike, device: str | torch.device = "cpu") -> FeatureNetwork:
    """A Hugging Face vision encoder from a local folder, with its own image processor.

    CLIP folders (a whole CLIPModel or a CLIPVisionModelWithProjection) give the projected image embedding
    CLIP-I uses; any other AutoModel backbone (DINO, DINOv2, ViT) gives the CLS token of its last hidden
    state, DINO's image embedding (its pooler is often absent from checkpoints and would be random).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

    folder = Path(folder)
    if not (folder / "preprocessor_config.json").exists():
        raise FileNotFoundError(
            f"{folder}: no preprocessor_config.json; save the encoder's image processor there too"
        )
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    if config.model_type == "clip":
        model = load_clip_tower(CLIPVisionModelWithProjection, folder, config)
    elif config.model_type == "clip_vision_model":
        model = CLIPVisionModelWithProjection.from_pretrained(
            folder, local_files_only=True, **WITHOUT_HUB_KERNELS
        )
    else:
        model = AutoModel.from_pretrained(folder, local_files_only=True, **WITHOUT_HUB_KERNELS)
    model = model.to(device).eval()

    @torch.no_grad()
    def encode(pixels01: Tensor) -> Tensor:
        inputs = processor(images=pixels01, return_tensors="pt", do_rescale=False).to(device)
        output = model(pixel_values=inputs.pixel_values)
        return output.image_embeds if hasattr(output, "image_embeds") else output.last_hidden_state[:, 0]

    return encode


def embedding_similarity(encoder: FeatureNetwork) -> PairScore:
    """Cosine similarity of each pair's embeddings (CLIP-I, DINO); 1 - value is the paper's CLIP distance."""

    @torch.no_grad()
    def similarity(references: Tensor, generated: Tensor) -> Tensor:
        return F.cosine_similarity(encoder(references), encoder(generated), dim=-1)

    return similarity


def load_lpips(
    backbone_weights: PathLike | None = None, net: str = "alex", device: str | torch.device = "cpu"
) -> nn.Module:
    """LPIPS with its calibrated linear heads (shipped inside the lpips package) and a local ImageNet backbone.

    The backbone is built random (pnet_rand=True, so torchvision never downloads) and then filled from
    `backbone_weights`, torchvision's ImageNet state dict for `net`; when unset, the file torchvision itself
    would have cached under $TORCH_HOME/hub/checkpoints is used if present. Otherwise MetricUnavailable.
    """
    import lpips

    if net not in _LPIPS_TORCHVISION_WEIGHTS:
        raise ValueError(
            f"evaluation.lpips_net={net!r}: expected one of {sorted(_LPIPS_TORCHVISION_WEIGHTS)}"
        )
    weights_file = _lpips_backbone_file(backbone_weights, net)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    _load_backbone(model.net, weights_file)
    return model.requires_grad_(False).eval().to(device)


def lpips_distance(model: nn.Module) -> PairScore:
    """Per-pair LPIPS distance of pixels01 batches (0 for identical images), e.g. to rerank reconstructions."""

    @torch.no_grad()
    def distance(references: Tensor, generated: Tensor) -> Tensor:
        _check_same_size("lpips", references, generated)
        device = next(model.parameters()).device
        return model(references.to(device), generated.to(device), normalize=True).flatten()

    return distance


class _Accumulator(Protocol):
    def update(self, references: Tensor, generated: Tensor) -> None: ...

    def results(self, name: str) -> dict[str, float]: ...


class _PairMean:
    """Mean of a per-pair score over every pair seen."""

    def __init__(self, score: PairScore) -> None:
        self.score = score
        self.total = 0.0
        self.count = 0

    def update(self, references: Tensor, generated: Tensor) -> None:
        scores = self.score(references, generated)
        self.total += float(scores.double().sum())
        self.count += scores.numel()

    def results(self, name: str) -> dict[str, float]:
        return {name: self.total / self.count}


class _SetFeatures:
    """Features of all reference and generated images, extracted once for both FID and KID."""

    def __init__(self, network: FeatureNetwork, options: ImageMetricOptions) -> None:
        self.network = network
        self.options = options
        self.reference: list[Tensor] = []
        self.generated: list[Tensor] = []

    def update(self, references: Tensor, generated: Tensor) -> None:
        self.reference.append(self._features(references))
        self.generated.append(self._features(generated))

    def results(self, name: str) -> dict[str, float]:
        reference, generated = torch.cat(self.reference), torch.cat(self.generated)
        if name == "fid":
            return {"fid": frechet_distance(reference, generated)}
        mean, std = kernel_distance(
            reference, generated, subset_size=self.options.kid_subset_size, subsets=self.options.kid_subsets
        )
        return {"kid": mean, "kid_std": std}

    @torch.no_grad()
    def _features(self, pixels01: Tensor) -> Tensor:
        features = self.network(pixels01.to(self.options.device))
        if features.ndim != 2 or features.shape[0] != pixels01.shape[0]:
            raise ValueError(
                f"the FID/KID feature network must return [N, D] features; got {tuple(features.shape)} "
                f"for {pixels01.shape[0]} images"
            )
        return features.double().cpu()


class _GivenFeatures(nn.Module):
    """Hands already-extracted features to torchmetrics, which then only computes the statistics."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class _Pixels01ToUint8(nn.Module):
    """Feeds pixels01 to a network that takes uint8 images."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, pixels01: Tensor) -> Tensor:
        return self.network((pixels01 * 255).round().clamp(0, 255).to(torch.uint8))


def _accumulator_builders(options: ImageMetricOptions) -> dict[str, Callable[[], _Accumulator]]:
    """How to build each metric; FID and KID share one feature collector, built at most once."""
    set_features = functools.cache(lambda: _SetFeatures(_fid_network(options), options))

    def with_package(package: str, build: Callable[[], _Accumulator]) -> Callable[[], _Accumulator]:
        def checked() -> _Accumulator:
            require_package(package)
            return build()

        return checked

    return {
        "fid": with_package("torchmetrics", set_features),
        "kid": with_package("torchmetrics", set_features),
        "clip_image_similarity": lambda: _PairMean(
            embedding_similarity(_image_encoder(options, "clip_image_encoder"))
        ),
        "dino_similarity": lambda: _PairMean(
            embedding_similarity(_image_encoder(options, "dino_image_encoder"))
        ),
        "lpips": with_package(
            "lpips",
            lambda: _PairMean(
                lpips_distance(load_lpips(options.lpips_backbone_weights, options.lpips_net, options.device))
            ),
        ),
        "psnr": with_package("torchmetrics", lambda: _PairMean(psnr)),
        "ssim": with_package("torchmetrics", lambda: _PairMean(ssim)),
    }


def _fid_network(options: ImageMetricOptions) -> FeatureNetwork:
    if options.fid_feature_network is not None:
        if options.fid_feature_weights is not None:
            raise ValueError("give evaluation.fid_feature_weights or fid_feature_network, not both")
        return options.fid_feature_network
    weights = option_path(
        "evaluation.fid_feature_weights",
        options.fid_feature_weights,
        "a local Inception-v3 weights file in torch-fidelity's format "
        "(weights-inception-2015-12-05-6726825d.pth), or pass fid_feature_network",
    )
    return load_inception_features(weights, options.fid_inception_dim, options.device)


_ENCODER_WANTED = {
    "clip_image_encoder": "a local CLIP folder (e.g. openai/clip-vit-base-patch32 with its preprocessor_config.json)",
    "dino_image_encoder": "a local DINO folder (e.g. facebook/dino-vitb8 with its preprocessor_config.json)",
}


def _image_encoder(options: ImageMetricOptions, field: str) -> FeatureNetwork:
    """The encoder passed in, or the one loaded from the folder that option evaluation.<field> names."""
    source = getattr(options, field)
    if callable(source):
        return source
    wanted = f"{_ENCODER_WANTED[field]}, or pass an image encoder"
    return load_image_encoder(option_path(f"evaluation.{field}", source, wanted), options.device)


def _lpips_backbone_file(backbone_weights: PathLike | None, net: str) -> Path:
    """The explicit backbone file, else torchvision's own cached download if one exists."""
    import torchvision

    weights_enum = getattr(torchvision.models, _LPIPS_TORCHVISION_WEIGHTS[net]).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name
    if backbone_weights is None and cached.exists():
        return cached
    return option_path(
        "evaluation.lpips_backbone_weights",
        backbone_weights,
        f"torchvision's ImageNet {net} state dict ({cached.name}), or put that file at {cached}",
    )


def _load_backbone(backbone: nn.Module, weights_file: Path) -> None:
    """Fill lpips' backbone slices (slice<k>.<i>.*) from torchvision's feature layers (features.<i>.*)."""
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    renamed = {}
    for name in backbone.state_dict():
        source = "features." + name.split(".", 1)[1]
        if source not in state:
            raise ValueError(
                f"{weights_file}: no {source!r}; expected a torchvision ImageNet state dict for LPIPS"
            )
        renamed[name] = state[source]
    try:
        backbone.load_state_dict(renamed)
    except RuntimeError as error:
        raise ValueError(f"{weights_file}: does not fit the LPIPS backbone ({error})") from error


def _check_pair_batch(batch_index: int, references: Tensor, generated: Tensor) -> None:
    for side, pixels in (("reference", references), ("generated", generated)):
        if not isinstance(pixels, Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(f"batch {batch_index}: {side} images must be a [B, 3, H, W] tensor, got {shape}")
        if not pixels.is_floating_point() or pixels.min() < -1e-3 or pixels.max() > 1 + 1e-3:
            raise ValueError(
                f"batch {batch_index}: {side} images must be float pixels in [0, 1], got {pixels.dtype} "
                f"in [{float(pixels.min()):.3g}, {float(pixels.max()):.3g}]"
            )
    if len(references) != len(generated):
        raise ValueError(
            f"batch {batch_index}: {len(references)} reference but {len(generated)} generated images"
        )


def _check_same_size(metric: str, references: Tensor, generated: Tensor) -> None:
    if references.shape != generated.shape:
        raise ValueError(
            f"{metric} compares pixels, so each pair must have the same shape; got reference "
            f"{tuple(references.shape)} and generated {tuple(generated.shape)} (resize one side first)"
        )
