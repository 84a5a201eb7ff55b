"""The networks: tiny CNNs for 28x28 MNIST digits, each returning log-probabilities (B, 10).

    net             the one-epoch reference CNN, 13,242 parameters: two 3x3 convs (1->4->8) with max-pooling, FC 392->32->10
    ressenet        13,418 parameters: BatchNorm, residual blocks with squeeze-and-excitation attention, global
                    average pooling and dropout, on the central 22x22 pixels
    ressenet-small  the same built from depthwise-separable convolutions, widths 16-24-32, whole image: 7,864
    ressenet-tiny   the same with widths 16-20-24: 5,533 parameters
    ressenet-micro  widths 10-16-18 on the central 24x24, the stem pooled first: 3,482 parameters
    ressenet-wide   `ressenet` with widths 16-16-16 on the central 24x24: 14,658 parameters (one epoch; 30 epochs)
    ressenet-nd     `ressenet-wide` with widths 16-32-32 and an 11th output, "not a digit", its temperature and
                    threshold set on validation after training: the reader that declines what holds no digit,
                    52,715 parameters (at 16-16-16, learning non-digits cost it half a point of MNIST)
    ressenet-wide22 `ressenet-wide` on the central 22x22 (maps 11x11 and 5x5): the one-epoch race's network
    shared-nano     one separable convolution applied five times at 14x14 (each with its own BatchNorm): 978
    cnn-215k        the best-known public "99% in one epoch" network, 215,194 parameters: benchmark.py races it
    rows            the row reader: a row of digits 32 px high and any width in, a column of 11 log-probabilities
                    (blank, 0-9) per 2 px out, for CTC; fully convolutional, 85,755 parameters

Build one by name with `build_model(name)`; `count_parameters(model)` gives its trainable size. What each
reaches, and with which recipe: README.md; how each was chosen: docs/experiments.md.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    """The one-epoch reference CNN (net-1epoch). Its true size is 13,242 parameters (40 + 296 + 12,576 + 330)."""

    def __init__(self, dropout=0.005):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.dropout1 = nn.Dropout(dropout)
        self.fc1 = nn.Linear(8 * 7 * 7, 32)  # two 2x pools take 28x28 down to 7x7
        self.dropout2 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):                       # (B, 1, 28, 28)
        x = self.pool(F.relu(self.conv1(x)))    # (B, 4, 14, 14)
        x = self.pool(F.relu(self.conv2(x)))    # (B, 8, 7, 7)
        x = torch.flatten(x, 1)                 # (B, 392)
        x = F.relu(self.fc1(self.dropout1(x)))  # (B, 32)
        x = self.fc2(self.dropout2(x))          # (B, 10)
        return F.log_softmax(x, dim=1)


class ConvBN(nn.Sequential):
    """3x3 (or 1x1) convolution without bias, BatchNorm, ReLU: the block every ResSENet layer is made of.

    With pool=True a 2x2 max-pool follows the convolution directly, so BatchNorm and ReLU work on a quarter of
    the pixels (11% faster training steps for `ressenet`'s stem).
    """

    def __init__(self, c_in, c_out, kernel_size=3, pool=False):
        conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)  # BN supplies the bias
        super().__init__(conv, *([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SqueezeExcite(nn.Module):
    """Channel attention: global-average-pool each channel, and rescale it by a learned gate in (0, 1)."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        self.squeeze = nn.Linear(channels, channels // reduction)
        self.excite = nn.Linear(channels // reduction, channels)

    def forward(self, x):                                       # (B, C, H, W)
        w = x.mean((2, 3))                                      # (B, C)
        w = torch.sigmoid(self.excite(F.relu(self.squeeze(w))))  # (B, C)
        return x * w[:, :, None, None]                          # (B, C, H, W)


def separable_conv(c_in, c_out):
    """A depthwise-separable 3x3 convolution: 9*c_in + c_in*c_out weights where a full one has 9*c_in*c_out."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),  # each channel alone
                         nn.Conv2d(c_in, c_out, 1, bias=False))                          # then mix the channels


class SeparableConvBN(nn.Sequential):
    """separable_conv, BatchNorm, ReLU: ConvBN at a fraction of the weights, so the small network can be wider."""

    def __init__(self, c_in, c_out):
        super().__init__(*separable_conv(c_in, c_out), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """x + SE(BN(conv(ReLU(BN(conv(x)))))), then ReLU: two 3x3 convs (or separable ones) around an identity
    shortcut."""

    def __init__(self, channels, reduction=4, separable=False):
        super().__init__()
        self.conv1 = (SeparableConvBN if separable else ConvBN)(channels, channels)
        self.conv2 = (separable_conv(channels, channels) if separable
                      else nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.bn2 = nn.BatchNorm2d(channels)
        self.attention = SqueezeExcite(channels, reduction)

    def forward(self, x):
        residual = self.attention(self.bn2(self.conv2(self.conv1(x))))
        return F.relu(x + residual)


def center_crop(x, size):
    """The central size x size pixels of (B, C, H, W), as torchvision's center_crop cuts them (the top-left
    corner at round((H - size) / 2)): a view, so that no command pays for importing torchvision (seconds on
    2 cores) before it needs it."""
    top, left = round((x.shape[-2] - size) / 2), round((x.shape[-1] - size) / 2)
    return x[..., top:top + size, left:left + size]


class ResSENet(nn.Module):
    """BatchNorm, dropout, squeeze-and-excitation attention, residual blocks and global average pooling. Two
    max-pools halve the image twice early, where convolutions are cheap.

    widths: the channels of the stem, the first stage and the second stage. On channels-last tensors torch's
        CPU BatchNorm is fast at multiples of 16 channels and 2-2.5x slower at 20, hence `ressenet`'s 8-16-16.
    crop: the network sees only the central crop x crop pixels. MNIST's digits sit in a 20x20 box centred by
        mass, so the border is nearly blank (1.1% of the ink lies outside the central 22x22); `ressenet`'s 22x22
        makes its maps 11x11 and 5x5, at 0.6x the cost per image of the whole image.
    stem_pool_first: pool the stem's convolution before its BatchNorm and ReLU (faster, see ConvBN).
    separable: every convolution after the first is depthwise-separable (SeparableConvBN), and the stem gets one
        more at full resolution: more computation for the same parameters, for the small networks.
    not_digit: an 11th output, "not a digit". forward still returns the 10 digits' log-probabilities, now of an
        11-way softmax: what they leave, 1 - sum(exp), is the probability that the image holds no digit, so every
        reader of (B, 10) works unchanged and a non-digit reads with low confidence. The logits are divided by the
        buffer `temperature` (set on validation so that confidence means what it says), and the buffer
        `threshold` is the confidence under which a reader declines (model_train.calibrate).
    `ressenet` reaches 99.5% test accuracy with test-time augmentation in 8 epochs (README).
    """

    def __init__(self, widths=(8, 16, 16), dropout=0.1, stem_pool_first=True, crop=22, separable=False,
                 not_digit=False):
        super().__init__()
        c1, c2, c3 = widths
        conv = SeparableConvBN if separable else ConvBN
        self.crop = crop
        self.stem_pool_first = stem_pool_first
        self.stem = ConvBN(1, c1, pool=stem_pool_first)
        if separable:  # a second convolution at full resolution, affordable when it is separable
            self.stem = nn.Sequential(self.stem, SeparableConvBN(c1, c1))
        self.pool = nn.MaxPool2d(2)
        self.layer1 = conv(c1, c2)
        self.res1 = ResidualBlock(c2, separable=separable)
        self.layer2 = conv(c2, c3)
        self.res2 = ResidualBlock(c3, separable=separable)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.not_digit = not_digit
        self.fc = nn.Linear(c3, 11 if not_digit else 10)
        if not_digit:
            self.register_buffer("temperature", torch.tensor(1.0))
            self.register_buffer("threshold", torch.tensor(0.0))

    def forward(self, x):                     # (B, 1, 28, 28)
        x = center_crop(x, self.crop)         # (B, 1, S, S), S = crop
        x = self.stem(x)                      # (B, c1, S/2, S/2) pooled first, or (B, c1, S, S)
        if not self.stem_pool_first:
            x = self.pool(x)                  # (B, c1, S/2, S/2)
        x = self.res1(self.layer1(x))         # (B, c2, S/2, S/2)
        x = self.pool(x)                      # (B, c2, S/4, S/4), rounded down: 5x5 from 11x11, 7x7 from 14x14
        x = self.res2(self.layer2(x))         # (B, c3, S/4, S/4)
        x = torch.flatten(self.gap(x), 1)     # (B, c3)
        x = self.fc(self.dropout(x))          # (B, 10), or (B, 11) with not_digit
        if self.not_digit:                    # the digits' share of an 11-way softmax
            return F.log_softmax(x / self.temperature, dim=1)[:, :10]
        return F.log_softmax(x, dim=1)


def not_digit_log_probability(log_probs):
    """log P(not a digit) (..., ) from a not_digit network's (..., 10) digit log-probabilities: log(1 - sum(exp)),
    kept finite when the digits hold all but a rounding of the mass."""
    return torch.log(-torch.expm1(log_probs.logsumexp(-1).clamp(max=-1e-6)))


class SharedConvNet(nn.Module):
    """Depth from one set of weights, for the smallest budgets: a conv stem pooled to 14x14, a separable
    expansion to `width` channels, then ONE separable width->width convolution applied `repeats` times, each
    application with its own BatchNorm and a residual around it; global average pooling, FC to 10.

    The shared convolution costs its 400 weights once and each further application only a BatchNorm's 32, so
    `shared-nano` is five layers deep at 14x14 in 978 parameters. Its running train accuracy (98.9%) is level
    with its test accuracy (98.8%, README): at this size capacity, not overfitting, holds it back.
    """

    def __init__(self, stem=6, width=16, repeats=5, dropout=0.0):
        super().__init__()
        self.stem = ConvBN(1, stem, pool=True)
        self.expand = SeparableConvBN(stem, width)
        self.shared = separable_conv(width, width)
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(repeats))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):                      # (B, 1, 28, 28)
        x = self.expand(self.stem(x))          # (B, width, 14, 14)
        for norm in self.norms:                # the same convolution each time, its own BatchNorm
            x = F.relu(x + norm(self.shared(x)))  # (B, width, 14, 14)
        x = torch.flatten(self.gap(x), 1)      # (B, width)
        x = self.fc(self.dropout(x))           # (B, 10)
        return F.log_softmax(x, dim=1)


class CNN215k(nn.Module):
    """The public one-epoch speed network: conv 1->24 (5x5), max-pool, ReLU, conv 24->32 (3x3), max-pool, ReLU,
    FC 800->256->10 (624 + 6,944 + 205,056 + 2,570 = 215,194 parameters). Its recipe is benchmark.py's."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, kernel_size=5)
        self.conv2 = nn.Conv2d(24, 32, kernel_size=3)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)  # none in the public recipe
        self.fc1 = nn.Linear(32 * 5 * 5, 256)  # 28 -conv5-> 24 -pool-> 12 -conv3-> 10 -pool-> 5
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):                                   # (B, 1, 28, 28)
        x = F.relu(self.pool(self.conv1(x)))                # (B, 24, 12, 12)
        x = F.relu(self.pool(self.conv2(x)))                # (B, 32, 5, 5)
        x = F.relu(self.fc1(self.dropout(torch.flatten(x, 1))))  # (B, 256)
        return F.log_softmax(self.fc2(x), dim=1)            # (B, 10)


class RowNet(nn.Module):
    """Reads a row of handwritten digits without cutting it apart: trained with CTC (row_train.py), its frames
    say how many digits there are and where each one is; the digit networks then read each digit.

    Fully convolutional (no recurrent layer, no adaptive pooling) so that it exports to ONNX with a free width and
    runs in onnxruntime-web. Height is pooled 32 -> 4 and collapsed by a 4x1 convolution; width only once, so a
    frame is 2 px and two thin 1s side by side still have a blank frame between them. Each frame sees about 31 px
    of the row (a digit and a half at the row's 24-px ink height)."""

    def __init__(self, dropout=0.1, marks=False):
        super().__init__()
        self.marks = marks  # a 12th class: a mark that is no digit (a letter, a symbol, a scribble)
        self.conv1 = ConvBN(1, 16)
        self.pool1 = nn.MaxPool2d(2)                    # height and width halved
        self.conv2 = ConvBN(16, 32)
        self.conv3 = ConvBN(32, 48)
        self.conv4 = ConvBN(48, 48)
        self.pool = nn.MaxPool2d((2, 1))                # height only
        self.collapse = nn.Sequential(nn.Conv2d(48, 64, (4, 1), bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.context1 = nn.Sequential(nn.Conv2d(64, 64, (1, 5), padding=(0, 2), bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True))
        self.context2 = nn.Sequential(nn.Conv2d(64, 64, (1, 3), padding=(0, 2), dilation=(1, 2), bias=False),
                                      nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.classify = nn.Conv2d(64, 12 if marks else 11, 1)

    def forward(self, x):                       # (B, 1, 32, W), W even
        x = self.pool1(self.conv1(x))           # (B, 16, 16, W/2)
        x = self.pool(self.conv2(x))            # (B, 32, 8, W/2)
        x = self.pool(self.conv3(x))            # (B, 48, 4, W/2)
        x = self.collapse(self.conv4(x))        # (B, 64, 1, W/2)
        x = self.context2(self.context1(x))     # (B, 64, 1, W/2)
        x = self.classify(self.dropout(x))      # (B, 11, 1, W/2): blank, the digits 0-9 (, a mark)
        return F.log_softmax(x[:, :, 0], dim=1)  # (B, 11 or 12, W/2)


MODELS = {
    "net": Net,
    "ressenet": ResSENet,
    "ressenet-small": functools.partial(ResSENet, widths=(16, 24, 32), stem_pool_first=False, crop=28, separable=True),
    "ressenet-tiny": functools.partial(ResSENet, widths=(16, 20, 24), stem_pool_first=False, crop=28, separable=True),
    "ressenet-micro": functools.partial(ResSENet, widths=(10, 16, 18), crop=24, separable=True),
    "ressenet-wide": functools.partial(ResSENet, widths=(16, 16, 16), crop=24),
    "ressenet-nd": functools.partial(ResSENet, widths=(16, 32, 32), crop=24, not_digit=True),
    "ressenet-wide22": functools.partial(ResSENet, widths=(16, 16, 16), crop=22),
    "shared-nano": SharedConvNet,
    "cnn-215k": CNN215k,
    "rows": RowNet,
    "rows-nd": functools.partial(RowNet, marks=True),
}
NOT_DIGIT_MODELS = ("ressenet-nd",)  # networks with a "not a digit" output (Config.not_digits trains it)
ROW_MODELS = ("rows", "rows-nd")  # networks that read a row of digits (row_train.py), not one 28x28 digit;
ROW_MARK_MODELS = ("rows-nd",)  # ... those that also find marks that are no digit (Config.not_digits trains them)


def build_model(name, **kwargs):
    """Return a new network by its name in MODELS; kwargs go to its constructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
