"""Images of handwriting as MNIST's digits, with numpy, Pillow and scipy alone (no torch): the one preparation
that `predict`, the server and the UCI scoring share.

    reading = read_digits("number.png", judge=...)   # reading.digits (N, 28, 28), normalised; .boxes; .note

An image holds one line of digits written left to right (one digit is a line of one). The line's ink is cut
into digits (find_digits): connected pieces of ink; specks dropped; pieces one above the other joined (a 5's
flag), and a short piece beside its neighbour joined when the network (the judge) is surer of them as one digit
(an open 4, a broken stroke); a piece too wide for one digit cut where its ink is thinnest and the network is
surest of both parts. Each digit is then prepared as MNIST's were (centred): cropped to its ink, its longer side
scaled to 20 px, placed by its centre of mass in 28x28, normalised. How well numbers read: `evaluate --numbers`.
"""
import base64
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from errors import UserError

MEAN, STD = 0.1307, 0.3081  # MNIST's training pixels, as Normalize((0.1307,), (0.3081,)) uses them
MAX_SIDE = 1024  # an image larger than this on its longer side is reduced while it is decoded
EXIF_ORIENTATION = 0x0112  # the tag a phone writes instead of turning the pixels
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))  # test-time augmentation's views of a digit: (dx, dy)
MAX_DIGITS = 12  # a number longer than this is refused, not guessed at
ONE_DIGIT_WIDTH = 1.1  # ink no wider than this many times its height may be one digit in pieces: the network decides
INK = 0.2  # a pixel is ink above this share of the darkest stroke: faint noise and anti-aliasing are not
SPECK = 0.03  # a piece with less ink than this share of the largest piece's is a speck, dropped
PART_HEIGHT = 0.6  # a piece shorter than this share of the tallest piece may be part of its neighbour ...
PART_GAP = 0.3  # ... when it is this close to it (a share of the tallest piece's height): the judge decides
PART_HEIGHT_UNJUDGED = 0.45  # with no judge, a piece shorter than this share of the tallest is part of its neighbour
PART_GAP_UNJUDGED = 0.08  # ... when it is this close to it (a share of the tallest piece's height)
TOUCHING_WIDTH = 0.9  # a piece wider than this share of the tallest piece's height may be digits that touch ...
SPLIT_WIDTH = 1.25  # ... and one wider than this is: the judge decides where they part
SPLIT_WIDTH_ALONE = 2.0  # the same for the only piece in an image (a wide digit alone has no line to be measured by)
CUTS_TRIED = 3  # the thinnest columns tried as a cut between touching digits
SPLIT_WIDTH_UNJUDGED = 1.6  # with no judge, a piece wider than this share of the tallest is cut at its thinnest column


class ImageError(UserError):
    """An image file could not be read as a digit or a number; the message names the file."""


# --- decoding ----------------------------------------------------------------------------------------------

def read_gray(path, name=None, max_pixels=None):
    """An image file (a path, or a binary file object named `name` in messages) as float32 (H, W) in [0, 1]."""
    return decode(path, name, max_pixels)[0]


def decode(path, name=None, max_pixels=None):
    """(greyscale float32 (H, W) in [0, 1], how many pixels of the file one of it stands for): turned upright as
    its EXIF orientation says (a phone photo), transparency composited on white, 16-bit scaled down. With
    max_pixels, a larger image is refused from its header, before it is decoded (the server's bound on what an
    upload can cost). An image over MAX_SIDE is reduced to at most MAX_SIDE by a box filter as soon as it is
    decoded (a JPEG decodes at a fraction of its size), so what follows costs at most a few MB."""
    path_text = path if name is None else name
    try:
        with Image.open(path) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageError(f"{path_text}: {img.width}x{img.height} pixels is too large "
                                 f"(at most {max_pixels:,})")
            width, height = img.size  # of the file: the boxes of read_digits are in its pixels
            if max(img.size) > MAX_SIDE:
                img.draft(img.mode, (MAX_SIDE, MAX_SIDE))  # JPEG only: decoded at 1/2, 1/4 or 1/8 scale
            img.load()
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
                width = height if orientation in (5, 6, 7, 8) else width  # turned a quarter
            if max(img.size) > MAX_SIDE:
                # Pillow reduces these modes as they are; the others are widened first.
                img = img if img.mode in ("L", "LA", "RGB", "RGBA", "I", "F") else \
                    img.convert({"I;16": "I", "1": "L"}.get(img.mode, "RGBA"))
                img = img.reduce(-(-max(img.size) // MAX_SIDE))
            scale = width / img.width
            if img.mode.startswith("I"):  # 16- or 32-bit integer greyscale
                a = np.asarray(img, dtype=np.float64)
                return (a / (255.0 if a.max() <= 255 else 65535.0)).clip(0, 1).astype(np.float32), scale
            if "A" in img.getbands() or "transparency" in img.info:
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0, scale
    except FileNotFoundError:
        raise ImageError(f"{path_text}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path_text}: is a directory, not an image") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{path_text}: too large to be read safely (over {Image.MAX_IMAGE_PIXELS * 2:,} pixels)") \
            from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path_text}: not a readable image ({type(e).__name__})") from None


def ink_of(gray, name):
    """Ink in [0, 1] on a background of 0, its darkest stroke 1: inverted when the background (the border's
    median) is light, as MNIST is light ink on black; the background subtracted, whatever its shade."""
    border = np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]))
    if border > 0.5:
        gray, border = 1 - gray, 1 - border
    ink = np.clip(gray - border, 0, None)
    if ink.max() < 0.1:
        raise ImageError(f"{name}: blank image, no digit found")
    return (ink / ink.max()).astype(np.float32)


# --- one digit as MNIST's were -----------------------------------------------------------------------------

def resize_weights(n_in, n_out):
    """(n_out, n_in): the triangle filter torch's and Pillow's antialiased bilinear resize use, widened by the
    scale when reducing, each row normalised over the pixels inside the image."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        w = np.maximum(0.0, 1 - np.abs((np.arange(lo, hi) + 0.5 - centre) / support))
        weights[i, lo:hi] = w / w.sum()
    return weights


def centred(ink):
    """One digit's ink (H, W) as MNIST's digits were made: (28, 28) float32, normalised. Cropped to the ink
    (pixels over INK), the longer side scaled to 20 px keeping the aspect ratio, placed in 28x28 with its centre
    of mass at the centre."""
    ys, xs = np.nonzero(ink > INK)
    a = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float64)
    scale = 20 / max(a.shape)
    h, w = max(1, round(a.shape[0] * scale)), max(1, round(a.shape[1] * scale))
    a = (resize_weights(a.shape[0], h) @ a @ resize_weights(a.shape[1], w).T).astype(np.float32).clip(0, 1)
    mass = a.sum(dtype=np.float64)
    cy = (a.sum(1, dtype=np.float64) * np.arange(h)).sum() / mass
    cx = (a.sum(0, dtype=np.float64) * np.arange(w)).sum() / mass
    top = min(max(round(13.5 - cy), 0), 28 - h)
    left = min(max(round(13.5 - cx), 0), 28 - w)
    canvas = np.zeros((28, 28), np.float32)
    canvas[top:top + h, left:left + w] = a
    return ((canvas - MEAN) / STD).astype(np.float32)


def read_digit(path, name=None, max_pixels=None):
    """The whole image as one digit (28, 28): the preparation of an image of a single digit."""
    return centred(ink_of(read_gray(path, name, max_pixels), path if name is None else name))


# --- a line of digits --------------------------------------------------------------------------------------

@dataclass
class Reading:
    """The digits found in an image, left to right: digits (N, 28, 28) normalised, boxes [x0, y0, x1, y1] in
    the file's pixels (x1, y1 past the end), and a note when part of the image was left out."""
    digits: np.ndarray
    boxes: list
    note: str = ""
    masks: list = field(default_factory=list, repr=False)  # each digit's ink, in the decoded image


def lines_of(mask):
    """[(top, bottom)] of the bands of rows with ink, apart by at least a third of the taller band's height."""
    rows = np.flatnonzero(mask.any(1))
    bands = [[rows[0], rows[0] + 1]]
    for r in rows[1:]:
        top, bottom = bands[-1]
        if r == bottom:
            bands[-1][1] = r + 1
        else:
            bands.append([r, r + 1])
    merged = [bands[0]]
    for top, bottom in bands[1:]:  # a band that is close to the one above is part of its line (a 5's flag)
        gap, tall = top - merged[-1][1], max(bottom - top, merged[-1][1] - merged[-1][0])
        if gap < tall / 3:
            merged[-1][1] = bottom
        else:
            merged.append([top, bottom])
    return [tuple(b) for b in merged]


@dataclass(frozen=True)
class Group:
    """Pieces of ink taken as one digit so far: their bounding box (x1, y1 past the end) and their labels."""
    x0: int
    x1: int
    y0: int
    y1: int
    pieces: frozenset

    @property
    def width(self):
        return self.x1 - self.x0

    @property
    def height(self):
        return self.y1 - self.y0

    def overlap(self, other):
        """How many columns the two share; negative: the gap between them."""
        return min(self.x1, other.x1) - max(self.x0, other.x0)

    def joined(self, other):
        return Group(min(self.x0, other.x0), max(self.x1, other.x1), min(self.y0, other.y0), max(self.y1, other.y1),
                     self.pieces | other.pieces)


def find_digits(ink, judge=None):
    """The digits in one line of ink, left to right: ([boolean mask (H, W) of each digit], note). judge, given
    prepared digits (N, 28, 28), says how sure the network is of each (N,): it decides whether neighbouring
    pieces are one digit (a broken stroke, an open 4, a 5's flag) and whether a wide piece is digits that touch.
    Without one, a short piece close to its neighbour is part of it and only a very wide piece is split."""
    mask = ink > INK
    lines, note = lines_of(mask), ""
    if len(lines) > 1:
        weight = [ink[top:bottom].sum() for top, bottom in lines]
        pick = int(np.argmax(weight))
        note = f"{len(lines)} lines of writing: read the one with the most ink (line {pick + 1} from the top)"
        keep = np.zeros_like(mask)
        keep[slice(*lines[pick])] = True
        mask &= keep
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    masses = ndimage.sum_labels(ink, labels, range(1, count + 1))
    # Each piece that is not a speck, left to right; pieces are then joined into groups of the same kind.
    groups = [Group(s[1].start, s[1].stop, s[0].start, s[0].stop, frozenset([i + 1]))
              for i, s in enumerate(ndimage.find_objects(labels)) if masses[i] >= SPECK * masses.max()]
    groups.sort(key=lambda g: (g.x0 + g.x1) / 2)
    cache = {}

    def sure(sets):  # the judge's confidence in each set of pieces read as one digit, each asked once
        new = list(dict.fromkeys(s for s in sets if s not in cache))
        if new:
            cache.update(zip(new, judge(np.stack([centred(own_ink(ink, np.isin(labels, list(s)))) for s in new]))))
        return [cache[s] for s in sets]

    i = 0
    while i < len(groups) - 1:  # pieces one above the other are one digit (a 5's flag, a broken 1)
        a, b = groups[i], groups[i + 1]
        if a.overlap(b) >= 0.5 * min(a.width, b.width):
            groups[i:i + 2], i = [a.joined(b)], 0
        else:
            i += 1
    tallest = max(g.height for g in groups)
    part_height, part_gap = (PART_HEIGHT_UNJUDGED, PART_GAP_UNJUDGED) if judge is None else (PART_HEIGHT, PART_GAP)
    while len(groups) > 1:  # then neighbours close enough to be one digit, the likeliest pair first
        short = [g.height < part_height * tallest for g in groups]
        pairs = [i for i, (a, b) in enumerate(zip(groups, groups[1:])) if (short[i] or short[i + 1]) and
                 -a.overlap(b) <= part_gap * tallest and a.joined(b).width <= 1.2 * tallest]
        if judge is None:
            gains = [1.0] * len(pairs)
        else:
            c = sure([s for i in pairs for s in (groups[i].pieces, groups[i + 1].pieces,
                                                  groups[i].pieces | groups[i + 1].pieces)])
            gains = [c[3 * k + 2] - c[3 * k] * c[3 * k + 1] for k in range(len(pairs))]
        if not pairs or max(gains) <= 0:
            break
        i = pairs[int(np.argmax(gains))]
        groups[i:i + 2] = [groups[i].joined(groups[i + 1])]
    masks, force = [], SPLIT_WIDTH if len(groups) > 1 else SPLIT_WIDTH_ALONE
    for group in groups:
        masks.extend(split_wide(np.isin(labels, list(group.pieces)), ink, judge, tallest, force))
    return masks, note


def own_ink(ink, mask):
    """A digit's ink: what lies within one pixel of its own strokes (their anti-aliased edges included)."""
    return ink * ndimage.binary_dilation(mask, np.ones((3, 3)))


def split_wide(piece, ink, judge, tallest, force=None):
    """A piece of ink as the digits it holds. A piece wider than TOUCHING_WIDTH x the line's tallest piece may be
    digits that touch: it is cut at each of its CUTS_TRIED thinnest columns in turn, and kept whole unless the judge
    is surer of both parts (the product of their confidences) than of the whole; wider than `force` x (SPLIT_WIDTH,
    or SPLIT_WIDTH_ALONE for the only piece in the image), it is never kept whole. Each part is looked at again."""
    force = SPLIT_WIDTH if force is None else force
    ys, xs = np.nonzero(piece)
    x0, x1 = xs.min(), xs.max() + 1
    if x1 - x0 <= TOUCHING_WIDTH * tallest or x1 - x0 < 6:
        return [piece]
    columns = (ink * piece).sum(0)
    inside = range(x0 + round(0.15 * (x1 - x0)), x0 + round(0.85 * (x1 - x0)))
    centre = (x0 + x1) / 2
    cuts = []
    for x in sorted(inside, key=lambda x: (columns[x], abs(x + 0.5 - centre))):
        if all(abs(x - c) >= 2 for c in cuts):
            cuts.append(x)
        if len(cuts) == (CUTS_TRIED if judge else 1):
            break
    options = []
    for cut in cuts:
        left, right = piece.copy(), piece.copy()
        left[:, cut:], right[:, :cut] = False, False
        if left.any() and right.any():
            options.append((left, right))
    if not options:
        return [piece]
    if judge is None:
        if x1 - x0 <= SPLIT_WIDTH_UNJUDGED * tallest:
            return [piece]
        left, right = options[0]
    else:
        sure = judge(np.stack([centred(own_ink(ink, m)) for m in [piece, *(m for o in options for m in o)]]))
        products = [sure[1 + 2 * k] * sure[2 + 2 * k] for k in range(len(options))]
        best = int(np.argmax(products))
        if products[best] <= sure[0] and x1 - x0 <= force * tallest:
            return [piece]
        left, right = options[best]
    return split_wide(left, ink, judge, tallest) + split_wide(right, ink, judge, tallest)


def read_digits(path, name=None, max_pixels=None, max_digits=MAX_DIGITS, judge=None):
    """The digits written in a row in an image file, as a Reading (judge: see find_digits). An image of one
    digit, nothing left out, reads exactly as read_digit does; more than max_digits digits is an ImageError."""
    name = path if name is None else name
    gray, scale = decode(path, name, max_pixels)
    ink = ink_of(gray, name)
    masks, note = find_digits(ink, judge)
    digits = [centred(own_ink(ink, m)) for m in masks]
    ys, xs = np.nonzero(ink > INK)
    if len(masks) > 1 and not note and judge is not None and np.ptp(xs) + 1 <= ONE_DIGIT_WIDTH * (np.ptp(ys) + 1):
        # no wider than one digit can be: one digit (a broken 5, a wide 4), unless the network is surer of the parts
        sure = judge(np.stack([centred(ink), *digits]))
        if sure[0] >= np.prod(sure[1:]):
            masks = [ink > INK]
    if len(masks) > max_digits:
        raise ImageError(f"{name}: {len(masks)} digits found, more than the {max_digits} a number may have")
    if len(masks) == 1 and not note and np.array_equal(masks[0], ink > INK):
        digits = [centred(ink)]  # nothing left out: the whole image, exactly as one digit is read
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([round(xs.min() * scale), round(ys.min() * scale), round((xs.max() + 1) * scale),
                      round((ys.max() + 1) * scale)])
    return Reading(np.stack(digits), boxes, note, masks)


# --- answers -----------------------------------------------------------------------------------------------

def preview_png(digit):
    """A prepared digit (28, 28), normalised, as a data: URL of a 28x28 greyscale PNG (ink white)."""
    pixels = np.round(np.clip(digit * STD + MEAN, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def describe(probabilities):
    """`predict`'s line for one image's digits (probabilities (N, 10)): one digit and its three likeliest,
    "7  (7 99.8%, 2 0.1%, 3 0.1%)"; a number and each digit's confidence, "45  (4 99.9%, 5 99.1%)"."""
    if len(probabilities) == 1:
        top = np.argsort(-probabilities[0], kind="stable")[:3]
        return f"{top[0]}  (" + ", ".join(f"{d} {100 * float(probabilities[0][d]):.1f}%" for d in top) + ")"
    digits = probabilities.argmax(1)
    return "".join(map(str, digits)) + "  (" + ", ".join(
        f"{d} {100 * float(p[d]):.1f}%" for d, p in zip(digits, probabilities)) + ")"


def answer(reading, probabilities, previews=True):
    """What `predict --json` and /predict say of a Reading, given each digit's probabilities (N, 10):
    {"number", "digits": [{"digit", "probabilities", "box", "preview"}], "note"?}; an image of one digit also
    has that digit's "digit", "probabilities" and "preview" at the top level."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    digits = []
    for digit, probs, box in zip(reading.digits, probabilities, reading.boxes):
        item = {"digit": int(probs.argmax()), "probabilities": [round(float(p), 6) for p in probs], "box": box}
        if previews:
            item["preview"] = preview_png(digit)
        digits.append(item)
    result = {"number": "".join(str(d["digit"]) for d in digits), "digits": digits}
    if reading.note:
        result["note"] = reading.note
    if len(digits) == 1:
        result.update({k: v for k, v in digits[0].items() if k != "box"})
    return result
