"""Numbers written with MNIST digits: digits set side by side on a page, as a user writes a number, with the
digits (and the gap between them) known, so reading a whole number can be scored (`evaluate --numbers`).
"""
import io

import numpy as np
from PIL import Image
from scipy import ndimage

import digit_image

LENGTHS = range(2, 7)  # digits in a composed number
GAPS = range(0, 9)  # pixels between neighbouring digits at MNIST's 28-px scale; 0: their boxes touch
# The harder cases beside the 1,000 numbers of GAPS, each its own fixed seed: (gaps, strokes broken, seed).
CASES = {
    "2-8 px apart": (range(2, 9), False, 1),
    "touching, 0-1 px": ((0, 1), False, 2),
    "overlapping, -2 px": ((-2,), False, 3),
    "broken strokes, 2-8 px apart": (range(2, 9), True, 4),
}
BREAK = 4  # a broken stroke: this many pixels of ink erased around one point of the digit's middle rows


def compose(images, labels, count, seed=0, gaps=GAPS, broken=False):
    """`count` numbers written with MNIST digits (uint8 (N, 28, 28) numpy, labels (N,)), each
    (image uint8 (H, W), its digits as a string, its gap): LENGTHS digits drawn at random, each cropped
    to its ink, scaled by 0.8-1.2 and moved up or down by up to 3 px, set side by side `gaps` px apart (one
    gap per number, so accuracy can be told by gap; a negative gap overlaps them; ink that meets is kept at its
    brighter value), on a black page with an 8-px margin. With `broken`, half the digits have one stroke broken:
    a BREAK x BREAK square of ink erased around an inked pixel of their middle rows, as a pen that skips leaves
    it. The same seed gives the same numbers."""
    rng = np.random.default_rng(seed)
    numbers = []
    for _ in range(count):
        length, gap = int(rng.choice(LENGTHS)), int(rng.choice(gaps))
        picks = rng.integers(0, len(labels), length)
        numbers.append((written(images[picks], gap, rng, broken), "".join(str(int(labels[i])) for i in picks), gap))
    return numbers


def written(glyphs, gap, rng, broken=False):
    """A page (uint8 (H, W)) with `glyphs` (uint8 28x28 each, light on black) written side by side as compose
    writes them: each cropped to its ink, scaled by 0.8-1.2 (and with `broken`, half of them broken), moved up or
    down by up to 3 px, `gap` px apart, with an 8-px margin."""
    cropped, shifts = [], []
    for a in glyphs:
        ys, xs = np.nonzero(a)
        crop = Image.fromarray(a[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
        scale = rng.uniform(0.8, 1.2)
        size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
        glyph = np.asarray(crop.resize(size, Image.BILINEAR))
        if broken and rng.random() < 0.5:
            glyph = broken_stroke(glyph, rng)
        cropped.append(glyph)
        shifts.append(int(rng.integers(-3, 4)))
    height = 16 + max(g.shape[0] for g in cropped) + 6
    page = np.zeros((height, 16 + sum(g.shape[1] for g in cropped) + gap * (len(cropped) - 1)), np.uint8)
    x = 8
    for g, dy in zip(cropped, shifts):
        y = (height - g.shape[0]) // 2 + dy
        window = page[y:y + g.shape[0], x:x + g.shape[1]]
        np.maximum(window, g, out=window)
        x += g.shape[1] + gap
    return page


def with_marks(images, labels, marks, count, seed=0):
    """`count` numbers of 3-5 MNIST digits 2-8 px apart, one of them replaced by a mark that is no digit (`marks`:
    uint8 (M, 28, 28), light on black, as MNIST's digits are framed): (image, its digits with a ? for the mark,
    gap), written as compose writes them. The same seed gives the same numbers."""
    rng = np.random.default_rng(seed)
    numbers = []
    for _ in range(count):
        length, gap = int(rng.integers(3, 6)), int(rng.integers(2, 9))
        picks, where = rng.integers(0, len(labels), length), int(rng.integers(length))
        glyphs = [marks[int(rng.integers(len(marks)))] if k == where else images[i] for k, i in enumerate(picks)]
        text = "".join("?" if k == where else str(int(labels[i])) for k, i in enumerate(picks))
        numbers.append((written(np.stack(glyphs), gap, rng), text, gap))
    return numbers


def broken_stroke(glyph, rng):
    """`glyph` with a BREAK x BREAK square erased around one inked pixel of its middle rows (30-70% of its
    height), drawn from rng."""
    h = glyph.shape[0]
    band = glyph[int(0.3 * h):max(int(0.7 * h), int(0.3 * h) + 1)]
    ys, xs = np.nonzero(band > 127)
    if len(ys) == 0:
        return glyph
    k = int(rng.integers(len(ys)))
    y, x = ys[k] + int(0.3 * h), xs[k]
    glyph = glyph.copy()
    glyph[max(0, y - BREAK // 2):y + BREAK - BREAK // 2, max(0, x - BREAK // 2):x + BREAK - BREAK // 2] = 0
    return glyph


def png(page):
    """A composed number (uint8 (H, W), light ink on black) as the bytes of a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(page, "L").save(buffer, format="PNG")
    return buffer.getvalue()


MARK = digit_image.MARK  # a training row's label for a mark that is no digit (the row reader's class 11)


def training_row(images, labels, rng, marks=None, mark_share=0.0):
    """One row of handwriting to train the row reader on, drawn from rng: (ink float32 (H, W) in [0, 1], light on
    black, its digits as a list). 1 to 8 digits of `images` (uint8 (N, 28, 28)) as people write them: each 0.7-1.3
    times its size, 0.85-1.15 times as wide, the row slanted by up to 0.3, strokes thickened, thinned or made blocky
    (a small bitmap enlarged) for some rows, a third of the digits with a broken stroke; gaps from 4 px of overlap
    to wide (at MNIST's 28-px scale), each digit up or down by up to 3 px, on a baseline that drifts. With `marks`
    (uint8 (M, 28, 28) images that hold no digit), `mark_share` of the rows hold one or two of them in place of
    digits, labelled MARK, in a row whose glyphs never overlap (nothing more is drawn from rng without them)."""
    length = 1 if rng.random() < 0.2 else int(rng.integers(2, 9))
    picks = rng.integers(0, len(labels), length)
    marked = np.zeros(length, bool)
    if marks is not None and mark_share and rng.random() < mark_share:
        marked[rng.choice(length, size=min(length, int(rng.integers(1, 3))), replace=False)] = True
        picks = np.where(marked, rng.integers(0, len(marks), length), picks)
    slant = rng.uniform(-0.3, 0.3)
    stroke = rng.choice(["as written", "thicker", "thinner", "blocky"], p=[0.55, 0.2, 0.15, 0.1])
    gap = int(rng.integers(-4, 11)) if rng.random() < 0.9 else int(rng.integers(10, 31))
    if marked.any():  # a mark among digits stands apart: ink that overlaps is digits (a 1 into its neighbour)
        gap = max(gap, 1)
    drift = rng.uniform(-0.1, 0.1)
    glyphs = []
    for i, mark in zip(picks, marked):
        a = marks[i] if mark else images[i]
        ys, xs = np.nonzero(a)
        crop = Image.fromarray(a[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
        size = rng.uniform(0.7, 1.3)
        crop = crop.resize((max(1, round(crop.width * size * rng.uniform(0.85, 1.15))),
                            max(1, round(crop.height * size))), Image.BILINEAR)
        w, h = crop.size
        crop = crop.transform((w + int(abs(slant) * h) + 1, h), Image.AFFINE,
                              (1, slant, -slant * h if slant > 0 else 0, 0, 1, 0), Image.BILINEAR)
        glyph = np.asarray(crop)
        if stroke == "thicker":
            glyph = ndimage.grey_dilation(glyph, size=(2, 2))
        elif stroke == "thinner" and (glyph > 127).sum() > 60:
            glyph = ndimage.grey_erosion(glyph, size=(2, 1))
        elif stroke == "blocky":  # a bitmap of 8 px or so, enlarged without smoothing (UCI's digits as files)
            cells = max(1, round(glyph.shape[0] / rng.uniform(6, 10)))
            small = Image.fromarray(glyph).reduce(cells)
            glyph = np.asarray(small.resize((small.width * cells, small.height * cells), Image.NEAREST))
        if rng.random() < 1 / 3:
            glyph = broken_stroke(glyph, rng)
        glyphs.append(glyph)
    gaps = [gap + int(rng.integers(-1, 2)) for _ in range(length - 1)] + [0]
    width = 16 + sum(g.shape[1] for g in glyphs) + sum(gaps)
    height = 16 + max(g.shape[0] for g in glyphs) + 8 + int(abs(drift) * width)
    page = np.zeros((height, max(width, 16 + max(g.shape[1] for g in glyphs))), np.uint8)
    x = 8
    for g, after in zip(glyphs, gaps):
        y = (height - g.shape[0]) // 2 + int(rng.integers(-3, 4)) + round(drift * (x - width / 2))
        y = min(max(y, 0), height - g.shape[0])
        window = page[y:y + g.shape[0], x:x + g.shape[1]]
        np.maximum(window, g, out=window)
        x = max(8, x + g.shape[1] + after)
    return page.astype(np.float32) / max(int(page.max()), 1), [MARK if mark else int(labels[i])
                                                                for i, mark in zip(picks, marked)]
