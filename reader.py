"""Reading digits and numbers from image files with a trained network: what `predict`, the server and
`evaluate --uci-digits / --numbers / --not-digits` answer, all through one path.

The row reader finds the digits of an image and each is prepared as MNIST's were by digit_image.py (numpy and
Pillow, shared with the torch-free server); here torch runs both networks, the digit network on one batch per image,
with test-time augmentation when the checkpoint's run was scored with it. The figures scored here (other writers'
digits, composed numbers) are what `python main.py predict` says of the same files.
"""
import copy
import io
import json
import time

import numpy as np
import torch
from tqdm import tqdm

import composed_numbers
import data_file
import digit_image
import model_train
import not_digits
import uci_digits


def checkpoint_tta(checkpoint):
    """Whether a checkpoint's run scored with test-time augmentation, so predictions should use it too."""
    config = checkpoint.get("config")
    return bool(config.get("tta")) if isinstance(config, dict) else False


def as_predict_runs(model):
    """A copy of `model` as `predict` runs it: on the CPU, in the layout a loaded checkpoint has, in eval mode
    (the caller's model, wherever it is, is left as it was)."""
    return copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()


def probabilities(model, digits, tta=False):
    """The probabilities (N, 10), numpy, of digits prepared by digit_image (numpy (N, 28, 28)), the model in eval
    mode (predict's on the CPU: as_predict_runs); with tta, averaged over each digit and its four one-pixel shifts."""
    images = torch.from_numpy(digits)[:, None].to(next(model.parameters()).device)
    return model_train.log_probabilities(model, images, tta).exp().cpu().numpy()


def decline_threshold(model):
    """The confidence under which `model` says "not a digit" (a not_digit network's threshold, set on validation
    after training); 0.0 for a network that never declines."""
    return float(model.threshold) if getattr(model, "not_digit", False) else 0.0


def digit_reader(model, checkpoint):
    """probabilities of a loaded checkpoint's network as a function of the digits, with TTA when its run was
    scored with it: what a serve.Predictor answers with."""
    tta, model = checkpoint_tta(checkpoint), as_predict_runs(model)
    return lambda digits: probabilities(model, digits, tta)


def row_reader(model):
    """A loaded row network (model.RowNet) as digit_image's row_frames: a row (ROW_HEIGHT, W) in, its frames
    (11, W / 2) of log-probabilities out, on the CPU."""
    model = as_predict_runs(model)

    @torch.inference_mode()
    def row_frames(row):
        return model(torch.from_numpy(row)[None, None])[0].numpy()
    return row_frames


def read_number(model, tta, rows, path, name=None, max_pixels=None):
    """The digits written in a row in an image file and their probabilities, the row reader `rows` a row_reader:
    digit_image.read_number's (Reading, numpy (N, 10)) with the network run by torch."""
    return digit_image.read_number(path, lambda digits: probabilities(model, digits, tta), rows, name, max_pixels,
                                   decline_threshold(model))


def predict_lines(model, tta, rows, paths, as_json=False):
    """What `python main.py predict` prints of each image file, as (line, kind): kind None for its answer (a line
    of digit_image.describe, or with `as_json` one JSON object), "declined" for an answer with no digit read in it
    (not a digit), "note" for what the reading noticed, "error" for a file that cannot be read; the other files are
    still read."""
    threshold = decline_threshold(model)
    for path in paths:
        try:
            reading, probs = read_number(model, tta, rows, path)
        except digit_image.ImageError as e:
            yield f"error: {e}", "error"
            continue
        kind = "declined" if digit_image.declined(probs, threshold, reading.marked).all() else None
        if as_json:
            answer = digit_image.answer(reading, probs, threshold, previews=False)
            keep = {k: answer[k] for k in ("number", "digits", "not_a_digit", "note") if k in answer}
            yield json.dumps({"file": path, **keep}), kind
            continue
        yield f"{path}: {digit_image.describe(probs, threshold, reading.marked)}", kind
        if reading.note:
            yield f"{path}: {reading.note}", "note"


def score_uci_digits(model, tta, rows, half="report", count=None, data_dir="./data", progress=False):
    """Accuracy in % on the UCI digits in each of uci_digits.FORMS, through predict's whole path: each digit's PNG
    file read by read_number (the row reader `rows`; TTA when the run used it), right when it is read as the one
    right digit, so each figure is what `python main.py predict` says of those files. Returns {form: accuracy}.
    half: "choose" or "report" (scikit-learn's 13 writers), or "unseen" (the 30 other writers, fetched into
    data_dir). count: only the first `count` digits (for tests). progress: a bar on stderr."""
    images, labels = uci_digits.unseen(data_dir) if half == "unseen" else uci_digits.known(half)
    images, labels = images[:count], labels[:count]
    result = {}
    model = as_predict_runs(model)
    bar = tqdm(total=len(labels) * len(uci_digits.FORMS), desc=f"UCI digits ({half})", disable=not progress,
               leave=False, mininterval=0.5, dynamic_ncols=True)
    for form in uci_digits.FORMS:
        right = 0
        for image, label in zip(images, labels.tolist()):
            png = io.BytesIO(uci_digits.png(image, form))
            _, probs = read_number(model, tta, rows, png, name=f"a UCI digit ({form})")
            right += len(probs) == 1 and int(probs[0].argmax()) == label
            bar.update()
        result[form] = 100 * right / len(labels)
    bar.close()
    return result


def score_number_cases(model, tta, rows, data_dir, count=500, progress=False):
    """score_numbers on each of composed_numbers.CASES (overlapping, touching, apart, broken strokes), `count`
    numbers each from its own seed: {case: score_numbers' result, with "ms": milliseconds per number}."""
    result = {}
    for name, (gaps, broken, seed) in composed_numbers.CASES.items():
        start = time.perf_counter()
        result[name] = score_numbers(model, tta, rows, data_dir, count, seed, gaps=gaps, broken=broken,
                                     progress=progress)
        result[name]["ms"] = 1000 * (time.perf_counter() - start) / count
    return result


def score_single_digits(model, tta, rows, data_dir, count=None, progress=False):
    """MNIST's test digits, each as its own PNG file (28x28, light on black), read by predict's whole path
    (read_number: a digit may be cut in two). Returns {"digits", "exact" (% read as the one right digit), "split"
    (% read as more than one digit)}; the other writers' split share is score_uci_splits'."""
    images, labels = data_file.read_split(data_dir, "test")
    images, labels = images[:count], labels[:count]
    model = as_predict_runs(model)
    right = split = 0
    for image, label in tqdm(list(zip(images.numpy(), labels.tolist())), desc="single digits",
                             disable=not progress, leave=False, mininterval=0.5, dynamic_ncols=True):
        _, probs = read_number(model, tta, rows, io.BytesIO(composed_numbers.png(image)), name="a test digit")
        right += len(probs) == 1 and int(probs[0].argmax()) == label
        split += len(probs) > 1
    return {"digits": len(labels), "exact": 100 * right / len(labels), "split": 100 * split / len(labels)}


def score_uci_splits(model, tta, rows, half="report", data_dir="./data", count=None, progress=False):
    """The share in % of other writers' single digits (uci_digits, each form's PNG files; the first `count`) that
    predict's whole path reads as more than one digit: {form: %}."""
    images, _ = uci_digits.unseen(data_dir) if half == "unseen" else uci_digits.known(half)
    images = images[:count]
    model = as_predict_runs(model)
    result = {}
    for form in uci_digits.FORMS:
        split = 0
        for image in tqdm(images, desc=f"UCI splits ({form})", disable=not progress, leave=False,
                          mininterval=0.5, dynamic_ncols=True):
            _, probs = read_number(model, tta, rows, io.BytesIO(uci_digits.png(image, form)), name="a UCI digit")
            split += len(probs) > 1
        result[form] = 100 * split / len(images)
    return result


def confidence_of(model, tta, rows, png, name, threshold=0.0):
    """How surely predict's path reads a digit in an image file, and whether it answers with digits: (the top
    probability of its surest mark, not declined under `threshold` (digit_image.declined)); (None, False) when
    it holds no mark (a blank image)."""
    try:
        reading, probs = read_number(model, tta, rows, io.BytesIO(png), name=name)
    except digit_image.ImageError:
        return None, False
    return float(probs.max()), not digit_image.declined(probs, threshold, reading.marked).all()


def read_singles(model, tta, rows, files, name, threshold, progress=False):
    """(declined (N,) bool, right (N,) bool) of each (png, label) in `files` read by predict's path: declined
    when it is "not a digit" (digit_image.declined under `threshold`), right when it is read as the one right
    digit."""
    unread, right = [], []
    for png, label in tqdm(files, desc=name, disable=not progress, leave=False, mininterval=0.5, dynamic_ncols=True):
        reading, probs = read_number(model, tta, rows, io.BytesIO(png), name=name)
        unread.append(bool(digit_image.declined(probs, threshold, reading.marked).all()))
        right.append(len(probs) == 1 and int(probs[0].argmax()) == label)
    return np.array(unread), np.array(right)


def score_declines(model, tta, rows, data_dir, count=None, progress=False):
    """What a reader that declines (decline_threshold) does to real digits, each file read by predict's path:
    MNIST's test digits (each its own PNG) and the 30 unseen UCI writers' (dark on light, 64 px; the first `count`
    of each). Returns {set: {"digits", "declined" (%), "accuracy" (% read as the one right digit and not declined),
    "accepted_accuracy" (% right of those not declined), "ece", "ece_before" (expected calibration error in %, of
    each file read whole as one digit, at the network's temperature and at 1)}}."""
    import calibration
    threshold = decline_threshold(model)
    images, labels = data_file.read_split(data_dir, "test")
    sets = {"MNIST test digits": [(composed_numbers.png(a), y) for a, y in
                                  zip(images[:count].numpy(), labels[:count].tolist())]}
    unseen, unseen_labels = uci_digits.unseen(data_dir)
    form = "dark on light, 64 px, bilinear"
    sets["30 unseen UCI writers"] = [(uci_digits.png(a, form), y) for a, y in
                                     zip(unseen[:count], unseen_labels[:count].tolist())]
    model = as_predict_runs(model)
    plain = copy.deepcopy(model)
    if getattr(plain, "not_digit", False):
        plain.temperature.fill_(1.0)
    result = {}
    for name, files in sets.items():
        unread, right = read_singles(model, tta, rows, files, name, threshold, progress)
        kept = ~unread
        whole = np.stack([digit_image.read_digit(io.BytesIO(png)) for png, _ in files])
        label = torch.tensor([y for _, y in files])
        ece = [calibration.expected_calibration_error(torch.from_numpy(np.concatenate(
            [probabilities(m, part, tta) for part in np.array_split(whole, -(-len(whole) // 1000))])), label)
            for m in (model, plain)]
        result[name] = {"digits": len(files), "declined": 100 * float(np.mean(unread)),
                        "accuracy": 100 * float(np.mean(right & kept)),
                        "accepted_accuracy": 100 * float(right[kept].mean()) if kept.any() else float("nan"),
                        "ece": ece[0], "ece_before": ece[1]}
    return result


def score_not_digits(model, tta, rows, data_dir, count=200, seed=0, digits=1000, progress=False):
    """Images that hold no digit (not_digits.FAMILIES, `count` each from `seed`) read through predict's path, against
    MNIST's first `digits` test digits as files of their own. Returns {family: {"images", "answered" (% read as
    digits, not declined under the reader's decline_threshold), "confidence" (their surest marks' mean), "auroc"
    (% chance a test digit is read more surely than one of these, by confidence_of)}}."""
    from sklearn.metrics import roc_auc_score  # scikit-learn takes a second to import: only here
    images, _ = data_file.read_split(data_dir, "test")
    images = images.numpy()
    threshold = decline_threshold(model)
    model = as_predict_runs(model)
    sure = [confidence_of(model, tta, rows, composed_numbers.png(a), "a test digit")[0] for a in images[:digits]]
    sure = [c for c in sure if c is not None]
    result = {}
    for family in tqdm(not_digits.FAMILIES, desc="not digits", disable=not progress, leave=False):
        found = [confidence_of(model, tta, rows, png, f"an image of {family}", threshold)
                 for png in not_digits.generate(family, count, seed, images)]
        answered = [c for c, read in found if read]
        # An image read as nothing ranks below every digit: it was declined.
        scores = [c if c is not None else -1.0 for c, _ in found]
        auroc = roc_auc_score([1] * len(sure) + [0] * len(scores), sure + scores)
        result[family] = {"images": count, "answered": 100 * len(answered) / count,
                          "confidence": 100 * float(np.mean(answered)) if answered else float("nan"),
                          "auroc": 100 * auroc}
    return result


def score_marked_numbers(model, tta, rows, data_dir, count=200, seed=9, progress=False):
    """Numbers of 3-5 test digits with one mark that is no digit among them (a serif letter or a shape: the
    families held out from training, composed_numbers.with_marks), read through predict's path. Returns {"numbers",
    "exact" (% read with every digit right and a ? for the mark), "answered" (% with the mark read as a digit)}."""
    images, labels = data_file.read_split(data_dir, "test")
    images = images.numpy()
    marks = np.concatenate([
        not_digits.as_uint8(np.stack([digit_image.read_digit(io.BytesIO(png))
                                      for png in not_digits.generate(family, count, seed, images)]))
        for family in not_digits.HELD_OUT])
    threshold = decline_threshold(model)
    model = as_predict_runs(model)
    exact = answered = 0
    numbers = composed_numbers.with_marks(images, labels.numpy(), marks, count, seed)
    for page, written, _ in tqdm(numbers, desc="numbers with a mark", disable=not progress, leave=False):
        reading, probs = read_number(model, tta, rows, io.BytesIO(composed_numbers.png(page)), name="a composed number")
        unread = digit_image.declined(probs, threshold, reading.marked)
        read = "".join("?" if u else str(d) for d, u in zip(probs.argmax(1), unread))
        exact += read == written
        answered += len(read) == len(written) and read[written.index("?")] != "?"
    return {"numbers": count, "exact": 100 * exact / count, "answered": 100 * answered / count}


def score_numbers(model, tta, rows, data_dir, count=1000, seed=0, split="test", progress=False, gaps=None,
                  broken=False):
    """Numbers written with MNIST's `split` digits (composed_numbers.compose: 2-6 digits, 0-8 px apart), read
    through predict's path (each one's PNG file, read_number). Returns {"numbers", "exact" (% read exactly),
    "digits" (% of digits read right, in numbers whose digits were all found), "found" (% with as many digits as
    written), "by_length" / "by_gap": {n: [numbers, % exact]}}."""
    images, labels = data_file.read_split(data_dir, split)
    numbers = composed_numbers.compose(images.numpy(), labels.numpy(), count, seed, gaps or composed_numbers.GAPS,
                                       broken)
    by_length, by_gap, digits_right, digits_seen, found = {}, {}, 0, 0, 0
    model = as_predict_runs(model)
    for page, written, gap in tqdm(numbers, desc="numbers", disable=not progress, leave=False, mininterval=0.5,
                                   dynamic_ncols=True):
        _, probs = read_number(model, tta, rows, io.BytesIO(composed_numbers.png(page)), name="a composed number")
        read = "".join(str(d) for d in probs.argmax(1))
        for table, key in ((by_length, len(written)), (by_gap, gap)):
            table.setdefault(key, []).append(read == written)
        if len(read) == len(written):
            found += 1
            digits_seen += len(written)
            digits_right += sum(a == b for a, b in zip(read, written))
    exact = [read_right for kept in by_length.values() for read_right in kept]
    table = lambda kept: {k: [len(v), 100 * sum(v) / len(v)] for k, v in sorted(kept.items())}
    return {"numbers": len(numbers), "exact": 100 * sum(exact) / len(exact),
            "digits": 100 * digits_right / max(digits_seen, 1), "found": 100 * found / len(numbers),
            "by_length": table(by_length), "by_gap": table(by_gap)}
