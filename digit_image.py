"""Images of handwriting as MNIST's digits, with numpy, Pillow and scipy alone (no torch): the one preparation
that `predict`, the server and the UCI scoring share; digits.js is the same in the browser.

    reading, probs = read_number("number.png", probabilities, row_frames)  # the networks as functions

An image holds one line of digits written left to right (one digit is a line of one). The row reader (a
model.RowNet, run by torch or onnxruntime as `row_frames`) reads the line's ink as a whole and says how many
digits there are and where (row_digits); the ink is parted between them, a connected piece wholly to one digit
unless it spans a parting (digits that touch), where it is cut. Each digit is then prepared as MNIST's were
(centred): cropped to its ink, its longer side scaled to 20 px, placed by its centre of mass in 28x28,
normalised, and read by the digit network (`probabilities`); where a digit was cut or the digit network is
unsure, the row reader's probabilities count too (combined). How well numbers read: `evaluate --numbers`.
"""
import base64
import functools
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
INK = 0.2  # a pixel is ink above this share of the darkest stroke: faint noise and anti-aliasing are not
SPECK = 0.03  # a piece with less ink than this share of the largest piece's is a speck, dropped
ONE_DIGIT_WIDTH = 1.1  # ink no wider than this many times its height may be one digit the row reader parted
UNSURE = 0.5  # below this top probability, a digit's reading is also the row reader's (combined) ...
ROW_WEIGHT = 3.0  # ... whose probabilities count as their cube there (combined)
OWN_SHARE = 0.8  # a piece of ink with this share of its ink between one digit's partings is wholly that digit's
MARK_SURE = 0.5  # a mark the row reader says is no digit is read all the same when the digit network is this sure


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

@functools.lru_cache(maxsize=4096)
def resize_weights(n_in, n_out):
    """(n_out, n_in): the triangle filter torch's and Pillow's antialiased bilinear resize use, widened by the
    scale when reducing, each row normalised over the pixels inside the image."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale
    lo = np.maximum((centre - support + 0.5).astype(int), 0)[:, None]  # int(): towards zero, as torch's kernel
    hi = np.minimum((centre + support + 0.5).astype(int), n_in)[:, None]
    j = np.arange(n_in)
    weights = np.maximum(0.0, 1 - np.abs((j + 0.5 - centre[:, None]) / support)) * ((j >= lo) & (j < hi))
    # each row's sum over its own pixels alone, in numpy's order for them: the weights to the last bit that the
    # shipped readers were trained and measured with
    total = np.array([w[a:b].sum() for w, a, b in zip(weights, lo[:, 0].tolist(), hi[:, 0].tolist())])
    return weights / total[:, None]


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


# --- a row as the row reader sees it ----------------------------------------------------------------------

ROW_HEIGHT = 32  # the row reader's input height (model.RowNet) ...
ROW_INK = 24  # ... with the row's ink scaled to this height, centred ...
ROW_MARGIN = 8  # ... and this many blank columns before and after
ROW_MAX_WIDTH = 1024  # a row is never scaled wider than this (a long flat stroke)
ROW_FRAME = 2  # columns of the row per output frame of the row reader
MARK = 10  # greedy_digits' "digit" for a mark that is no digit (a row reader's 12th class, model.RowNet(marks=True))


def row_input(ink):
    """A line's ink (H, W) as the row reader reads it: ((ROW_HEIGHT, width) float32 normalised as MNIST's digits,
    width even, (x0, scale)): the ink cropped to its box, scaled to ROW_INK px high, between margins; column c of
    it is column x0 + (c - ROW_MARGIN) / scale of the ink."""
    ys, xs = np.nonzero(ink > INK)
    a = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float64)
    scale = min(ROW_INK / a.shape[0], (ROW_MAX_WIDTH - 2 * ROW_MARGIN) / a.shape[1])
    h, w = max(1, round(a.shape[0] * scale)), max(1, round(a.shape[1] * scale))
    a = (resize_weights(a.shape[0], h) @ a @ resize_weights(a.shape[1], w).T).clip(0, 1)
    width = w + 2 * ROW_MARGIN + (w % 2)
    row = np.zeros((ROW_HEIGHT, width), np.float32)
    top = (ROW_HEIGHT - h) // 2
    row[top:top + h, ROW_MARGIN:ROW_MARGIN + w] = a
    return ((row - MEAN) / STD).astype(np.float32), (int(xs.min()), scale)


def greedy_digits(log_probs):
    """The digits a row reader's frames (11 or 12, T) say, by CTC's best path (each frame's likeliest class, repeats
    merged, blanks dropped): [(digit, first frame, last frame)] left to right, a mark that is no digit as MARK."""
    best = np.asarray(log_probs).argmax(0)
    found = []
    for t, c in enumerate(best.tolist()):
        if c == 0:
            continue
        if t > 0 and best[t - 1] == c:
            found[-1][2] = t
        else:
            found.append([c - 1, t, t])
    return [tuple(f) for f in found]


# --- a line of digits --------------------------------------------------------------------------------------

@dataclass
class Reading:
    """The digits found in an image, left to right: digits (N, 28, 28) normalised, boxes [x0, y0, x1, y1] in
    the file's pixels (x1, y1 past the end), a note when part of the image was left out, and what the row reader
    said of each digit (row_digits)."""
    digits: np.ndarray
    boxes: list
    note: str = ""
    masks: list = field(default_factory=list, repr=False)  # each digit's ink, in the decoded image
    row_probabilities: list = field(default_factory=list, repr=False)  # (10,) each, the row reader's own
    cut: list = field(default_factory=list, repr=False)  # whether each digit's ink was cut from its neighbour's
    marked: list = field(default_factory=list, repr=False)  # whether the row reader found a mark, no digit, there


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


def row_digits(ink, row_frames):
    """The digits in one line of ink as the row reader finds them, left to right: ([boolean mask (H, W) of each
    digit], note, [the row reader's probabilities (10,) of each], [whether each was cut from a neighbour], [whether
    the row reader found a mark that is no digit there]). row_frames reads a row_input (ROW_HEIGHT, W) into its
    frames (11, or 12 with a mark class, W / ROW_FRAME) of log-probabilities. Each
    digit the frames say is there stands at the centre of its frames; neighbours part at the column of least ink
    between their centres. A piece of ink that lies mostly (OWN_SHARE) between one digit's partings is that
    digit's whole (a 7's bar over its neighbour, a broken stroke); a piece across a parting (digits that touch)
    is cut there. Frames that say no digit: the ink is read as one, the row reader's probabilities even."""
    mask, note = one_line(ink)
    ink = ink * mask
    row, (x0, scale) = row_input(ink)
    frames = np.asarray(row_frames(row))
    found = greedy_digits(frames)
    if len(found) <= 1:
        return [mask], note, [row_probabilities(frames, *found[0][1:]) if found else np.full(10, 0.1)], [False], \
            [bool(found) and found[0][0] == MARK]
    centres = [x0 + (a + b + 1 - ROW_MARGIN) / scale for _, a, b in found]  # frame t is row columns 2t, 2t + 1
    columns, last = ink.sum(0), ink.shape[1] - 1
    partings = []
    for left, right in zip(centres, centres[1:]):  # between neighbours' centres, the middle 60%
        lo = min(max(int(left + 0.2 * (right - left)), 1), last)
        hi = min(max(int(np.ceil(right - 0.2 * (right - left))), lo), last)
        middle = (left + right) / 2
        partings.append(min(range(lo, hi + 1), key=lambda x: (columns[x], abs(x - middle))))
    edges = [0, *partings, ink.shape[1]]
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    slot_of_column = np.searchsorted(np.asarray(partings), np.arange(ink.shape[1]), side="right")
    masks, cut = [np.zeros_like(mask) for _ in found], [False] * len(found)
    masses = ndimage.sum_labels(ink, labels, range(1, count + 1))
    for k in range(1, count + 1):
        if masses[k - 1] < SPECK * masses.max():
            continue
        own = labels == k
        per_slot = np.bincount(slot_of_column, weights=(ink * own).sum(0), minlength=len(found))
        if per_slot.max() >= OWN_SHARE * per_slot.sum():
            masks[int(per_slot.argmax())] |= own
        else:
            for i in range(len(found)):
                masks[i][:, edges[i]:edges[i + 1]] |= own[:, edges[i]:edges[i + 1]]
                cut[i] |= bool(own[:, edges[i]:edges[i + 1]].any())
    for i, m in enumerate(masks):  # a digit left with no ink takes what lies between its partings
        if not m.any():
            m[:, edges[i]:edges[i + 1]] = mask[:, edges[i]:edges[i + 1]]
            cut[i] = True
    keep = [i for i, m in enumerate(masks) if m.any()]
    return [masks[i] for i in keep], note, [row_probabilities(frames, *found[i][1:]) for i in keep], \
        [cut[i] for i in keep], [found[i][0] == MARK for i in keep]


def row_probabilities(frames, first, last):
    """The row reader's probabilities (10,) of the digit it read in frames first..last: their mean, blank (and a
    mark) left out."""
    p = np.exp(frames[1:11, first:last + 1]).mean(1)
    return p / p.sum()


def one_line(ink):
    """(the ink over INK in the one line of writing read, note): with several lines (lines_of), the one with the
    most ink, and a note saying so."""
    mask = ink > INK
    lines = lines_of(mask)
    if len(lines) == 1:
        return mask, ""
    weight = [ink[top:bottom].sum() for top, bottom in lines]
    pick = int(np.argmax(weight))
    keep = np.zeros_like(mask)
    keep[slice(*lines[pick])] = True
    return mask & keep, f"{len(lines)} lines of writing: read the one with the most ink (line {pick + 1} from the top)"


def own_ink(ink, mask):
    """A digit's ink: what lies within one pixel of its own strokes (their anti-aliased edges included)."""
    return ink * ndimage.binary_dilation(mask, np.ones((3, 3)))


def read_digits(path, rows, name=None, max_pixels=None, max_digits=MAX_DIGITS, judge=None, threshold=0.0):
    """The digits written in a row in an image file, as a Reading: found by the row reader (`rows`, see
    row_digits), each prepared as MNIST's were. Ink no wider than ONE_DIGIT_WIDTH x its height that the row
    reader parts is one digit if `judge` (the digit network's probabilities of prepared digits, (N, 28, 28) ->
    (N, 10)) is surer of it whole than the parts' answers (combined) are together, and one mark that is not a
    digit if the judge declines it whole (its top probability under `threshold`: a letter is not two digits). An
    image read as one digit, nothing left out, reads exactly as read_digit does; more than max_digits digits is
    an ImageError."""
    name = path if name is None else name
    gray, scale = decode(path, name, max_pixels)
    ink = ink_of(gray, name)
    masks, note, row_probs, cut, marked = row_digits(ink, rows)
    digits = [centred(own_ink(ink, m)) for m in masks]
    ys, xs = np.nonzero(ink > INK)
    if len(masks) > 1 and not note and judge is not None and np.ptp(xs) + 1 <= ONE_DIGIT_WIDTH * (np.ptp(ys) + 1):
        # no wider than one digit can be: one digit (a broken 5, a wide 0), unless the parts, read as they would
        # be answered (combined), are surer together than the digit network of the whole
        probs = judge(np.stack([centred(ink), *digits]))
        parts = combined(Reading(probs[1:], [], row_probabilities=row_probs, cut=cut), probs[1:])
        if probs[0].max() >= np.prod(parts.max(1)) or probs[0].max() < threshold:
            masks, row_probs, cut, marked = [ink > INK], [np.full(10, 0.1)], [False], [all(marked)]
    if len(masks) > max_digits:
        raise ImageError(f"{name}: {len(masks)} digits found, more than the {max_digits} a number may have")
    if len(masks) == 1 and np.array_equal(masks[0], ink > INK):
        digits = [centred(ink)]  # nothing left out: the whole image, exactly as one digit is read
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([round(xs.min() * scale), round(ys.min() * scale), round((xs.max() + 1) * scale),
                      round((ys.max() + 1) * scale)])
    return Reading(np.stack(digits), boxes, note, masks, row_probs, cut, marked)


def combined(reading, probabilities):
    """Each digit's probabilities (N, 10) from the digit network's (N, 10): as they are for a digit whose ink is
    its own and which the digit network is sure of; their product with the row reader's (Reading.row_probabilities)
    raised to ROW_WEIGHT, renormalised, for one cut from a neighbour (digits that touch or overlap: its crop holds
    some of the neighbour's ink) or whose top probability is under UNSURE (a broken stroke), since the row reader
    was trained on such rows and the digit network on whole digits alone. Both chosen on validation rows
    (docs/experiments.md). The product keeps the digit network's total: what a network with a "not a digit" output
    gives that, it still gives."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    both = probabilities * np.asarray(reading.row_probabilities, dtype=np.float64) ** ROW_WEIGHT
    both *= probabilities.sum(1, keepdims=True) / both.sum(1, keepdims=True)
    unsure = np.asarray(reading.cut) | (probabilities.max(1) < UNSURE)
    return np.where(unsure[:, None], both, probabilities)


def read_number(path, probabilities, rows, name=None, max_pixels=None, threshold=0.0):
    """(Reading, probabilities (N, 10)) of the number in an image file: read_digits with the digit network's
    `probabilities` ((N, 28, 28) -> (N, 10)) as the judge, the confidence under which it declines (`threshold`)
    and the row reader's `rows`, then combined: what `predict`, the server and the page answer, whichever runs
    the networks (torch or onnxruntime)."""
    reading = read_digits(path, rows, name, max_pixels, judge=probabilities, threshold=threshold)
    return reading, combined(reading, probabilities(reading.digits))


# --- answers -----------------------------------------------------------------------------------------------

def preview_png(digit):
    """A prepared digit (28, 28), normalised, as a data: URL of a 28x28 greyscale PNG (ink white)."""
    pixels = np.round(np.clip(digit * STD + MEAN, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def declined(probabilities, threshold, marked=()):
    """(N,) bool: the marks a reader does not read ("not a digit"): an image read as one mark whose top probability
    is under `threshold` (its digit network's; 0: one that never declines), and a mark the row reader found to be
    no digit (`marked`, Reading.marked) unless the digit network reads it at MARK_SURE or more. Other marks of a
    number are all read: cut from their neighbours, 2-3% of real digits there read under any useful threshold
    (docs/experiments.md, 2026-12-07)."""
    probabilities = np.asarray(probabilities)
    top = probabilities.max(1)
    unread = (top < threshold) & (len(probabilities) == 1)
    if len(marked):
        unread |= np.asarray(marked, bool) & (top < MARK_SURE)
    return unread


def describe(probabilities, threshold=0.0, marked=()):
    """`predict`'s line for one image's digits (probabilities (N, 10)): one digit and its three likeliest,
    "7  (7 99.8%, 2 0.1%, 3 0.1%)"; a number and each digit's confidence, "45  (4 99.9%, 5 99.1%)", a mark that is
    no digit as ? with its best guess, "4?5  (4 99.9%, ? 7 2.0%, 5 99.1%)"; an image of one mark declined
    (`declined`), "not a digit  (best guess 4, 31.0%)"."""
    digits, unread = probabilities.argmax(1), declined(probabilities, threshold, marked)
    if len(probabilities) == 1 and unread[0]:
        return f"not a digit  (best guess {digits[0]}, {100 * float(probabilities[0].max()):.1f}%)"
    if len(probabilities) == 1:
        top = np.argsort(-probabilities[0], kind="stable")[:3]
        return f"{top[0]}  (" + ", ".join(f"{d} {100 * float(probabilities[0][d]):.1f}%" for d in top) + ")"
    return "".join("?" if u else str(d) for d, u in zip(digits, unread)) + "  (" + ", ".join(
        ("? " if u else "") + f"{d} {100 * float(p[d]):.1f}%" for d, p, u in zip(digits, probabilities, unread)) + ")"


def answer(reading, probabilities, threshold=0.0, previews=True):
    """What `predict --json` and /predict say of a Reading, given each digit's probabilities (N, 10):
    {"number", "digits": [{"digit", "probabilities", "box", "preview", "declined"}], "not_a_digit", "note"?}; an
    image of one digit also has that digit's "digit", "probabilities" and "preview" at the top level. A mark
    declined (`declined`) has its best guess as "digit" and a ? in "number"; "not_a_digit" is true when every mark
    is declined (no digit was read: an image of a letter, not 4?89)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    unread = declined(probabilities, threshold, reading.marked)
    digits = []
    for digit, probs, box, no in zip(reading.digits, probabilities, reading.boxes, unread):
        item = {"digit": int(probs.argmax()), "probabilities": [round(float(p), 6) for p in probs], "box": box,
                "declined": bool(no)}
        if previews:
            item["preview"] = preview_png(digit)
        digits.append(item)
    result = {"number": "".join("?" if d["declined"] else str(d["digit"]) for d in digits), "digits": digits,
              "not_a_digit": bool(unread.all())}
    if reading.note:
        result["note"] = reading.note
    if len(digits) == 1:
        result.update({k: v for k, v in digits[0].items() if k not in ("box", "declined")})
    return result
