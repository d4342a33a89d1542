"""Factories for the image checkpoints: MTCNN's three stages (facenet-pytorch) and LPIPS heads."""

import types

from _bare import bare_package, import_bare, stub
from torch import nn


def _mtcnn(stage: str) -> nn.Module:
    bare_package("facenet_pytorch.models.utils")
    # box decoding and cropping (torchvision.ops, PIL): not part of the networks
    stub("facenet_pytorch.models.utils.detect_face", detect_face=None, extract_face=None)
    return getattr(import_bare("facenet_pytorch.models.mtcnn"), stage)(pretrained=False)


def pnet() -> nn.Module:
    """MTCNN proposal net: fully convolutional, PReLU, (box regression, face softmax)."""
    return _mtcnn("PNet")


def rnet() -> nn.Module:
    """MTCNN refine net on 24×24 crops."""
    return _mtcnn("RNet")


def onet() -> nn.Module:
    """MTCNN output net on 48×48 crops (box, landmarks, face softmax)."""
    return _mtcnn("ONet")


def _features(layout: list) -> nn.Sequential:
    """torchvision's AlexNet/VGG16 ``features`` layout, rebuilt so no torchvision is needed."""
    layers, channels = [], 3
    for item in layout:
        if isinstance(item, int):  # max-pool kernel size, stride 2
            layers.append(nn.MaxPool2d(kernel_size=item, stride=2))
            continue
        out, kernel, stride, pad = item
        layers += [nn.Conv2d(channels, out, kernel, stride, pad), nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers)


def _alex() -> list:
    """AlexNet: (out, kernel, stride, padding) convolutions; an int is a max-pool kernel."""
    return [(64, 11, 4, 2), 3, (192, 5, 1, 2), 3, (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), 3]


def _vgg16() -> list:
    widths = [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0]
    return [(width, 3, 1, 1) if width else 2 for width in widths]


def _trunk(layout):
    return lambda *args, **kwargs: types.SimpleNamespace(features=_features(layout()))


class LpipsHead(nn.Module):
    """LPIPS whose parameters are the shipped 'lin' layers (the file's five keys).

    The ImageNet trunk is not in the wheel (torchvision downloads it), so it is random and frozen,
    kept outside the state_dict so the 1×1-conv head loads strictly.
    """

    def __init__(self, net: str) -> None:
        super().__init__()
        stub("torchvision", models=types.SimpleNamespace(alexnet=_trunk(_alex), vgg16=_trunk(_vgg16)))
        import lpips

        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        for index, lin in enumerate(model.lins):
            setattr(self, f"lin{index}", lin)
        self.__dict__["lpips"] = model

    def forward(self, image0, image1):
        return self.lpips(image0, image1)


def lpips_alex() -> nn.Module:
    return LpipsHead("alex")


def lpips_vgg() -> nn.Module:
    return LpipsHead("vgg")
