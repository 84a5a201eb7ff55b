"""The networks (model.py), on random tensors: their sizes, outputs and parts.
"""
import copy

import pytest
import torch

import digit_image
from model import (MODELS, ROW_MODELS, Net, ResidualBlock, SqueezeExcite, build_model, center_crop, count_parameters,
                   not_digit_log_probability)




# --- the networks, on random tensors ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [22, 24, 25, 28])
def test_center_crop_cuts_as_torchvision_does(size):
    import torchvision.transforms.functional as TF
    x = torch.randn(2, 3, 28, 28).to(memory_format=torch.channels_last)
    ours, theirs = center_crop(x, size), TF.center_crop(x, [size, size])
    assert torch.equal(ours, theirs) and ours.stride() == theirs.stride()


def test_net_has_13242_parameters():
    n = count_parameters(Net())
    assert n == 40 + 296 + 12_576 + 330 == 13_242
    assert n < 25_000


def test_net_returns_log_probabilities():
    out = Net().eval()(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(4))


def test_the_public_one_epoch_network_has_215194_parameters():
    model = build_model("cnn-215k")
    assert count_parameters(model) == 624 + 6_944 + 205_056 + 2_570 == 215_194
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# The sizes the README's network table states; a change to a network shows up here first.
NETWORK_SIZES = {"net": 13_242, "ressenet": 13_418, "ressenet-small": 7_864, "ressenet-tiny": 5_533,
                 "ressenet-micro": 3_482, "ressenet-wide": 14_658, "ressenet-nd": 52_715, "ressenet-wide22": 14_658,
                 "shared-nano": 978, "cnn-215k": 215_194, "rows": 85_755, "rows-nd": 85_820}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_network_has_its_stated_parameter_count(name):
    net = build_model(name).eval()
    assert count_parameters(net) == NETWORK_SIZES[name]
    if name in ROW_MODELS:  # a row of any even width: a column of 11 (12 with marks) log-probabilities per 2 px
        for width in (36, 100, 302):
            out = net(torch.randn(2, 1, digit_image.ROW_HEIGHT, width))
            assert out.shape == (2, 12 if net.marks else 11, width // 2) and torch.allclose(out.exp().sum(1), torch.ones(2, width // 2))
    else:
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_name_is_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet152")


@pytest.mark.parametrize("name, budget", [("ressenet", 19_999), ("ressenet-small", 8_000),
                                          ("ressenet-tiny", 5_800), ("ressenet-micro", 3_500)])
def test_seed2_networks_have_every_component_within_their_parameter_budget(name, budget):
    model = build_model(name).eval()
    assert count_parameters(model) <= budget
    kinds = {type(m) for m in model.modules()}
    assert {torch.nn.BatchNorm2d, torch.nn.Dropout, torch.nn.AdaptiveAvgPool2d, SqueezeExcite} <= kinds
    assert model.gap.output_size in (1, (1, 1))  # the head pools globally, whatever the input size
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    assert out.shape == (4, 10)
    # The residual branch and the attention really carry signal: cutting either changes the output.
    def changed(cut):
        other = copy.deepcopy(model)
        with torch.no_grad():
            cut(other)
            return not torch.allclose(other(x), out)

    def cut_residual(m):  # the last BN of every residual branch to zero: only the shortcuts are left
        for block in [b for b in m.modules() if isinstance(b, ResidualBlock)]:
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()

    def cut_attention(m):  # every SE gate pinned fully open
        for se in [s for s in m.modules() if isinstance(s, SqueezeExcite)]:
            se.excite.bias.fill_(1e4)

    assert changed(cut_residual) and changed(cut_attention)
    # With every residual branch cut, the input still reaches the output: through the identity shortcuts.
    shortcut_only = copy.deepcopy(model)
    with torch.no_grad():
        cut_residual(shortcut_only)
        assert not torch.allclose(shortcut_only(x), shortcut_only(torch.randn(4, 1, 28, 28)))


def test_shared_nano_is_five_layers_deep_from_one_convolution_within_1000_parameters():
    model = build_model("shared-nano").eval()
    assert count_parameters(model) <= 1_000
    calls = []
    model.shared.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        assert calls == [(4, 16, 14, 14)] * 5  # the one convolution, applied five times at 14x14
        # Each application has its own BatchNorm, and each carries signal: cutting one changes the output.
        for i in range(len(model.norms)):
            other = copy.deepcopy(model)
            other.norms[i].weight.zero_()
            other.norms[i].bias.zero_()
            assert not torch.allclose(other(x), out)


def test_seed2_network_sees_only_the_central_22x22():
    model = build_model("ressenet").eval()
    x = torch.randn(2, 1, 28, 28)
    border = torch.ones(28, 28, dtype=torch.bool)
    border[3:25, 3:25] = False
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(model(x.masked_fill(border, 5.0)), out)  # the 3-pixel border is ignored
        assert not torch.allclose(model(x.masked_fill(~border, 5.0)), out)


def test_a_network_with_a_not_a_digit_output_leaves_the_digits_what_it_does_not_give_that():
    torch.manual_seed(0)
    net = build_model("ressenet-nd").eval()
    x = torch.randn(4, 1, 28, 28)
    log_probs = net(x)
    rest = not_digit_log_probability(log_probs).exp()
    assert log_probs.shape == (4, 10) and torch.allclose(log_probs.exp().sum(1) + rest, torch.ones(4))
    logits = net.fc(net.dropout(torch.flatten(net.gap(net.res2(net.layer2(net.pool(net.res1(net.layer1(net.stem(
        center_crop(x, 24)))))))), 1)))
    torch.testing.assert_close(rest, logits.softmax(1)[:, 10])  # the 11th output is "not a digit"
    net.temperature.fill_(0.5)  # the temperature divides every logit
    torch.testing.assert_close(net(x).exp(), (logits / 0.5).softmax(1)[:, :10])
