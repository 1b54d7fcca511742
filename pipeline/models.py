"""Model registry: `create_model(name, num_classes, in_channels, image_size, **options)`.

Registered names:
- `cnn` (default): VGG-style conv-bn-relu blocks, one block per entry of `widths`, 2x2 max pool
  after each block while the feature map is larger than 1x1; global average pool; linear head.
  Channel-prunable (every conv is followed by its own batch norm).
- `resnet`: CIFAR-style ResNet (He et al. 2016, section 4.2), depth 6n+2, stage widths
  `widths[:3]` (16, 32, 64 in the paper).
- `lenet`: the PyTorch CIFAR tutorial's net (conv 6 -> conv 16 -> fc 120 -> fc 84), generalised
  to any channel count and image size (5x5 convs are padded when the input is small).
- `mlp`: the tutorial's fully connected net, hidden sizes `hidden`.
- `torchvision:<name>`: any torchvision classification model, weights=None; inputs with other
  than 3 channels are repeated / mixed to 3 by a 1x1 conv in front.

Every builder takes the same options (`widths`, `depth`, `hidden`, `dropout`) and ignores the
ones it does not use, so `params.yaml`'s `model` section maps straight onto it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def decorator(builder):
        _REGISTRY[name] = builder
        return builder

    return decorator


def available_models() -> list[str]:
    return sorted(_REGISTRY) + ["torchvision:<name>"]


def check_model_name(name: str) -> None:
    """Raise ConfigError (key `model.name`) for a name the registry cannot build."""
    if name in _REGISTRY:
        return
    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.split(":", 1)[1]
        if tv_name in torchvision.models.list_models(module=torchvision.models):
            return
        raise ConfigError(
            f"model.name: got {name!r}; {tv_name!r} is not a torchvision classification model"
        )
    raise ConfigError(f"model.name: got {name!r}; expected one of {', '.join(available_models())}")


def create_model(
    name: str, num_classes: int, in_channels: int, image_size: int, **options
) -> nn.Module:
    """Build a registered classifier.

    Args:
        name: a registered name (`cnn`, `resnet`, `lenet`, `mlp`) or `torchvision:<name>`.
        num_classes: number of output logits.
        in_channels: 1 (grayscale) or 3 (RGB), any positive count works.
        image_size: input height = width in pixels.
        **options: `widths`, `depth`, `hidden`, `dropout` (unused ones are ignored).

    Returns:
        An `nn.Module` on the CPU mapping (N, in_channels, image_size, image_size) to
        (N, num_classes) logits.

    Raises:
        ConfigError: unknown name, or a torchvision model that cannot take this image size.

    Example:
        >>> create_model("cnn", 10, 1, 8, widths=(16, 32)).eval()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    check_model_name(name)
    if name.startswith("torchvision:"):
        check_model_fits(name, in_channels, image_size)
        return _torchvision_model(name.split(":", 1)[1], num_classes, in_channels)
    return _REGISTRY[name](num_classes, in_channels, image_size, **options)


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CNN(nn.Module):
    def __init__(self, num_classes, in_channels, image_size, widths, dropout=0.0):
        super().__init__()
        layers, size, c_in = [], image_size, in_channels
        for width in widths:
            layers.append(conv_bn_relu(c_in, width))
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


@register("cnn")
def _cnn(num_classes, in_channels, image_size, widths=(32, 64, 128), dropout=0.0, **_):
    return CNN(num_classes, in_channels, image_size, tuple(widths), dropout)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_classes, in_channels, depth, widths):
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        self.stem = conv_bn_relu(in_channels, widths[0])
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(BasicBlock(c_in, width, stride))
                c_in = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.layers(self.stem(x))).flatten(1))


@register("resnet")
def _resnet(num_classes, in_channels, image_size, depth=8, widths=(16, 32, 64), **_):
    widths = tuple(widths)[:3]
    if (depth - 2) % 6 or depth < 8:
        raise ConfigError(f"model.depth: got {depth}; expected 6n+2 (8, 14, 20, 32, ...)")
    return ResNet(num_classes, in_channels, depth, widths)


class LeNet(nn.Module):
    """The PyTorch CIFAR tutorial's Net, for any input channels and size."""

    def __init__(self, num_classes, in_channels, image_size):
        super().__init__()
        # The tutorial's unpadded 5x5 convs need >= 16 px; pad them for smaller inputs.
        pad = 0 if image_size >= 16 else 2
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad)
        self.pool = nn.MaxPool2d(2)
        with torch.no_grad():
            n_flat = self._features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc1 = nn.Linear(n_flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.classifier = nn.Linear(84, num_classes)

    def _features(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        if x.shape[-1] >= 2:
            x = self.pool(x)
        return x.flatten(1)

    def forward(self, x):
        x = torch.relu(self.fc1(self._features(x)))
        return self.classifier(torch.relu(self.fc2(x)))


@register("lenet")
def _lenet(num_classes, in_channels, image_size, **_):
    return LeNet(num_classes, in_channels, image_size)


class MLP(nn.Module):
    def __init__(self, num_classes, n_inputs, hidden, dropout=0.0):
        super().__init__()
        layers, width = [nn.Flatten()], n_inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.body(x))


@register("mlp")
def _mlp(num_classes, in_channels, image_size, hidden=(256, 128), dropout=0.0, **_):
    return MLP(num_classes, in_channels * image_size * image_size, tuple(hidden), dropout)


class ChannelAdapter(nn.Module):
    """Maps `in_channels` inputs to the 3 a torchvision model expects (1x1 conv)."""

    def __init__(self, in_channels: int, body: nn.Module):
        super().__init__()
        self.adapt = nn.Conv2d(in_channels, 3, 1)
        self.body = body

    def forward(self, x):
        return self.body(self.adapt(x))


# Builder options that make a torchvision model return plain logits when training (their
# auxiliary heads return a tuple the loss cannot take) and keep today's initialisation quietly.
_TORCHVISION_OPTIONS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def _torchvision_model(tv_name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    options = _TORCHVISION_OPTIONS.get(tv_name, {})
    body = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **options)
    return body if in_channels == 3 else ChannelAdapter(in_channels, body)


@functools.cache
def check_model_fits(name: str, in_channels: int, image_size: int) -> None:
    """Raise ConfigError (key `model.name`) when a `torchvision:<name>` model cannot take
    `in_channels` x `image_size` x `image_size` images (ViTs need 224 px, Inception 75 px, ...):
    a forward pass on one zero image, once per shape, instead of a traceback mid-training. It
    runs on the meta device (shapes only: milliseconds, no memory), on the CPU for the few
    models the meta device cannot run; the random state is left as it was. The registered
    models take any size from 4 px."""
    if not name.startswith("torchvision:"):
        return
    try:
        _dry_forward(name.split(":", 1)[1], in_channels, image_size, "meta")
    except NotImplementedError:  # an op without a meta kernel
        try:
            _dry_forward(name.split(":", 1)[1], in_channels, image_size, "cpu")
        except Exception as err:
            raise _does_not_fit(name, in_channels, image_size, err) from None
    except Exception as err:  # torchvision raises AssertionError, RuntimeError, ValueError
        raise _does_not_fit(name, in_channels, image_size, err) from None


def _dry_forward(tv_name: str, in_channels: int, image_size: int, device: str) -> None:
    with torch.random.fork_rng(devices=[]), torch.device(device), torch.no_grad():
        model = _torchvision_model(tv_name, 2, in_channels).eval()
        model(torch.zeros(1, in_channels, image_size, image_size))


def _does_not_fit(name: str, in_channels: int, image_size: int, err: Exception) -> ConfigError:
    reason = " ".join(str(err).split())[:160] or type(err).__name__
    return ConfigError(
        f"model.name: got {name!r}; it cannot take {in_channels}x{image_size}x{image_size} "
        f"images ({reason}); choose another model or image size"
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
