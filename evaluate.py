"""`python main.py evaluate`: a trained network scored again, as its run scored it, and on what it was not
trained for (other writers' digits, numbers written in a row), with what the run recorded beside it.

Rescoring uses the run's own kernels, memory layout and batches, so the figures equal the recorded ones on
the machine that trained it; other writers and numbers go through predict's path (reader.py).
"""
import dataclasses

import data_file
import model_train
import not_digits as non_digit_images
import reader
import recipes
import row_train
import run_folder
from errors import UserError
from model import ROW_MODELS, count_parameters


class NoValidationSplit(UserError):
    """A run that held out no validation split was asked to score one."""


def check_split(config, split):
    """NoValidationSplit when `split` is "val" and the run held none out."""
    if split == "val" and not config.val_size:
        raise NoValidationSplit("this run held out no validation split (its val_size is 0); score --split test")


def rescore(model, config, split="test", log=print, device="auto"):
    """Score a trained network again, as its run scored it: the test set or the validation split the run held
    out (rebuilt from config.seed and config.val_size), with the kernels and memory layout training used,
    single-view and, when config.tta, with TTA. Returns score()'s figures without a prefix ("acc", "loss",
    "acc_tta", ...), the confusion matrix of the prediction the run is scored on, and "images"."""
    check_split(config, split)
    device = model_train.pick_device(device)
    data = data_file.load_mnist(config.data_dir, val_size=config.val_size, split_seed=config.seed, device=device,
                                log=log)
    images, labels = data[split]
    with model_train.kernels(config, device):
        model = model_train.place(model, config, device)
        return {**model_train.score(model, images, labels, model_train.EVAL_BATCH, config.tta, "", details=True),
                "images": len(labels)}


def row_lines(model, config, split, recorded):
    """What `evaluate` prints of a row reader: the share of ROWS_SCORED rows composed from the test digits (or the
    validation split's) it reads exactly on its own, as its run scored them, and what the run recorded."""
    check_split(config, split)
    data_file.ensure_mnist(config.data_dir)
    rows = row_train.composed_rows(*row_train.raw_splits(config)[split], row_train.ROWS_SCORED,
                                   row_train.SCORE_SEEDS[split])
    lines = [f"rows composed from the {'test digits' if split == 'test' else 'validation split'}, {len(rows):,}: "
             f"{row_train.score_rows(model, rows):.2f}% read exactly by the row reader alone"]
    if split == "test" and "test_acc" in recorded:
        lines.append(f"the run recorded: {recorded['test_acc']:.2f}%")
    return lines


def per_class_accuracy(confusion):
    """Accuracy in % of each true digit (a row of the confusion matrix): [10 floats]."""
    return [100 * row[d] / sum(row) if sum(row) else float("nan") for d, row in enumerate(confusion)]


def evaluation_lines(model, config, split, recorded, log=print, device="auto"):
    """What `python main.py evaluate` prints of rescore: accuracy and loss (single-view, and with TTA when
    the run used it), per-class accuracy and, for the test set, what the run recorded in `recorded` (metrics)."""
    result = rescore(model, config, split, log=log, device=device)
    name = {"test": "test set", "val": "validation split"}[split]
    views = ["", "_tta"] if config.tta else [""]
    lines = [f"{name}, {result['images']:,} images: " + ", ".join(
        f"accuracy {result['acc' + v]:.2f}% loss {result['loss' + v]:.4f} {'with TTA' if v else 'single-view'}"
        for v in views)]
    per_class = per_class_accuracy(result["confusion"])
    lines.append(f"per-class accuracy{' with TTA' if config.tta else ''}: " +
                 "  ".join(f"{d} {a:.2f}%" for d, a in enumerate(per_class)))
    if split == "test" and "test_acc" in recorded:
        lines.append("the run recorded: " + ", ".join(f"{recorded['test_acc' + v]:.2f}% "
                                                      f"{'with TTA' if v else 'single-view'}"
                                                      for v in views if "test_acc" + v in recorded))
    return lines


def uci_lines(checkpoint_path, model, tta, rows, data_dir, progress=True):
    """Score the UCI digits (the 13 writers' report half; the 30 unseen writers when their file can be had) with
    the row reader `rows` (a row_reader), record both beside the checkpoint, and yield what `evaluate
    --uci-digits` prints."""
    accuracy = reader.score_uci_digits(model, tta, rows, progress=progress)
    try:
        unseen = reader.score_uci_digits(model, tta, rows, "unseen", data_dir=data_dir, progress=progress)
    except data_file.DataError as e:  # the 13 writers are still scored and recorded
        unseen = None
        yield f"UCI digits, 30 writers unseen: not scored: {e}"
    where = run_folder.record_uci(checkpoint_path, accuracy, unseen)
    for name, figures in (("13 writers, chosen on (the report half)", accuracy), ("30 writers, unseen", unseen)):
        if figures:
            yield (f"UCI digits, {name}{' with TTA' if tta else ''}: " +
                   ", ".join(f"{form} {acc:.2f}%" for form, acc in figures.items()) +
                   f" | mean {sum(figures.values()) / len(figures):.2f}% ({where})")


def spaced(result):
    """The % of score_numbers' numbers read exactly among those whose digits are 2 px apart or more."""
    rows = [(n, acc) for gap, (n, acc) in result["by_gap"].items() if gap >= 2]
    return sum(n * acc for n, acc in rows) / max(sum(n for n, _ in rows), 1)


def number_lines(result):
    """What `python main.py evaluate --numbers` prints of reader.score_numbers."""
    table = lambda rows: ", ".join(f"{k}: {acc:.1f}% ({n})" for k, (n, acc) in rows.items())
    return [f"numbers written with test digits, {result['numbers']:,}: {result['exact']:.2f}% read exactly, "
            f"digits {result['digits']:.2f}% right, as many digits as written {result['found']:.2f}%",
            f"  by length (numbers): {table(result['by_length'])}",
            f"  by gap in px (numbers): {table(result['by_gap'])}; 2 px or more: {spaced(result):.2f}%"]


def case_lines(cases, singles, splits):
    """What `evaluate --numbers` prints of the harder cases (reader.score_number_cases), MNIST's test digits one
    file each (reader.score_single_digits) and the other writers' digits read as several (score_uci_splits)."""
    lines = [f"  {name}, {r['numbers']:,} numbers: {r['exact']:.2f}% read exactly, digits {r['digits']:.2f}% right, "
             f"{r['ms']:.1f} ms a number" for name, r in cases.items()]
    lines.append(f"single test digits, one PNG file each ({singles['digits']:,}): {singles['exact']:.2f}% read as "
                 f"the one right digit, {singles['split']:.2f}% as more than one")
    lines.append("UCI digits (13 writers, report half) read as more than one digit: " +
                 ", ".join(f"{form} {share:.2f}%" for form, share in splits.items()) +
                 f" | mean {sum(splits.values()) / len(splits):.2f}%")
    return lines


def not_digit_lines(result, threshold):
    """What `evaluate --not-digits` prints of reader.score_not_digits: one line per family, the held-out ones marked."""
    declines = f"it declines under {100 * threshold:.1f}% confidence" if threshold else "it never declines"
    lines = [f"images that hold no digit, read through predict's path ({declines}; AUROC: against MNIST test "
             f"digits, by the surest mark's probability):"]
    for family, r in result.items():
        held = " (held out)" if family in non_digit_images.HELD_OUT else ""
        lines.append(f"  {family}{held}, {r['images']:,}: {r['answered']:.1f}% answered as digits, their mean "
                     f"confidence {r['confidence']:.1f}%, AUROC {r['auroc']:.1f}%")
    return lines


def decline_lines(result):
    """What `evaluate --not-digits` prints of reader.score_declines: real digits declined, and calibration."""
    return [f"{name}, {r['digits']:,} files: {r['declined']:.2f}% declined, {r['accuracy']:.2f}% read right "
            f"({r['accepted_accuracy']:.2f}% of those read), expected calibration error {r['ece']:.2f}%"
            + (f" ({r['ece_before']:.2f}% at temperature 1)" if r["ece"] != r["ece_before"] else "")
            for name, r in result.items()]


def evaluation_report(path, model, checkpoint, split="test", device="auto", data_dir=None, rows=None,
                      uci_digits=False, numbers=0, not_digits=False, log=print, progress=True):
    """Yield what `python main.py evaluate` prints for the checkpoint at `path`: what it is, its figures on
    `split` as its run scored them (evaluation_lines; for a row reader, row_lines), then the UCI digits, `numbers`
    numbers and the non-digits when asked, read with the row reader `rows` (a loaded RowNet). `data_dir` None:
    where the run found MNIST."""
    stored, recorded = checkpoint.get("config") or {"model": checkpoint["model_name"]}, checkpoint.get("metrics") or {}
    config = recipes.config_from_dict(stored)
    config = dataclasses.replace(config, data_dir=data_dir or config.data_dir)
    dry = recorded.get("dry_run") or stored.get("dry_run")  # the config held it before 2026-12-07
    yield (f"{path}: {checkpoint['model_name']} ({count_parameters(model):,} parameters), recipe "
           f"{config.recipe}, seed {config.seed}{', a dry run' if dry else ''}")
    if config.model in ROW_MODELS:
        yield from row_lines(model, config, split, recorded)
        return
    yield from evaluation_lines(model, config, split, recorded, log=log, device=device)
    tta = reader.checkpoint_tta(checkpoint)
    rows = rows and reader.row_reader(rows)
    if uci_digits:
        yield from uci_lines(path, model, tta, rows, config.data_dir, progress)
    if numbers:
        yield from number_lines(reader.score_numbers(model, tta, rows, config.data_dir, numbers, progress=progress))
        yield from case_lines(reader.score_number_cases(model, tta, rows, config.data_dir, progress=progress),
                              reader.score_single_digits(model, tta, rows, config.data_dir, progress=progress),
                              reader.score_uci_splits(model, tta, rows, progress=progress))
    if not_digits:
        yield from not_digit_lines(reader.score_not_digits(model, tta, rows, config.data_dir, progress=progress),
                                   reader.decline_threshold(model))
        yield from decline_lines(reader.score_declines(model, tta, rows, config.data_dir, progress=progress))
        marked = reader.score_marked_numbers(model, tta, rows, config.data_dir, progress=progress)
        yield (f"numbers of 3-5 test digits with a held-out mark among them, {marked['numbers']}: "
               f"{marked['exact']:.1f}% read exactly with a ? for the mark; the mark read as a digit in "
               f"{marked['answered']:.1f}%")
