"""Training augmentation, each kind drawn per batch from the run's own generator (so a seed fixes every draw,
and a resumed run draws on where it stopped): shifts, rotations and scaling; other writers' looks (thicker,
coarse or blurred strokes); the 1s and 9s as other writers draw them. `augmentation(config, generator)` is what
a Config asks for, as one function of a batch. `negative_batches`: for a reader that learns to say "not a digit",
the images with no digit that join each batch, drawn the same way.

Each works on a whole batch of normalised images on their device, in a few batched tensor operations.
"""
import functools

import numpy as np
import torch
import torch.nn.functional as F

import not_digits
from digit_image import MEAN, STD


def to_device(device, t):
    """`t`, drawn on the CPU (where the run's generator is), on `device`: a CUDA device gets it from pinned memory,
    without the host waiting on the copy."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=None)
def constant(values, device):
    """torch.tensor(values) on `device`, made once per device rather than copied there for every batch."""
    return torch.tensor(values, device=device)


def augmentation(config, generator):
    """The config's training augmentation `augment(images, labels)` drawing from `generator`, or None: the 1s
    and 9s as other writers draw them (config.digit_variants), another writer's look (config.restyle), then
    shifts, rotations and scaling."""
    steps = []
    if config.digit_variants:
        steps.append(lambda x, y: random_digit_variants(x, y, generator, config.digit_variants))
    if config.restyle:
        steps.append(lambda x, y: random_restyle(x, generator, config.restyle))
    if config.shift or config.rotate or config.scale:
        steps.append(lambda x, y: random_transform(x, generator, max_shift=config.shift, max_degrees=config.rotate,
                                                   max_scale=config.scale))
    if not steps:
        return None

    def augment(images, labels):
        for step in steps:
            images = step(images, labels)
        return images
    return augment


def random_transform(images, generator, max_shift=2.0, max_degrees=0.0, max_scale=0.0):
    """Each image moved by up to `max_shift` pixels along each axis, turned by up to `max_degrees` and, with
    max_scale, scaled by a factor in [1 - max_scale, 1 + max_scale], all drawn per sample from `generator`.
    One batched grid_sample, on the images' device.

    Borders repeat the edge pixels, which in MNIST are background, so shifted-in areas stay black.
    """
    n, _, h, w = images.shape
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    angle = (torch.rand(n, generator=generator) * 2 - 1) * torch.deg2rad(torch.tensor(max_degrees))
    # Drawn only when asked for, so recipes without it keep their random stream (and their results) exactly.
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * max_scale if max_scale else torch.ones(n)
    # grid_sample works in [-1, 1] coordinates: a shift of s pixels is 2s / size. An output pixel samples
    # the input at 1/zoom of its distance from the centre: the digit grows by the factor zoom.
    cos, sin, dx, dy = (to_device(images.device, v)[:, None, None]  # (N, 1, 1) each
                        for v in (torch.cos(angle) / zoom, torch.sin(angle) / zoom, 2 * shift[:, 0] / w,
                                  2 * shift[:, 1] / h))
    # The grid F.affine_grid(theta, images.shape, align_corners=False) would give, built by broadcasting:
    # affine_grid's one 3x2 matrix product per image took ~10x as long (a test checks the two agree).
    xs = (torch.arange(w, device=images.device) * 2 + 1) / w - 1            # (W,) pixel centres
    ys = ((torch.arange(h, device=images.device) * 2 + 1) / h - 1)[:, None]  # (H, 1)
    grid = torch.stack([cos * xs - sin * ys + dx, sin * xs + cos * ys + dy], dim=-1)  # (N, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


RESTYLES = ("thicker", "thicker, coarse, nearest", "thicker, coarse, bilinear", "coarse, bilinear", "thicker, blurred")


def random_restyle(images, generator, fraction=0.5):
    """A `fraction` of the (normalised) images given another writer's look, one of RESTYLES per image, drawn
    from `generator`; the rest untouched. Other pens draw thicker strokes (a 3x3 max filter; a thinner one would
    erase MNIST's 2-pixel strokes) and softer edges (a 3x3 blur); scans and small bitmaps (the UCI digits are
    8x8 cells) arrive coarse: the digit counted down to 10-12 cells across and scaled back up. Each changed
    image is rescaled to a maximum ink of 1, as digit_image.read_digit rescales what it is given."""
    n, _, h, w = images.shape
    pick = torch.randint(len(RESTYLES), (n,), generator=generator)
    cells = torch.randint(10, 13, (1,), generator=generator).item()  # one coarseness per batch: batched resizes
    change = torch.rand(n, generator=generator) < fraction
    ink = images * STD + MEAN  # (N, 1, H, W) in [0, 1], background 0
    thick = F.max_pool2d(ink, 3, 1, 1)
    coarse_thick = F.adaptive_avg_pool2d(thick, cells)  # (N, 1, cells, cells)
    blur = constant((1.0, 2.0, 1.0), images.device)
    blur = (blur[:, None] * blur[None, :] / 16).view(1, 1, 3, 3)
    styled = torch.stack([  # in the order of RESTYLES
        thick,
        F.interpolate(coarse_thick, size=(h, w), mode="nearest"),
        F.interpolate(coarse_thick, size=(h, w), mode="bilinear", align_corners=False),
        F.interpolate(F.adaptive_avg_pool2d(ink, cells), size=(h, w), mode="bilinear", align_corners=False),
        F.conv2d(thick, blur, padding=1),
    ])  # (len(RESTYLES), N, 1, H, W)
    out = styled[to_device(images.device, pick), torch.arange(n, device=images.device)]  # (N, 1, H, W)
    out = out / out.amax((1, 2, 3), keepdim=True).clamp_(min=1e-6)
    changed = to_device(images.device, change)[:, None, None, None]
    return torch.where(changed, (out - MEAN) / STD, images)  # the rest as given


def _stroke(h, w, start, end, radius):
    """Soft ink (N, H, W) of one straight pen stroke per image from `start` to `end` ((N, 2) as x, y in pixels),
    `radius` (N,) pixels either side of its centre line, its edge anti-aliased over one pixel."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=start.device),
                            torch.arange(w, dtype=torch.float32, device=start.device), indexing="ij")
    pixels = torch.stack([xs, ys], -1)                                # (H, W, 2)
    a, ab = start[:, None, None], (end - start)[:, None, None]         # (N, 1, 1, 2)
    t = (((pixels - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-6)).clamp(0, 1)  # nearest point's place
    distance = (pixels - (a + t[..., None] * ab)).norm(dim=-1)        # (N, H, W)
    return (radius[:, None, None] + 0.5 - distance).clamp(0, 1)


def random_digit_variants(images, labels, generator, fraction=0.5):
    """A `fraction` of the 1s and of the 9s drawn in a form other writers use and MNIST's rarely do, drawn from
    `generator`: a 1 with a flag (half of those with a foot too), a block 1, or a block 1 with a flag, each a
    third of the time; a 9 with its tail hooked back to the left. Every other digit as given.

    MNIST's writers mostly draw the 1 as a bare thin stroke and the 9's tail straight down. Other writers' 1s
    carry a flag at the top and a foot (the continental 1) or are solid bars, and their 9s curl the tail back
    under the loop; networks trained on MNIST read those as 7, 8 and 3. Here the flag is a stroke from the top of
    the 1, 25-45% of its height long, 30-60 degrees below the horizontal to the left; the foot a horizontal
    stroke across its bottom; the bar the stroke widened to 5 or 7 pixels; the hooked tail a stroke from the
    bottom of the 9, 30-55% of its height long, from 15 degrees below the horizontal to 30 above, to the left: the
    upright 9s whose tail bends back along the line, which MNIST-trained networks read as 3. Each changed digit
    is rescaled to a maximum ink of 1, as random_restyle's are."""
    n, _, h, w = images.shape
    device = images.device
    # Eight draws for every digit, used or not: the stream does not depend on the batch's labels.
    draws = to_device(device, torch.rand(n, 8, generator=generator))
    ones, nines = (labels == 1) & (draws[:, 0] < fraction), (labels == 9) & (draws[:, 0] < fraction)
    chosen = (ones | nines).nonzero()[:, 0]  # only these are drawn on: about a tenth of a batch at fraction 0.5
    if len(chosen) == 0:
        return images
    ones = ones[chosen]
    form, length, angle, radius, foot, foot_length, width = draws[chosen, 1:].unbind(1)
    ink = images[chosen, 0] * STD + MEAN                              # (K, H, W) in [0, 1], background 0
    # Where the stroke starts and ends: the top and bottom rows of ink above 0.5, at their mean column.
    on = ink > 0.5
    rows, cols = torch.arange(h, device=device), torch.arange(w, dtype=torch.float32, device=device)
    top = torch.where(on.any(2), rows, h - 1).amin(1)
    bottom = torch.where(on.any(2), rows, 0).amax(1)
    everyone = torch.arange(len(chosen), device=device)

    def mean_column(row):
        inked = on[everyone, row].float()                             # (K, W)
        return (inked * cols).sum(1) / inked.sum(1).clamp(min=1)

    top_end = torch.stack([mean_column(top), top.float()], -1)        # (K, 2) as x, y
    bottom_end = torch.stack([mean_column(bottom), bottom.float()], -1)
    height = (bottom - top).float().clamp(min=0)
    radius = 0.8 + 0.6 * radius
    reach = height * (0.25 + 0.2 * length)                             # the flag's and the tail's length
    down = torch.deg2rad(30 + 30 * angle)
    up = torch.deg2rad(-15 + 45 * angle)
    tail_reach = height * (0.3 + 0.25 * length)
    flag = _stroke(h, w, top_end, top_end + torch.stack([-reach * torch.cos(down), reach * torch.sin(down)], -1),
                   radius)
    half_foot = (height * (0.15 + 0.15 * foot_length))[:, None] * constant((1.0, 0.0), device)
    flagged = torch.maximum(ink, flag)
    flagged = torch.where((foot < 0.5)[:, None, None],
                          torch.maximum(flagged, _stroke(h, w, bottom_end - half_foot, bottom_end + half_foot,
                                                         radius)), flagged)

    def widened(x):  # a 1 drawn as a bar: its stroke 5 or 7 pixels wide
        return torch.where((width < 0.5)[:, None, None], F.max_pool2d(x[:, None], (1, 5), 1, (0, 2))[:, 0],
                           F.max_pool2d(x[:, None], (1, 7), 1, (0, 3))[:, 0])

    one = torch.where((form < 1 / 3)[:, None, None], flagged,
                      torch.where((form < 2 / 3)[:, None, None], widened(ink), widened(flagged)))
    tail = _stroke(h, w, bottom_end,
                   bottom_end + torch.stack([-tail_reach * torch.cos(up), -tail_reach * torch.sin(up)], -1), radius)
    out = torch.where(ones[:, None, None], one, torch.maximum(ink, tail))  # (K, H, W): each chosen digit is a 1 or a 9
    out = out / out.amax((1, 2), keepdim=True).clamp(min=1e-6)
    images = images.clone()
    images[chosen] = ((out - MEAN) / STD)[:, None]
    return images


NEGATIVES = 20_000  # images with no digit drawn for a declining reader's run (not_digits.training_images) ...
NEGATIVE_SHARE = 4  # ... each batch of digits joined by batch_size / NEGATIVE_SHARE of them ...
TYPED = 2_000  # ... and by batch_size / TYPED_SHARE typed digits, drawn as the letters are (not_digits.typed_digits)
TYPED_SHARE = 16


def negative_batches(config, x_train, y_train, generator, device, log):
    """For a declining reader (config.not_digits): `draw(augment)`, (images, labels) to join a batch of digits:
    batch_size / NEGATIVE_SHARE images with no digit (label -1) from NEGATIVES drawn from the run's seed (no more
    than the training digits: a dry run's few; parts of digits from its training split), then batch_size /
    TYPED_SHARE digits typed in the same fonts as the letters (their labels), so that how an image was drawn never
    tells a digit from a non-digit. Picked by `generator` and given the digits' augmentation unless it is None."""
    digits = (x_train[:, 0].cpu() * STD + MEAN).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    bank = not_digits.training_images(min(NEGATIVES, len(digits)), config.seed, digits, y_train.cpu().numpy())
    typed, typed_labels = not_digits.typed_digits(min(TYPED, len(digits)), config.seed)
    bank = torch.from_numpy(np.concatenate([bank, typed]))[:, None].to(device)
    labels = torch.cat([torch.full((len(bank) - len(typed),), -1), torch.from_numpy(typed_labels)]).to(device)
    count, typed_count = max(1, config.batch_size // NEGATIVE_SHARE), max(1, config.batch_size // TYPED_SHARE)
    log(f"not a digit: {len(bank) - len(typed):,} images of {len(not_digits.FAMILIES) - len(not_digits.HELD_OUT)} "
        f"families, {count} with every batch, weight {config.not_digits}; {typed_count} typed digits with it")

    def draw(augment):
        pick = torch.cat([torch.randint(len(bank) - len(typed), (count,), generator=generator),
                          torch.randint(len(bank) - len(typed), len(bank), (typed_count,), generator=generator)])
        x, y = bank[pick.to(device)], labels[pick.to(device)]
        return (x if augment is None else augment(x, y)), y
    return draw
