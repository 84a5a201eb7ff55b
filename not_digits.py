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
FAMILIES = ("letters, sans", "letters, serif", "symbols", "scribbles", "shapes", "blots and noise",
            "parts of digits")
HELD_OUT = ("letters, serif", "shapes")  # never to be trained on
SIDE = 112  # pixels of each image, as a small scan or a phone's crop would be


class FontError(UserError):
    """A font the letters are drawn in is not installed; the message says which package has it."""


def font(kind, index, size):
    path = os.path.join(FONT_DIR, FONTS[kind][index % len(FONTS[kind])])
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        raise FontError(f"{path} is missing: install Debian's fonts-dejavu-core and fonts-liberation "
                        f"(apt-get install fonts-dejavu-core fonts-liberation)") from None


def check_fonts():
    """A FontError naming the package to install, before any work, when a font the letters need is missing."""
    for kind, paths in FONTS.items():
        for index in range(len(paths)):
            font(kind, index, 12)


def text_image(text, kind, rng):
    """One character in a font of `kind`, 55-85% of the image tall, turned by up to 10 degrees, off-centre."""
    image = Image.new("L", (SIDE, SIDE), 0)
    face = font(kind, int(rng.integers(2)), int(SIDE * rng.uniform(0.55, 0.85)))
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


def generate(family, count, seed, test_images):
    """`count` images of one family (a key of FAMILIES) as PNG bytes, dark ink on light paper; the same seed gives
    the same images. `test_images`: MNIST's test digits (uint8 (N, 28, 28)), for the parts of digits."""
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    out = []
    for _ in range(count):
        if family.startswith("letters"):
            image = text_image(LETTERS[int(rng.integers(len(LETTERS)))], family.split(", ")[1], rng)
        elif family == "symbols":
            image = text_image(SYMBOLS[int(rng.integers(len(SYMBOLS)))], "sans", rng)
        elif family == "scribbles":
            image = scribble(rng)
        elif family == "shapes":
            image = shape(rng)
        elif family == "blots and noise":
            image = blots(rng)
        else:
            image = digit_part(test_images, rng)
        buffer = io.BytesIO()
        Image.fromarray(255 - np.asarray(image)).save(buffer, format="PNG")  # dark ink on light paper
        out.append(buffer.getvalue())
    return out
