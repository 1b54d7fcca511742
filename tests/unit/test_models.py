import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.models import available_models, count_params, create_model

MODELS = ["cnn", "resnet", "lenet", "mlp", "torchvision:resnet18"]
SHAPES = [(1, 8), (3, 32)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_forward_backward_every_model_both_shapes(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size)
    x = torch.randn(4, channels, size, size)
    logits = model(x)
    assert logits.shape == (4, 7)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(4) % 7)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_cnn_widths_and_resnet_depth_change_the_model():
    small = create_model("cnn", 10, 1, 8, widths=(8, 16))
    large = create_model("cnn", 10, 1, 8, widths=(32, 64, 128))
    assert count_params(small) < count_params(large)
    convs = [m for m in large.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    r8 = create_model("resnet", 10, 3, 32, depth=8)
    r20 = create_model("resnet", 10, 3, 32, depth=20)
    assert count_params(r20) > 2 * count_params(r8)


def test_unknown_model_names_the_key():
    with pytest.raises(ConfigError, match="model.name: got 'vit-huge'"):
        create_model("vit-huge", 10, 3, 32)
    assert "cnn" in available_models()
