"""Model registry: every model builds/forwards/backprops; resnet surgery and pretrained loading; errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.models import (
    build_model,
    count_parameters,
    head_module_name,
    list_models,
    load_pretrained,
    model_summary,
)
from beton_trainer.models.resnet import BlurPoolConv2d

SHAPES = [(28, 28, 1), (32, 32, 3)]  # MNIST, CIFAR-10 (H, W, C)


def _forward_backward(model: nn.Module, shape: tuple[int, int, int], num_classes: int) -> None:
    h, w, c = shape
    x = torch.randn(4, c, h, w).contiguous(memory_format=torch.channels_last)
    logits = model(x)
    assert logits.shape == (4, num_classes)
    logits.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_registry_lists_all_models():
    assert list_models() == sorted(["mlp", "residual_mlp", "simple_cnn", "residual_cnn", "resnet18_cifar",
                                    "resnet34_cifar", "resnet18", "resnet50"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_forwards_and_backprops(name, shape):
    model = build_model(name, num_classes=7, image_shape=shape)
    _forward_backward(model, shape, 7)
    head = model.get_submodule(head_module_name(name))
    head_linear = head if isinstance(head, nn.Linear) else head[-1]
    assert head_linear.out_features == 7
    assert model_summary(model).startswith(f"{type(model).__name__}: {count_parameters(model):,} parameters")


@pytest.mark.parametrize("name,kwargs", [
    ("timm:test_resnet", {}),
    ("timm:test_vit", {"patch_size": 4}),
])
@pytest.mark.parametrize("shape", SHAPES)
def test_timm_models(name, kwargs, shape):
    model = build_model(name, num_classes=10, image_shape=shape, **kwargs)
    _forward_backward(model, shape, 10)
    assert model.get_submodule(head_module_name(name)).out_features == 10


def test_timm_vit_uses_image_size_and_kwargs():
    model = build_model("timm:vit_tiny_patch16_224", num_classes=10, image_shape=(32, 32, 3), patch_size=4)
    assert model.patch_embed.grid_size == (8, 8)
    assert model.pos_embed.shape[1] == 8 * 8 + 1  # patches + class token


def test_timm_errors():
    with pytest.raises(UserError, match="did you mean 'resnet10t'"):
        build_model("timm:resnet10", num_classes=10, image_shape=(32, 32, 3))
    with pytest.raises(UserError, match="bogus"):
        build_model("timm:test_resnet", num_classes=10, image_shape=(32, 32, 3), bogus=1)
    with pytest.raises(UserError, match="28x28x1"):  # 32x downsampling + 2x2 conv cannot run on 28x28
        build_model("timm:convnext_atto", num_classes=10, image_shape=(28, 28, 1))


def test_mlp_options_shape_the_network():
    model = build_model("mlp", num_classes=10, image_shape=(28, 28, 1), hidden_size=64, depth=3, activation="gelu")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 64), (64, 64), (64, 10)]
    assert sum(isinstance(m, nn.GELU) for m in model.modules()) == 3
    linear = build_model("mlp", num_classes=10, image_shape=(32, 32, 3), depth=0)
    assert count_parameters(linear) == 32 * 32 * 3 * 10 + 10


def test_residual_mlp_blocks_are_residual():
    model = build_model("residual_mlp", num_classes=10, image_shape=(28, 28, 1), hidden_size=32, depth=2)
    block = model.body[2]
    for p in block.branch.parameters():
        nn.init.zeros_(p)
    x = torch.randn(3, 32)
    assert torch.equal(block(x), x)


def test_teacher_and_student_sizes():
    """The lab seed's CIFAR-10 teacher (~500K) and student (~50K), as documented in models/cnn.py."""
    teacher = build_model("residual_cnn", num_classes=10, image_shape=(32, 32, 3))
    student = build_model("simple_cnn", num_classes=10, image_shape=(32, 32, 3))
    assert abs(count_parameters(teacher) - 500_000) <= 0.15 * 500_000
    assert abs(count_parameters(student) - 50_000) <= 0.15 * 50_000
    explicit = build_model("residual_cnn", num_classes=10, image_shape=(32, 32, 3),
                           stages=3, width=28, blocks_per_stage=2)
    assert count_parameters(explicit) == count_parameters(teacher)


def test_cnn_stages_and_widths():
    model = build_model("residual_cnn", num_classes=10, image_shape=(32, 32, 3), stages=4, width=8)
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert [b.conv2.out_channels for b in blocks] == [8, 8, 16, 16, 32, 32, 64, 64]
    assert [b.downsample is not None for b in blocks] == [False, False, True, False, True, False, True, False]
    assert model.features(torch.randn(1, 3, 32, 32)).shape == (1, 64, 4, 4)
    simple = build_model("simple_cnn", num_classes=10, image_shape=(28, 28, 1), stages=2, pooling="avg",
                         batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in simple.modules())
    assert simple.features(torch.randn(1, 1, 28, 28)).shape == (1, 48, 14, 14)


def test_image_too_small_for_stages():
    with pytest.raises(UserError, match="too small for 5 stages.*model.args.stages"):
        build_model("simple_cnn", num_classes=10, image_shape=(28, 28, 1), stages=5)
    build_model("simple_cnn", num_classes=10, image_shape=(32, 32, 3), stages=5)


def _cifar_like_torchvision(arch: str, num_classes: int, channels: int) -> nn.Module:
    """A plain torchvision resnet with the same surgery the registry documents."""
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, num_classes))
    return model


def test_resnet34_cifar_layers_and_state_dict():
    model = build_model("resnet34_cifar", num_classes=10, image_shape=(32, 32, 3))
    assert type(model) is torchvision.models.ResNet
    conv = model.conv1
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.bias) == (
        3, 64, (3, 3), (1, 1), (1, 1), None)
    assert isinstance(model.maxpool, nn.Identity)
    dropout, linear = model.fc
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.2
    assert (linear.in_features, linear.out_features) == (512, 10)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    plain = _cifar_like_torchvision("resnet34", 10, 3)
    plain.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    plain.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), plain(x))


def test_resnet_pretrained_from_path(tmp_path):
    source = torchvision.models.resnet34()
    path = tmp_path / "resnet34.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet34_cifar", num_classes=10, image_shape=(28, 28, 1), pretrained=str(path))
    file_state = torch.load(path, weights_only=True)
    own = model.state_dict()
    for key, value in file_state.items():
        if key in ("conv1.weight", "fc.weight", "fc.bias"):
            continue
        assert torch.equal(own[key], value), key
    assert own["conv1.weight"].shape == (64, 1, 3, 3)

    fresh = build_model("resnet34_cifar", num_classes=10, image_shape=(28, 28, 1))
    report = load_pretrained(fresh, path, "resnet34")
    assert report.skipped == ["conv1.weight", "fc.bias", "fc.weight"]
    assert report.loaded == len(file_state) - 3
    assert "loaded" in str(report) and "conv1.weight" in str(report)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def test_resnet_pretrained_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty weights cache
    monkeypatch.setattr(torch.hub, "urlopen", _offline)  # offline even where there is a network
    with pytest.raises(UserError, match=r"could not download ImageNet weights for resnet34 \(offline\?\).*"
                                        r"model.pretrained=PATH"):
        build_model("resnet34_cifar", num_classes=10, image_shape=(32, 32, 3), pretrained=True)

    wrong_arch = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), wrong_arch)
    with pytest.raises(UserError, match="do not fit resnet34.*layer1.2"):
        build_model("resnet34_cifar", num_classes=10, image_shape=(32, 32, 3), pretrained=str(wrong_arch))

    with pytest.raises(UserError, match="not found"):
        build_model("resnet18_cifar", num_classes=10, image_shape=(32, 32, 3), pretrained=str(tmp_path / "no.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not read"):
        build_model("resnet18_cifar", num_classes=10, image_shape=(32, 32, 3), pretrained=str(garbage))
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(UserError, match="does not hold a state dict"):
        build_model("resnet18_cifar", num_classes=10, image_shape=(32, 32, 3), pretrained=str(not_a_dict))


def test_unknown_name_and_kwargs():
    with pytest.raises(UserError, match=r"unknown model 'resnet34_cifr' \(did you mean 'resnet34_cifar'\?\).*mlp"):
        build_model("resnet34_cifr", num_classes=10, image_shape=(32, 32, 3))
    with pytest.raises(UserError, match=r"'model.args.hiden_size' \(did you mean 'hidden_size'\?\).*depth"):
        build_model("mlp", num_classes=10, image_shape=(32, 32, 3), hiden_size=10)
    with pytest.raises(UserError, match="'model.args.activation' must be one of"):
        build_model("mlp", num_classes=10, image_shape=(32, 32, 3), activation="swish")
    with pytest.raises(UserError, match="'model.args.dropout' must be <= 1"):
        build_model("resnet18_cifar", num_classes=10, image_shape=(32, 32, 3), dropout=1.5)
    with pytest.raises(UserError, match="image shape"):
        build_model("mlp", num_classes=10, image_shape=(32, 32))
    with pytest.raises(UserError, match="did you mean 'residual_cnn'"):
        head_module_name("residual_cn")


@pytest.mark.parametrize("arch, blocks", [("resnet18", [2, 2, 2, 2]), ("resnet50", [3, 4, 6, 3])])
def test_imagenet_resnets_are_torchvision_layout(arch, blocks):
    model = build_model(arch, num_classes=2, image_shape=(224, 224, 3))
    conv = model.conv1
    assert (conv.in_channels, conv.kernel_size, conv.stride, conv.padding) == (3, (7, 7), (2, 2), (3, 3))
    assert isinstance(model.maxpool, nn.MaxPool2d) and model.fc.out_features == 2
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == blocks
    plain = getattr(torchvision.models, arch)(num_classes=2)
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 128)  # any size: the head pools globally
    assert torch.equal(model.eval()(x), plain.eval()(x))


def test_blurpool_blurs_before_strided_convs_only():
    """ffcv-imagenet's rule: every conv with stride > 1 and >= 16 input channels (not the stem) gets the 3x3
    binomial blur; the state dict keeps torchvision's keys, so the weights load either way."""
    model = build_model("resnet18", num_classes=10, image_shape=(64, 64, 3), blurpool=True)
    blurred = sorted(n for n, m in model.named_modules() if isinstance(m, BlurPoolConv2d))
    assert blurred == ["layer2.0.conv1", "layer2.0.downsample.0", "layer3.0.conv1", "layer3.0.downsample.0",
                       "layer4.0.conv1", "layer4.0.downsample.0"]
    assert not isinstance(model.conv1, BlurPoolConv2d)
    plain = build_model("resnet18", num_classes=10, image_shape=(64, 64, 3))
    assert model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(model.state_dict())
    # the blurred conv = the plain conv applied to the input smoothed by [1 2 1]^T [1 2 1] / 16 (zero padded)
    conv = model.layer2[0].conv1
    x = torch.randn(1, 64, 9, 9)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    w = torch.tensor([1.0, 2.0, 1.0])
    smooth = sum(w[i] * w[j] * padded[:, :, i:i + 9, j:j + 9] for i in range(3) for j in range(3)) / 16
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(smooth, conv.weight, stride=2, padding=1))
    _forward_backward(model, (64, 64, 3), 10)


def test_imagenet_resnet_pretrained_from_path_and_grey_input(tmp_path):
    path = tmp_path / "resnet18.pth"
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", num_classes=2, image_shape=(224, 224, 3), pretrained=str(path), blurpool=True)
    own = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key  # the stem too: it has 3 channels here
    grey = build_model("resnet18", num_classes=2, image_shape=(28, 28, 1), pretrained=str(path))
    report = load_pretrained(grey, path, "resnet18")
    assert report.skipped == ["conv1.weight", "fc.bias", "fc.weight"]
    with pytest.raises(UserError, match="do not fit resnet50"):
        build_model("resnet50", num_classes=2, image_shape=(224, 224, 3), pretrained=str(path))


def test_compiled_model_compiles_each_resolution_at_most_once():
    """Progressive resizing under torch.compile (default dynamic=None): the first side compiles a static
    graph, the first change recompiles once with dynamic height/width, and that graph serves every later
    side, training or evaluation, so no side is compiled twice and the recompile limit is never reached."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = build_model("resnet18", num_classes=10, image_shape=(64, 64, 3), blurpool=True)
    compiled = torch.compile(model, backend=counter)
    compiles = []
    for side in (64, 64, 96, 128, 96, 64, 128):
        compiled(torch.randn(2, 3, side, side))
        compiles.append(counter.frame_count)
    assert compiles == [1, 1, 2, 2, 2, 2, 2]
    torch._dynamo.reset()
