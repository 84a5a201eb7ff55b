"""Train a tiny CNN on MNIST and score it once on the held-out test set; or classify your own digit images.

    python main.py                              # recipe net-1epoch: the 13,242-parameter Net, one epoch at batch 10
    python main.py --recipe ressenet-8epoch --seed 2
    python main.py --dry-run                    # a few steps end to end
    python main.py predict digit.png            # with the newest runs/*/model.pt

A recipe is a named set of defaults (model_train.RECIPES); every value in it can be overridden by its flag
(`python main.py --recipe ressenet-8epoch --help` shows that recipe's values as the defaults). Each run writes
into its run folder (--out-dir, default runs/<recipe>-seed<seed>-<time>): metrics.json, model.pt and the plots
curves.png, confusion.png and mistakes.png.
"""
import argparse
import dataclasses
import os
import sys
import time

import data_file
import model_train
import run_folder
from model import MODELS


def check(kind, test, message):
    """An argparse type: `kind` parsed, and refused with "must be <message>" unless test(value)."""
    def parse(s):
        v = kind(s)
        if not test(v):
            raise argparse.ArgumentTypeError(f"must be {message}, got {s}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" messages
    return parse


positive_int = check(int, lambda v: v > 0, "a positive integer")
non_negative_int = check(int, lambda v: v >= 0, "0 or more")
positive_float = check(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = check(float, lambda v: 0 <= v < float("inf"), "0 or a positive number")
fraction = check(float, lambda v: 0 < v < 1, "between 0 and 1")
fraction_or_zero = check(float, lambda v: 0 <= v < 1, "at least 0 and below 1")
RECIPE_NAMES = sorted(model_train.RECIPES) + sorted(model_train.ALIASES)


def build_parser(recipe):
    p = argparse.ArgumentParser(description="Train a tiny CNN on MNIST.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=RECIPE_NAMES, default="net-1epoch",
                   help="named set of defaults for the flags below (seed1, seed2: old names of net-1epoch, "
                        "ressenet-8epoch)")
    p.add_argument("--model", choices=sorted(MODELS), help="network to train")
    p.add_argument("--dropout", type=fraction_or_zero, help="dropout probability of the network")
    p.add_argument("--epochs", type=positive_int, help="number of epochs")
    p.add_argument("--batch-size", type=positive_int, help="training batch size")
    p.add_argument("--test-batch-size", type=positive_int, help="evaluation batch size")
    p.add_argument("--optimizer", choices=("adam", "sgd"), help="adam (AdamW with --weight-decay) or sgd")
    p.add_argument("--momentum", type=non_negative_float, help="SGD momentum")
    p.add_argument("--schedule", choices=("onecycle", "constant"), help="learning-rate schedule")
    p.add_argument("--max-lr", "--lr", dest="max_lr", type=positive_float,
                   help="OneCycleLR peak learning rate (the rate itself with --schedule constant)")
    p.add_argument("--pct-start", type=fraction, help="OneCycleLR fraction of steps spent warming up")
    p.add_argument("--div-factor", type=positive_float, help="OneCycleLR: initial lr = max-lr / div-factor")
    p.add_argument("--final-div-factor", type=positive_float,
                   help="OneCycleLR: final lr = initial lr / final-div-factor")
    p.add_argument("--weight-decay", type=non_negative_float, help="weight decay")
    p.add_argument("--clip-grad", type=non_negative_float, help="max gradient norm (0: no clipping)")
    p.add_argument("--val-size", type=non_negative_int,
                   help="images carved from the 60k training set for validation (0: none)")
    p.add_argument("--shift", type=non_negative_float, help="augmentation: max random shift in pixels (0: none)")
    p.add_argument("--rotate", type=non_negative_float, help="augmentation: max random rotation in degrees")
    p.add_argument("--label-smoothing", type=fraction_or_zero, help="label smoothing of the training loss")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="also score validation and test (and predict) on the softmax averaged over the image and "
                        "its four one-pixel shifts")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction,
                   help="keep the epoch with the best validation accuracy instead of the last one")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--exact", action="store_true",
                   help="torch's default kernels (default Adam, oneDNN) instead of the faster fused Adam")
    p.add_argument("--no-accel", action="store_true", help="train on the CPU even if an accelerator is present")
    p.add_argument("--dry-run", action="store_true",
                   help="one epoch of five batches and small evaluations, to check the pipeline; writes nothing "
                        "unless --out-dir is given")
    p.add_argument("--data-dir", help="where MNIST is kept (fetched if missing)")
    p.add_argument("--out-dir", help="run folder (default: runs/<recipe>-seed<seed>-<date>-<time>)")
    p.add_argument("--no-save-model", action="store_true", help="write no checkpoint model.pt")
    p.add_argument("--save-model", action="store_true", help=argparse.SUPPRESS)  # the old flag: now the default
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(**dataclasses.asdict(model_train.recipe_config(recipe)))
    return p


def parse_args(argv=None):
    # The recipe decides the other defaults, so read it first, then parse everything against it.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=RECIPE_NAMES, default="net-1epoch")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(known.recipe)
    args = parser.parse_args(argv)
    args.recipe = model_train.ALIASES.get(args.recipe, args.recipe)
    if args.val_size >= data_file.TRAIN_SIZE:
        parser.error(f"argument --val-size: must leave training images, got {args.val_size}")
    if not -2**63 <= args.seed < 2**64:
        parser.error(f"argument --seed: must fit in 64 bits, got {args.seed}")
    return args


def config_from(args):
    """The training config: the parsed flags that model_train.Config has."""
    return model_train.Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(model_train.Config)})


def run(args):
    """Train, then write the run folder; returns the exit status."""
    config = config_from(args)
    out_dir = args.out_dir or run_folder.default_run_dir(args.recipe, args.seed, time.strftime("%Y%m%d-%H%M%S"))
    write = not args.dry_run or args.out_dir  # a dry run writes only where it is told to
    created = []
    try:
        if write:
            created = run_folder.prepare(out_dir)  # before training: a run that cannot be saved is not started
        model, metrics = model_train.train(config, log=say, progress=not args.no_progress)
        if write:
            # Imported only now, once training has let go of its working memory: matplotlib adds ~50 MB.
            import plots
            paths = run_folder.save(out_dir, dataclasses.asdict(config), model, metrics,
                                    save_model=not args.no_save_model)
            figures = plots.save_plots(out_dir, metrics, config.data_dir)
            say(f"wrote {', '.join(paths)} and {', '.join(figures)}")
            created = []
    except (data_file.DataError, model_train.NonFiniteLoss, run_folder.RunFolderError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was saved", file=sys.stderr)
        return 130
    finally:
        run_folder.remove_empty(created)  # the folder made for a run that saved nothing
    return 0


def predict(argv):
    """`python main.py predict IMAGE... [--checkpoint PATH]`: the digit and top-3 probabilities per image."""
    p = argparse.ArgumentParser(prog="main.py predict", description="Classify digits in image files.")
    p.add_argument("images", nargs="+", help="PNG/JPEG files, one digit each, any size, either polarity")
    p.add_argument("--checkpoint", help=f"a model.pt written by main.py (default: the newest {run_folder.RUNS}/*/model.pt)")
    p.add_argument("--model", choices=sorted(MODELS), help="refuse a checkpoint of any other network")
    args = p.parse_args(argv)
    path = args.checkpoint or run_folder.newest_checkpoint()
    if path is None:
        print(f"error: no checkpoint in {run_folder.RUNS}/: train one first with `python main.py`, or name one "
              f"with --checkpoint", file=sys.stderr)
        return 1
    try:
        model, checkpoint = run_folder.load_checkpoint(path, args.model)
    except run_folder.RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tta = bool(checkpoint["config"].get("tta")) if isinstance(checkpoint.get("config"), dict) else False
    failed = 0
    for image in args.images:
        try:
            x = data_file.digit_from_image(image)
        except data_file.ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = model_train.predict_log_probs(model, x[None], tta).exp()[0]  # scored as training scored it
        top = probs.topk(3)
        ranked = ", ".join(f"{d} {100 * p:.1f}%" for p, d in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{image}: {top.indices[0].item()}  ({ranked})")
    return 1 if failed else 0


def say(*parts):
    """print, flushed: each line shows up at once even when stdout is a pipe (`python main.py | tee log`)."""
    print(*parts, flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["predict"]:
        return run(parse_args(argv))
    try:
        return predict(argv[1:])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
