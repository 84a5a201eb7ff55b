"""Numbers written with MNIST digits: digits set side by side on a page, as a user writes a number, with the
digits (and the gap between them) known, so reading a whole number can be scored (`evaluate --numbers`).
"""
import io

import numpy as np
from PIL import Image

LENGTHS = range(2, 7)  # digits in a composed number
GAPS = range(0, 9)  # pixels between neighbouring digits at MNIST's 28-px scale; 0: their boxes touch


def compose(images, labels, count, seed=0):
    """`count` numbers written with MNIST digits (uint8 (N, 28, 28) numpy, labels (N,)), each
    (image uint8 (H, W), its digits as a string, its gap): LENGTHS digits drawn at random, each cropped
    to its ink, scaled by 0.8-1.2 and moved up or down by up to 3 px, set side by side GAPS px apart (one
    gap per number, so accuracy can be told by gap; ink that meets is kept at its brighter value), on a black
    page with an 8-px margin. The same seed gives the same numbers."""
    rng = np.random.default_rng(seed)
    numbers = []
    for _ in range(count):
        length, gap = int(rng.choice(LENGTHS)), int(rng.choice(GAPS))
        picks = rng.integers(0, len(labels), length)
        glyphs, shifts = [], []
        for i in picks:
            a = images[i]
            ys, xs = np.nonzero(a)
            crop = Image.fromarray(a[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
            scale = rng.uniform(0.8, 1.2)
            size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
            glyphs.append(np.asarray(crop.resize(size, Image.BILINEAR)))
            shifts.append(int(rng.integers(-3, 4)))
        height = 16 + max(g.shape[0] for g in glyphs) + 6
        page = np.zeros((height, 16 + sum(g.shape[1] for g in glyphs) + gap * (length - 1)), np.uint8)
        x = 8
        for g, dy in zip(glyphs, shifts):
            y = (height - g.shape[0]) // 2 + dy
            window = page[y:y + g.shape[0], x:x + g.shape[1]]
            np.maximum(window, g, out=window)
            x += g.shape[1] + gap
        numbers.append((page, "".join(str(int(labels[i])) for i in picks), gap))
    return numbers


def png(page):
    """A composed number (uint8 (H, W), light ink on black) as the bytes of a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(page, "L").save(buffer, format="PNG")
    return buffer.getvalue()
