"""Images that hold no digit, made from a seed, never downloaded: the measure of whether a reader says "not a
digit" (`evaluate --not-digits`). Each family is drawn the way a user's file would arrive: dark ink on light
paper, 112x112 pixels, read by predict's whole path.

    letters, sans          capitals and small letters in DejaVu Sans and Liberation Sans, turned by up to 10 degrees
    letters, serif         the same in DejaVu Serif and Liberation Serif
    symbols                # @ & ? % * + = < > $ ~ in the sans fonts
    scribbles              a pen's random path of 4-9 strokes
    shapes                 triangles, squares, stars, arrows, outlined or filled
    blots and noise        a few filled blobs, or scattered specks
    parts of digits        half a test digit, two test digits laid over each other, or a digit's quarters swapped

Letters that are digits in another hand (O o I l S Z B b g q) are left out, and so are shapes that are (a circle,
a bar). HELD_OUT names the families a reader that learns to decline must never be trained on: their figures are
the honest ones. The fonts are Debian's fonts-dejavu-core and fonts-liberation.

`training_images` draws the negatives a declining reader trains on (Config.not_digits): the other families only,
the letters and symbols in every sans face of those packages (bold, oblique, condensed, narrow: TRAINING_SANS),
the parts of digits made from training digits, each prepared as predict prepares one digit. `typed_digits` draws
digits the same way, to train on as digits.
"""
import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from errors import UserError

LETTERS = "ACDEFGHJKLMNPRTUVWXYacdefhijkmnprtuvwxyz"  # no O o I l S Z B b g q: digits in another hand
SYMBOLS = "#@&?%*+=<>$~"
FONT_DIR = "/usr/share/fonts/truetype"
FONTS = {"sans": ("dejavu/DejaVuSans.ttf", "liberation/LiberationSans-Regular.ttf"),
         "serif": ("dejavu/DejaVuSerif.ttf", "liberation/LiberationSerif-Regular.ttf")}
# The negatives a reader trains on draw letters and symbols from every sans face (never a serif one: held out).
TRAINING_SANS = ("dejavu/DejaVuSans.ttf", "dejavu/DejaVuSans-Bold.ttf", "dejavu/DejaVuSans-Oblique.ttf",
                 "dejavu/DejaVuSans-BoldOblique.ttf", "dejavu/DejaVuSans-ExtraLight.ttf",
                 "dejavu/DejaVuSansCondensed.ttf", "dejavu/DejaVuSansCondensed-Bold.ttf",
                 "liberation/LiberationSans-Regular.ttf", "liberation/LiberationSans-Bold.ttf",
                 "liberation/LiberationSans-Italic.ttf", "liberation/LiberationSansNarrow-Regular.ttf",
                 "liberation/LiberationSansNarrow-Bold.ttf")
FAMILIES = ("letters, sans", "letters, serif", "symbols", "scribbles", "shapes", "blots and noise",
            "parts of digits")
HELD_OUT = ("letters, serif", "shapes")  # never to be trained on
SIDE = 112  # pixels of each image, as a small scan or a phone's crop would be


class FontError(UserError):
    """A font the letters are drawn in is not installed; the message says which package has it."""


def font(kind, index, size):
    """Font `index` (wrapping) of FONTS[kind], or of TRAINING_SANS for kind "training sans", at `size` px."""
    faces = TRAINING_SANS if kind == "training sans" else FONTS[kind]
    path = os.path.join(FONT_DIR, faces[index % len(faces)])
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        raise FontError(f"{path} is missing: install Debian's fonts-dejavu-core and fonts-liberation "
                        f"(apt-get install fonts-dejavu-core fonts-liberation)") from None


def check_fonts():
    """A FontError naming the package to install, before any work, when a font the letters need is missing."""
    for kind, paths in {**FONTS, "training sans": TRAINING_SANS}.items():
        for index in range(len(paths)):
            font(kind, index, 12)


def text_image(text, kind, rng):
    """One character in a font of `kind`, 55-85% of the image tall, turned by up to 10 degrees, off-centre."""
    image = Image.new("L", (SIDE, SIDE), 0)
    face = font(kind, int(rng.integers(len(TRAINING_SANS) if kind == "training sans" else 2)),
                int(SIDE * rng.uniform(0.55, 0.85)))
    ImageDraw.Draw(image).text((SIDE / 2 + rng.uniform(-8, 8), SIDE / 2 + rng.uniform(-8, 8)), text, fill=255,
                               font=face, anchor="mm")
    return image.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR)


def scribble(rng):
    """A pen's random path: 4-9 strokes between points anywhere in the middle of the page."""
    image = Image.new("L", (SIDE, SIDE), 0)
    points = [tuple(p) for p in rng.uniform(0.15 * SIDE, 0.85 * SIDE, (int(rng.integers(5, 11)), 2))]
    ImageDraw.Draw(image).line(points, fill=255, width=int(rng.integers(4, 9)), joint="curve")
    return image


def shape(rng):
    """A triangle, square, five-pointed star or arrow, outlined or filled."""
    image = Image.new("L", (SIDE, SIDE), 0)
    draw = ImageDraw.Draw(image)
    c, r = SIDE / 2 + rng.uniform(-8, 8, 2), SIDE * rng.uniform(0.25, 0.4)
    kind = int(rng.integers(4))
    if kind == 3:  # an arrow: a shaft and a head, pointing anywhere
        angle = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(angle), np.sin(angle)])
        tip, tail = c + r * d, c - r * d
        side = np.array([-d[1], d[0]]) * r * 0.4
        draw.line([tuple(tail), tuple(tip)], fill=255, width=6)
        draw.polygon([tuple(tip), tuple(tip - 0.5 * r * d + side), tuple(tip - 0.5 * r * d - side)], fill=255)
        return image
    corners = (3, 4, 10)[kind]
    turn = rng.uniform(0, 2 * np.pi)
    radii = [r if kind != 2 or i % 2 == 0 else 0.45 * r for i in range(corners)]
    points = [tuple(c + radii[i] * np.array([np.cos(turn + 2 * np.pi * i / corners),
                                             np.sin(turn + 2 * np.pi * i / corners)])) for i in range(corners)]
    if rng.random() < 0.5:
        draw.polygon(points, fill=255)
    else:
        draw.line(points + points[:1], fill=255, width=int(rng.integers(4, 9)))
    return image


def blots(rng):
    """A few filled blobs, or specks scattered over the middle of the page."""
    image = Image.new("L", (SIDE, SIDE), 0)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0.2 * SIDE, 0.8 * SIDE, 2)
            w, h = rng.uniform(6, 30, 2)
            draw.ellipse([x - w, y - h, x + w, y + h], fill=255)
    else:
        for x, y in rng.uniform(0.15 * SIDE, 0.85 * SIDE, (int(rng.integers(20, 80)), 2)):
            s = rng.uniform(1, 3)
            draw.ellipse([x - s, y - s, x + s, y + s], fill=255)
    return image


def digit_part(images, rng):
    """Half of a test digit, two test digits over each other, or one with its quarters swapped (uint8 images)."""
    a = images[int(rng.integers(len(images)))]
    kind = int(rng.integers(3))
    if kind == 0:
        part = a.copy()
        if rng.random() < 0.5:
            part[14:] = 0  # the top half alone
        else:
            part[:, 14:] = 0  # the left half alone
    elif kind == 1:
        part = np.maximum(a, images[int(rng.integers(len(images)))])
    else:
        part = np.block([[a[14:, 14:], a[14:, :14]], [a[:14, 14:], a[:14, :14]]])
    return Image.fromarray(part).resize((SIDE, SIDE), Image.BILINEAR)


def training_part(images, labels, rng):
    """digit_part for training, never a digit itself: half of a digit only where the half taken away held at least
    a third of its ink and it is no 1 (half a 1 is a 1), two digits of different kinds over each other (neither a
    1: a 1 over a 7 is a crossed 7), or one with its quarters swapped."""
    while True:
        i, j = (int(k) for k in rng.integers(len(images), size=2))
        a, kind = images[i], int(rng.integers(3))
        if kind == 0 and labels[i] != 1:
            part = a.copy()
            if rng.random() < 0.5:
                part[14:] = 0  # the top half alone
            else:
                part[:, 14:] = 0  # the left half alone
            if part.sum() <= 2 / 3 * a.sum():
                return Image.fromarray(part).resize((SIDE, SIDE), Image.BILINEAR)
        elif kind == 1 and labels[i] != labels[j] and 1 not in (labels[i], labels[j]):
            return Image.fromarray(np.maximum(a, images[j])).resize((SIDE, SIDE), Image.BILINEAR)
        elif kind == 2:
            part = np.block([[a[14:, 14:], a[14:, :14]], [a[:14, 14:], a[:14, :14]]])
            return Image.fromarray(part).resize((SIDE, SIDE), Image.BILINEAR)


def drawn(family, rng, digits, sans="sans", labels=None):
    """One image (Pillow "L", light ink on black) of `family`; letters and symbols in the `sans` fonts' kind; parts
    of `digits` as digit_part makes them, or given their `labels` as training_part does."""
    if family.startswith("letters"):
        kind = family.split(", ")[1]
        return text_image(LETTERS[int(rng.integers(len(LETTERS)))], sans if kind == "sans" else kind, rng)
    if family == "symbols":
        return text_image(SYMBOLS[int(rng.integers(len(SYMBOLS)))], sans, rng)
    if family == "scribbles":
        return scribble(rng)
    if family == "shapes":
        return shape(rng)
    if family == "blots and noise":
        return blots(rng)
    return digit_part(digits, rng) if labels is None else training_part(digits, labels, rng)


def generate(family, count, seed, test_images):
    """`count` images of one family (a key of FAMILIES) as PNG bytes, dark ink on light paper; the same seed gives
    the same images. `test_images`: MNIST's test digits (uint8 (N, 28, 28)), for the parts of digits."""
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        # dark ink on light paper
        Image.fromarray(255 - np.asarray(drawn(family, rng, test_images))).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def typed_digits(count, seed):
    """`count` digits typed in the TRAINING_SANS faces as training_images draws the letters, float32 (count, 28,
    28) prepared as predict prepares one digit, and their labels (count,) int64: positives drawn the way the
    negatives are, so that a typed look never marks a non-digit."""
    rng = np.random.default_rng([seed, len(FAMILIES) + 1])
    labels = np.arange(count) % 10
    return np.stack([prepared(text_image(str(d), "training sans", rng)) for d in labels]), labels.astype(np.int64)


def prepared(image):
    """An image (Pillow "L", light ink on black) as predict prepares one digit (digit_image.read_digit's steps):
    float32 (28, 28); digit_image.ImageError if it is blank."""
    import digit_image  # numpy and Pillow only, as this module
    return digit_image.centred(digit_image.ink_of(np.asarray(image, np.float32) / 255, "a drawn image"))


def training_images(count, seed, train_images=None, train_labels=None, families=None):
    """`count` negatives to train a declining reader on, float32 (count, 28, 28) prepared as predict prepares one
    digit (digit_image.read_digit's steps): the families not HELD_OUT in turn, letters and symbols in every face
    of TRAINING_SANS, parts of digits made from `train_images` (uint8 (N, 28, 28): MNIST's training digits, their
    `train_labels`) as training_part makes them; only `families` (of those) when given.
    The same seed gives the same images; an image that comes out blank is drawn again."""
    import digit_image
    families = families or [f for f in FAMILIES if f not in HELD_OUT]
    assert not set(families) & set(HELD_OUT)
    rng = np.random.default_rng([seed, len(FAMILIES)])  # a stream of its own, apart from generate's
    out = []
    while len(out) < count:
        image = drawn(families[len(out) % len(families)], rng, train_images, "training sans", train_labels)
        try:
            out.append(prepared(image))
        except digit_image.ImageError:
            continue
    return np.stack(out)


ROW_FAMILIES = ("letters, sans", "symbols", "scribbles")  # the marks a row reader learns to find among digits


def as_uint8(prepared_images):
    """Images prepared as predict prepares a digit (normalised float32 (N, 28, 28)) as MNIST's uint8 pixels."""
    import digit_image
    return np.round((prepared_images * digit_image.STD + digit_image.MEAN) * 255).clip(0, 255).astype(np.uint8)
