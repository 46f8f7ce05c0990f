"""The ResNet family: shapes, gradients, exact sizes, torchvision checkpoint compatibility and the paper's options."""
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from common.errors import ConfigError
from trainer.models import MODEL_NAMES, ModelConfig, build_model
from trainer.models.blurpool import BlurPoolConv2d
from trainer.models.resnet import BasicBlock, Bottleneck, ZeroPadShortcut

IMAGENET_NETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
CIFAR_NETS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
# Exact counts with option A and 10 classes, and the sizes the paper's CIFAR-10 table gives (millions, as printed).
CIFAR_PARAMS = {
    "resnet20": (269_722, "0.27"),
    "resnet32": (464_154, "0.46"),
    "resnet44": (658_586, "0.66"),
    "resnet56": (853_018, "0.85"),
    "resnet110": (1_727_962, "1.7"),
}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks(model: nn.Module) -> list:
    return [block for stage in model.stages() for block in stage]


def input_for(name: str) -> torch.Tensor:
    side = 32 if name.replace("plain", "resnet") in CIFAR_NETS else 64
    return torch.randn(2, 3, side, side)


def test_names_cover_the_family():
    plain = [n.replace("resnet", "plain") for n in IMAGENET_NETS + CIFAR_NETS]
    assert sorted(MODEL_NAMES) == sorted(IMAGENET_NETS + CIFAR_NETS + plain)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(input_for(name))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "plain18", "resnet20", "plain20", "resnet56", "plain56"])
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5).train()
    loss = nn.functional.cross_entropy(model(input_for(name)), torch.tensor([1, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", IMAGENET_NETS)
def test_size_and_keys_equal_torchvision(name):
    with torch.device("meta"):
        ours = build_model(name)
        theirs = getattr(torchvision.models, name)(weights=None)
    assert count(ours) == TORCHVISION_PARAMS[name]
    assert count(theirs) == TORCHVISION_PARAMS[name]
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in theirs.state_dict().items()}


def randomized_state(model: nn.Module) -> dict:
    """Random values everywhere, BN statistics included, so a swapped or misplaced tensor changes the output."""
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif key.endswith(("running_mean", "bias")) or (value.is_floating_point() and value.dim() == 1):
            value.normal_(0, 0.1)
        elif value.is_floating_point():
            value.normal_(0, 0.5 / value[0].numel() ** 0.5)
    return state


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_checkpoints_load_both_ways_with_bitwise_equal_outputs(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)

    theirs = getattr(torchvision.models, name)(weights=None)
    ours = build_model(name)
    ours.load_state_dict(randomized_state(theirs), strict=True)
    with torch.no_grad():
        expected = theirs.eval()(x)
        assert torch.equal(ours.eval()(x), expected)
    assert expected.std() > 0.01  # the nets compute something, not a constant that trivially matches

    ours = build_model(name)
    theirs = getattr(torchvision.models, name)(weights=None)
    theirs.load_state_dict(randomized_state(ours), strict=True)
    with torch.no_grad():
        assert torch.equal(theirs.eval()(x), ours.eval()(x))


@pytest.mark.parametrize("name", CIFAR_NETS)
def test_cifar_sizes_match_the_paper(name):
    exact, paper_millions = CIFAR_PARAMS[name]
    n = count(build_model(name, num_classes=10))
    assert n == exact
    decimals = len(paper_millions.split(".")[1])
    assert f"{n / 1e6:.{decimals}f}" == paper_millions


@pytest.mark.parametrize("name, shortcut",
                         [("resnet18", "A"), ("resnet50", "A"), ("resnet20", None), ("resnet110", None)])
def test_option_a_adds_no_parameters_over_plain(name, shortcut):
    with torch.device("meta"):
        residual = build_model(name, shortcut=shortcut)
        plain = build_model(name.replace("resnet", "plain"))
    assert count(residual) == count(plain)
    assert residual.state_dict().keys() == plain.state_dict().keys()
    assert any(isinstance(block.downsample, ZeroPadShortcut) for block in blocks(residual))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20"])
def test_option_c_projects_every_shortcut(name):
    with torch.device("meta"):
        b = build_model(name, shortcut="B")
        c = build_model(name, shortcut="C")
    assert count(c) > count(b)
    assert all(isinstance(block.downsample, nn.Sequential) for block in blocks(c))
    # B projects only where the shape changes, and there its keys are C's keys.
    projections = 4 if "50" in name else 3 if "18" in name else 2
    assert sum(isinstance(block.downsample, nn.Sequential) for block in blocks(b)) == projections
    assert set(b.state_dict()) < set(c.state_dict())


def test_option_a_pads_zeros_and_subsamples():
    torch.manual_seed(0)
    block = build_model("resnet20", num_classes=10, zero_init_residual=True).layer2[0].eval()
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        out = block(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, :16], torch.relu(x[:, :, ::2, ::2]))
    assert torch.equal(out[:, 16:], torch.zeros(2, 16, 16, 16))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_starts_every_block_at_its_shortcut(name):
    torch.manual_seed(0)
    model = build_model(name, zero_init_residual=True).eval()
    last_bn = "bn3" if name == "resnet50" else "bn2"
    zeroed = {k for k, v in model.state_dict().items() if k.endswith(f"{last_bn}.weight") and not v.any()}
    assert zeroed == {k for k in model.state_dict() if k.endswith(f"{last_bn}.weight")}
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)(weights=None, zero_init_residual=True)
    assert zeroed == {k for k in theirs.state_dict() if k.endswith(f"{last_bn}.weight")}

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for block in blocks(model):
            shortcut = h if block.downsample is None else block.downsample(h)
            out = block(h)
            assert torch.equal(out, torch.relu(shortcut))
            h = out


@pytest.mark.parametrize("name", ["plain18", "plain50", "plain20"])
def test_plain_blocks_do_not_add_their_input(name):
    torch.manual_seed(0)
    plain = build_model(name).eval()
    residual = build_model(name.replace("plain", "resnet")).eval()
    assert all(block.downsample is None for block in blocks(plain))
    x = torch.randn(2, plain.layer1[0].conv1.in_channels, 16, 16)
    for model in (plain, residual):
        last_bn = model.layer1[1].last_bn()
        nn.init.zeros_(last_bn.weight)
        nn.init.zeros_(last_bn.bias)
    with torch.no_grad():
        inner = plain.layer1[0](x)
        # With the residual branch silenced, only an added input can make the output nonzero.
        assert torch.equal(plain.layer1[1](inner), torch.zeros_like(inner))
        inner = residual.layer1[0](x)
        assert torch.equal(residual.layer1[1](inner), torch.relu(inner))


def test_stride_in_1x1_moves_the_stride():
    v15 = build_model("resnet50")
    v1 = build_model("resnet50", stride_in_1x1=True)
    for stage in ("layer2", "layer3", "layer4"):
        assert getattr(v15, stage)[0].conv1.stride == (1, 1) and getattr(v15, stage)[0].conv2.stride == (2, 2)
        assert getattr(v1, stage)[0].conv1.stride == (2, 2) and getattr(v1, stage)[0].conv2.stride == (1, 1)
        assert getattr(v1, stage)[0].downsample[0].stride == (2, 2)
    assert v15.state_dict().keys() == v1.state_dict().keys()
    with torch.no_grad():
        assert v1.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("name", ["resnet50", "resnet20"])
def test_num_classes_1001(name):
    model = build_model(name, num_classes=1001).eval()
    assert model.fc.out_features == 1001
    with torch.no_grad():
        assert model(input_for(name)).shape == (2, 1001)


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"name": "resnet51"}, "model.name"),
        ({"shortcut": "E"}, "model.shortcut"),
        ({"shortcut": "b"}, "model.shortcut"),
        ({"name": "plain34", "shortcut": "A"}, "model.shortcut"),
        ({"name": "plain34", "zero_init_residual": True}, "model.zero_init_residual"),
        ({"name": "resnet18", "stride_in_1x1": True}, "model.stride_in_1x1"),
        ({"num_classes": 0}, "model.num_classes"),
    ],
)
def test_model_config_errors_name_the_key(fields, key):
    with pytest.raises(ConfigError) as direct:
        ModelConfig(**fields)
    assert direct.value.key == key
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), fields)
    with pytest.raises(ConfigError) as via_omegaconf:
        OmegaConf.to_object(merged)
    assert via_omegaconf.value.key == key


def test_model_config_defaults_and_allowed_names():
    cfg = OmegaConf.to_object(OmegaConf.structured(ModelConfig))
    assert cfg == ModelConfig(name="resnet50", shortcut=None, stride_in_1x1=False, zero_init_residual=False,
                              blurpool=False, deep_stem=False, num_classes=None)
    with pytest.raises(ConfigError, match="allowed: resnet18, resnet34"):
        ModelConfig(name="resnet51")
    ModelConfig(name="plain110", num_classes=10)
    ModelConfig(name="resnet152", shortcut="C", stride_in_1x1=True, zero_init_residual=True)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("resnet51", {}, "name: got 'resnet51'"),
        ("resnet50", {"shortcutt": "B"}, "unknown model option.*shortcutt"),
        ("resnet50", {"shortcut": "E"}, "shortcut: got 'E'"),
        ("resnet50", {"num_classes": 0}, "num_classes: must be >= 1"),
    ],
)
def test_build_model_rejects_unknown_names_and_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, **options)


def output_shapes(model: nn.Module, side: int) -> dict:
    """{module: (map side, filters) of its output} for every block and convolution of the residual stages."""
    shapes = {}
    modules = [m for stage in model.stages() for m in stage.modules()
               if isinstance(m, (nn.Conv2d, BasicBlock, Bottleneck))]
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, (o.shape[-1], o.shape[1])))
             for m in modules]
    model(torch.empty(1, 3, side, side, device="meta"))
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_design_rules(name):
    """The paper's two rules, on the built model: layers with the same output map size have the same number of
    filters, and where the map is halved the number of filters doubles. They hold for every 3x3 layer and every
    block's output; a bottleneck's 1x1 layers reduce and expand the filters by design."""
    with torch.device("meta"):  # shapes only: no weights, no arithmetic
        model = build_model(name, num_classes=10)
    shapes = output_shapes(model, 32 if name.replace("plain", "resnet") in CIFAR_NETS else 64)
    three_by_three = [shape for m, shape in shapes.items() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    block_outputs = [shapes[block] for block in blocks(model)]
    for layers in (three_by_three, block_outputs):
        filters = {}
        for side, count in layers:
            assert filters.setdefault(side, count) == count, f"{side}x{side} maps with {filters[side]} and {count}"
        sides = sorted(filters, reverse=True)
        assert len(sides) == model.num_stages
        for bigger, smaller in zip(sides, sides[1:]):
            assert (smaller * 2, filters[smaller]) == (bigger, 2 * filters[bigger]), filters


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_blurpool_off_keeps_torchvisions_keys_and_on_renames_only_the_blurred_convs(name):
    with torch.device("meta"):
        off = build_model(name, blurpool=False)
        on = build_model(name, blurpool=True)
        theirs = getattr(torchvision.models, name)(weights=None)
    assert off.state_dict().keys() == theirs.state_dict().keys()
    # FFCV's rule: strided convs with >= 16 input channels. The 3-channel stem keeps its key (export folds into it).
    strided = {f"layer{i}.0.{conv}" for i in (2, 3, 4) for conv in ("conv1" if name == "resnet18" else "conv2",
                                                                     "downsample.0")}
    renamed = {f"{k[:-len('.weight')]}.conv.weight" if k[:-len(".weight")] in strided else k
               for k in off.state_dict()}
    assert set(on.state_dict()) == renamed and "conv1.weight" in on.state_dict()
    assert {n for n, m in on.named_modules() if isinstance(m, BlurPoolConv2d)} == strided
    assert count(on) == count(off)
    with pytest.raises(RuntimeError, match="conv.weight"):  # documented: not torchvision-loadable
        theirs.load_state_dict(on.state_dict())


def test_blurpool_keeps_the_same_seeds_weights_and_holds_no_filter_in_the_state_dict():
    torch.manual_seed(0)
    off = build_model("resnet20", num_classes=10)
    torch.manual_seed(0)
    on = build_model("resnet20", num_classes=10, blurpool=True)
    state = on.state_dict()
    assert not any("blur" in k for k in state)
    assert [torch.equal(a, b) for a, b in zip(off.state_dict().values(), state.values())] == [True] * len(state)
    assert any("blur_filter" in n for n, _ in on.named_buffers())  # there, and moved by .to(), but not saved


def test_blurpool_conv_is_the_conv_of_the_input_blurred_by_hand():
    torch.manual_seed(0)
    wrapped = build_model("resnet20", num_classes=10, blurpool=True).layer2[0].conv1
    assert isinstance(wrapped, BlurPoolConv2d) and wrapped.conv.stride == (2, 2)
    x = torch.randn(2, 16, 9, 9)
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    # [1, 2, 1] x [1, 2, 1] / 16 at every pixel, written out as a weighted sum of the 9 shifted copies.
    weights = torch.tensor([1.0, 2.0, 1.0])
    blurred = sum(weights[i] * weights[j] / 16 * padded[:, :, i:i + 9, j:j + 9] for i in range(3) for j in range(3))
    with torch.no_grad():
        out = wrapped(x)
        assert torch.allclose(out, wrapped.conv(blurred), atol=1e-6)
        assert not torch.allclose(out, wrapped.conv(x), atol=1e-2)


def test_blurpool_removes_the_checkerboard_that_plain_striding_aliases_to_a_constant():
    """The highest frequency a map can hold, (-1)^(i+j), sampled at stride 2 looks constant (aliasing); the blur
    averages it to exactly zero away from the border, so the blurred strided conv sees nothing there."""
    torch.manual_seed(0)
    plain = build_model("resnet20", num_classes=10).layer2[0].conv1
    blurred = build_model("resnet20", num_classes=10, blurpool=True).layer2[0].conv1
    blurred.conv.load_state_dict(plain.state_dict())
    i = torch.arange(16)
    checkerboard = ((-1.0) ** (i.view(-1, 1) + i.view(1, -1))).expand(1, 16, 16, 16)
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    with torch.no_grad():
        assert plain(checkerboard)[inside].abs().mean() > 0.1
        assert blurred(checkerboard)[inside].abs().max() < 1e-6


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "plain20"])
def test_blurpool_nets_train(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, blurpool=True).train()
    loss = nn.functional.cross_entropy(model(input_for(name)), torch.tensor([1, 3]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# timm's names for the Bag-of-Tricks variants (timm/models/resnet.py): -c the deep stem, -d with shortcut D too.
TIMM_VARIANTS = [("resnet18", {"deep_stem": True, "shortcut": "D"}, "resnet18d"),
                 ("resnet50", {"deep_stem": True, "shortcut": "D"}, "resnet50d"),
                 ("resnet50", {"deep_stem": True}, "resnet50c"),
                 ("resnet101", {"deep_stem": True, "shortcut": "D"}, "resnet101d")]


@pytest.mark.parametrize("name, options, timm_name", TIMM_VARIANTS)
def test_bag_of_tricks_variants_are_timms_nets_key_for_key_with_equal_outputs(name, options, timm_name):
    timm = pytest.importorskip("timm", reason="timm is the test-time reference for the variants ([dev] extra)")
    torch.manual_seed(0)
    ours = build_model(name, num_classes=1000, **options).eval()
    theirs = timm.create_model(timm_name, pretrained=False).eval()
    assert count(ours) == count(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 67, 67)  # an odd side: the pool's ceil_mode and count_include_pad show
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_shortcut_d_averages_every_pixel_the_strided_projection_skips():
    torch.manual_seed(0)
    option_b, option_d = (Bottleneck(64, 32, stride=2, shortcut=s).eval() for s in "BD")
    pool, projection = option_d.downsample[0], option_d.downsample[1]
    assert projection.stride == (1, 1)
    x = torch.randn(1, 64, 8, 8)
    shifted = x.clone()
    shifted[:, :, 1, 1] += 1  # a pixel of the first 2x2 window that a stride-2 1x1 conv never reads
    with torch.no_grad():
        assert torch.equal(option_b.downsample(shifted), option_b.downsample(x))
        assert not torch.equal(option_d.downsample(shifted), option_d.downsample(x))
        assert torch.allclose(pool(x), nn.functional.avg_pool2d(x, 2))


def test_deep_stem_is_three_3x3_convs_and_only_for_imagenet_nets():
    model = build_model("resnet50", deep_stem=True)
    convs = [m for m in model.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [
        ((3, 3), (2, 2), 32), ((3, 3), (1, 1), 32), ((3, 3), (1, 1), 64)]
    with pytest.raises(ValueError, match="deep_stem"):
        build_model("resnet20", deep_stem=True)
    with pytest.raises(ConfigError, match="deep_stem"):
        ModelConfig(name="resnet56", deep_stem=True)
