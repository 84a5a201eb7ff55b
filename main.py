"""Train a tiny CNN on MNIST and score it once on the held-out test set; then use what was trained.

    python main.py                              # recipe net-1epoch: the 13,242-parameter Net, one epoch at batch 10
    python main.py --recipe ressenet-8epoch --seed 2
    python main.py --dry-run                    # a few steps end to end
    python main.py --resume RUN_DIR             # go on with an interrupted multi-epoch run
    python main.py predict digit.png            # with the newest runs/*/model.pt
    python main.py evaluate [RUN_DIR]           # score a checkpoint again: test set or validation split
    python main.py report                       # the results table of every run under runs/
    python main.py serve                        # draw digits in the browser at http://127.0.0.1:8000/

A recipe is a named set of defaults (model_train.RECIPES); every value in it can be overridden by its flag
(`python main.py --recipe ressenet-8epoch --help` shows that recipe's values as the defaults). Each run writes
into its run folder (--out-dir, default runs/<recipe>-seed<seed>-<time>): metrics.json, model.pt and the plots
curves.png, confusion.png and mistakes.png.
"""
import argparse
import dataclasses
import glob
import os
import signal
import sys
import time

import data_file
import model_train
import report
import run_folder
from model import MODELS, count_parameters


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (None, an on/off switch)."""

    def _get_help_string(self, action):
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)  # --exact, --no-accel
        if action.default is None or switch or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class HelpFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """DefaultsFormatter, with the command list in the epilog kept as written."""


def command_parser(name, details=""):
    """The parser of `python main.py NAME`, described by its line in COMMANDS."""
    line = COMMANDS[name][1]
    return argparse.ArgumentParser(prog=f"main.py {name}", description=f"{line[0].upper()}{line[1:]}. {details}",
                                   formatter_class=DefaultsFormatter)


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


def build_parser(recipe, defaults=True):
    """The training flags, with `recipe`'s values as defaults; defaults=False leaves out every flag not given
    (to see which flags a command line gives)."""
    commands = "\n".join(f"  {name:<9} {line}" for name, (_, line) in COMMANDS.items())
    p = argparse.ArgumentParser(
        description="Train a tiny CNN on MNIST.", formatter_class=HelpFormatter,
        usage="%(prog)s [flags]          train (the default)\n       %(prog)s COMMAND [flags]  "
              f"one of {', '.join(COMMANDS)}",
        epilog=f"commands:\n{commands}\n\n`python main.py COMMAND --help` shows a command's flags.",
        argument_default=None if defaults else argparse.SUPPRESS)
    p.add_argument("--recipe", choices=RECIPE_NAMES, default="net-1epoch" if defaults else argparse.SUPPRESS,
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
    p.add_argument("--scale", type=fraction_or_zero,
                   help="augmentation: max relative change of size (0.1: each digit 90%% to 110%% of its size)")
    p.add_argument("--elastic", type=non_negative_float,
                   help="augmentation: bend each digit's strokes by a smooth random displacement of about this many "
                        "pixels (0: none)")
    p.add_argument("--restyle", type=fraction_or_zero,
                   help="augmentation: fraction of training digits given another writer's look (thicker, coarse "
                        "or blurred strokes)")
    p.add_argument("--digit-variants", type=fraction_or_zero,
                   help="augmentation: fraction of the 1s and 9s drawn as other writers draw them (flagged or block "
                        "1s, 9s with a curled tail)")
    p.add_argument("--clean-epochs", type=non_negative_int,
                   help="train the last N epochs on the digits as they are, without the augmentation above")
    p.add_argument("--label-smoothing", type=fraction_or_zero, help="label smoothing of the training loss")
    p.add_argument("--ema", type=fraction_or_zero,
                   help="score and keep a moving average of the weights, with this decay per step (0: the weights)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="also score validation and test (and predict) on the softmax averaged over the image and "
                        "its four one-pixel shifts")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction,
                   help="keep the epoch with the best validation accuracy instead of the last one")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--exact", action="store_true",
                   help="torch's default kernels (default Adam, oneDNN) instead of the faster fused Adam")
    p.add_argument("--device", choices=model_train.DEVICES,
                   help="where to train: auto is torch's current accelerator, else the CPU")
    p.add_argument("--no-accel", dest="device", action="store_const", const="cpu", help="the same as --device cpu")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="go on with an interrupted multi-epoch run from its last finished epoch, with its stored "
                        "config (no other training flags)")
    p.add_argument("--dry-run", action="store_true",
                   help="one epoch of five batches and small evaluations, to check the pipeline; writes nothing "
                        "unless --out-dir is given")
    p.add_argument("--data-dir", help="where MNIST is kept (fetched if missing)")
    p.add_argument("--out-dir", help="run folder (default: runs/<recipe>-seed<seed>-<date>-<time>)")
    p.add_argument("--no-save-model", action="store_true", help="write no checkpoint model.pt")
    p.add_argument("--save-model", action="store_true", help=argparse.SUPPRESS)  # the old flag: now the default
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if defaults:
        p.set_defaults(**dataclasses.asdict(model_train.recipe_config(recipe)))
    return p


RESUME_KEEPS = {"resume", "no_progress", "no_save_model"}  # the flags --resume may come with: none changes the config


def parse_args(argv=None):
    # The recipe decides the other defaults, so read it first, then parse everything against it.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=RECIPE_NAMES, default="net-1epoch")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(known.recipe)
    args = parser.parse_args(argv)
    if args.resume is not None:
        given = set(vars(build_parser(known.recipe, defaults=False).parse_args(argv))) - RESUME_KEEPS
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given))
            parser.error(f"argument --resume: a resumed run keeps the config it started with; drop {flags}")
        return args
    args.recipe = model_train.ALIASES.get(args.recipe, args.recipe)
    if args.val_size >= data_file.TRAIN_SIZE:
        parser.error(f"argument --val-size: must leave training images, got {args.val_size}")
    if not -2**63 <= args.seed < 2**64:
        parser.error(f"argument --seed: must fit in 64 bits, got {args.seed}")
    return args


def config_from(args):
    """The training config: the parsed flags that model_train.Config has."""
    return model_train.Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(model_train.Config)})


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: whatever can be resumed is kept."""


def on_sigterm(signum, frame):
    raise Terminated()


def run(args):
    """Train (or go on with an interrupted run), then write the run folder; returns the exit status."""
    resume = None
    try:
        if args.resume is not None:
            resume = run_folder.load_resume(args.resume)
            config = model_train.config_from_dict(resume["config"])
            out_dir = args.resume
        else:
            config = config_from(args)
            out_dir = args.out_dir or run_folder.default_run_dir(args.recipe, args.seed,
                                                                 time.strftime("%Y%m%d-%H%M%S"))
        model_train.pick_device(config.device)  # an unavailable device is refused before anything is written
    except (run_folder.RunFolderError, model_train.DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, model_train.DeviceError) else 1
    write = not config.dry_run or args.out_dir or resume  # a dry run writes only where it is told to
    stored = dataclasses.asdict(config)
    resumable = [len(resume["state"]["history"])] if resume else []  # the epoch resume.pt holds, once written

    def on_epoch(state):
        run_folder.save_resume(out_dir, stored, config.model, state)
        resumable[:] = [len(state["history"])]

    created = []
    try:
        if write and resume is None:
            created = run_folder.prepare(out_dir)  # before training: a run that cannot be saved is not started
        model, metrics = model_train.train(config, log=say, progress=not args.no_progress,
                                           on_epoch=on_epoch if write else None,
                                           resume=resume and resume["state"])
        if write:
            # Imported only now, once training has let go of its working memory: matplotlib adds ~50 MB.
            import plots
            paths = run_folder.save(out_dir, stored, model, metrics, save_model=not args.no_save_model)
            figures = plots.save_plots(out_dir, metrics, config.data_dir, written=paths)
            run_folder.remove_resume(out_dir)
            say(f"wrote {', '.join(paths)} and {', '.join(figures)}")
            created = []
    except (data_file.DataError, model_train.NonFiniteLoss, run_folder.RunFolderError, OSError) as e:
        resumes = not isinstance(e, (data_file.DataError, model_train.NonFiniteLoss))  # these would fail again
        hint = resume_hint(out_dir, resumable, config) if resumes else ""
        print(f"error: {e}{'; ' + hint if hint else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if resumable:
            print(f"interrupted: {resume_hint(out_dir, resumable, config)}", file=sys.stderr)
        else:
            print("interrupted: nothing was saved", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        run_folder.remove_empty(created)  # the folder made for a run that saved nothing
    return 0


def resume_hint(out_dir, resumable, config):
    """How to go on with a run stopped after `resumable` epochs (resume.pt written), or ""."""
    if not resumable:
        return ""
    return (f"{out_dir} keeps the run after epoch {resumable[0]} of {config.epochs}; go on with "
            f"`python main.py --resume {out_dir}`")


def predict(argv):
    """`python main.py predict IMAGE... [--checkpoint PATH]`: the digit and top-3 probabilities per image."""
    p = command_parser("predict", "Each image is prepared the way MNIST's digits were (data_file.digit_from_image).")
    p.add_argument("images", nargs="+", help="PNG/JPEG files, one digit each, any size, either polarity")
    p.add_argument("--checkpoint", help=f"a model.pt or run folder written by main.py "
                                        f"(default: the newest {run_folder.RUNS}/*/model.pt)")
    p.add_argument("--model", choices=sorted(MODELS), help="refuse a checkpoint of any other network")
    args = p.parse_args(argv)
    try:
        _, model, checkpoint = run_folder.load_named_checkpoint(args.checkpoint, args.model)
    except run_folder.RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tta = model_train.checkpoint_tta(checkpoint)
    failed = 0
    for image in args.images:
        try:
            x = data_file.digit_from_image(image)
        except data_file.ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = model_train.digit_probabilities(model, x, tta)  # scored as training scored it
        top = probs.topk(3)
        ranked = ", ".join(f"{d} {100 * p:.1f}%" for p, d in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{image}: {top.indices[0].item()}  ({ranked})")
    return 1 if failed else 0


def evaluate(argv):
    """`python main.py evaluate [RUN_DIR | CHECKPOINT]`: accuracy, loss and per-class accuracy, as the run scored."""
    p = command_parser("evaluate", "Single-view and, when the run used it, with TTA; the same batches, kernels "
                                   "and memory layout as its training, so the figures equal what the run recorded.")
    p.add_argument("run", nargs="?", metavar="RUN_DIR | CHECKPOINT",
                   help=f"a run folder or its model.pt (default: the newest {run_folder.RUNS}/*/model.pt)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the test set, or the validation split the run held out (rebuilt from its seed and size)")
    p.add_argument("--device", choices=model_train.DEVICES, default="auto",
                   help="where to score: auto is torch's current accelerator, else the CPU")
    p.add_argument("--data-dir", help="where MNIST is kept (default: the run's own)")
    p.add_argument("--uci-digits", action="store_true",
                   help="also score handwriting from outside MNIST: the UCI digits (half of them, never used to "
                        "choose anything) as PNG files in four forms, through predict's path; recorded in the run "
                        f"folder's {run_folder.UCI} for `report`")
    args = p.parse_args(argv)
    try:
        path, model, checkpoint = run_folder.load_named_checkpoint(args.run)
        config = model_train.config_from_dict(checkpoint.get("config") or {"model": checkpoint["model_name"]})
        config = dataclasses.replace(config, device=args.device, data_dir=args.data_dir or config.data_dir)
        result = model_train.evaluate_split(model, config, args.split, log=say)
    except (run_folder.RunFolderError, data_file.DataError, model_train.DeviceError,
            model_train.NoValidationSplit) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    recorded = checkpoint.get("metrics") or {}
    say(f"{path}: {checkpoint['model_name']} ({count_parameters(model):,} parameters), recipe "
        f"{config.recipe}, seed {config.seed}{', a dry run' if config.dry_run else ''}")
    name = {"test": "test set", "val": "validation split"}[args.split]
    views = ["", "_tta"] if config.tta else [""]
    say(f"{name}, {result['images']:,} images: " + ", ".join(
        f"accuracy {result['acc' + v]:.2f}% loss {result['loss' + v]:.4f} "
        f"{'with TTA' if v else 'single-view'}" for v in views))
    per_class = model_train.per_class_accuracy(result["confusion"])
    say(f"per-class accuracy{' with TTA' if config.tta else ''}: " +
        "  ".join(f"{d} {a:.2f}%" for d, a in enumerate(per_class)))
    if args.split == "test" and "test_acc" in recorded:
        say("the run recorded: " + ", ".join(f"{recorded['test_acc' + v]:.2f}% {'with TTA' if v else 'single-view'}"
                                             for v in views if "test_acc" + v in recorded))
    if args.uci_digits:
        folder = os.path.dirname(path) or "."
        tta = model_train.checkpoint_tta(checkpoint)
        try:
            accuracy = model_train.score_uci_digits(model, tta)
            # Recorded for `report` beside a run's metrics; a checkpoint elsewhere gets no file put beside it.
            is_run = os.path.exists(os.path.join(folder, run_folder.METRICS))
            where = f"recorded in {run_folder.save_uci(folder, accuracy)[0]}" if is_run else "not recorded: not a run folder"
        except (data_file.DataError, run_folder.RunFolderError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        say(f"UCI digits (other writers, the report half){' with TTA' if tta else ''}: " +
            ", ".join(f"{form} {acc:.2f}%" for form, acc in accuracy.items()) +
            f" | mean {sum(accuracy.values()) / len(accuracy):.2f}% ({where})")
    return 0


def report_command(argv):
    """`python main.py report [RUN_DIR ...] [--csv]`: report.py's table of the run folders."""
    p = command_parser("report", "One row per config (recipe, network, epochs and every other value but the "
                                 "seed) measured on one device with one torch version. Dry runs and unfinished runs "
                                 "are left out and counted on stderr.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help=f"run folders (default: every folder under {run_folder.RUNS}/)")
    p.add_argument("--csv", action="store_true", help="CSV instead of a Markdown table")
    args = p.parse_args(argv)
    folders = args.runs or sorted(glob.glob(os.path.join(run_folder.RUNS, "*", "")))
    if not folders:
        print(f"error: no run folders in {run_folder.RUNS}/: train one first with `python main.py`, or name them",
              file=sys.stderr)
        return 1
    try:
        rows, left_out = report.collect(folders)
    except run_folder.RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.to_csv(rows) if args.csv else report.to_markdown(rows), end="")
    if left_out:
        print("left out: " + ", ".join(f"{what}: {n}" for what, n in left_out.items()), file=sys.stderr)
    return 0


def serve_command(argv):
    """`python main.py serve [--checkpoint PATH] [--host H] [--port P]`: the drawing page and POST /predict."""
    p = command_parser("serve", "The page posts the canvas after every stroke and shows the predicted digit, "
                                "each class's probability and the 28x28 image the network saw; answers come from "
                                "exactly predict's path. Ctrl-C stops it.")
    p.add_argument("--checkpoint", help=f"a model.pt or run folder (default: the newest {run_folder.RUNS}/*/model.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=check(int, lambda v: 0 <= v < 65536, "a port number, 0 to 65535"), default=8000,
                   help="port to listen on (0: any free one)")
    args = p.parse_args(argv)
    import serve  # its http.server is needed by this command alone
    try:
        path, model, checkpoint = run_folder.load_named_checkpoint(args.checkpoint)
        server = serve.make_server(serve.Predictor(model, checkpoint), args.host, args.port)
    except run_folder.RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    say(f"{path}: {checkpoint['model_name']}, recipe {checkpoint.get('config', {}).get('recipe', '?')}"
        f"{', predicting with TTA' if server.predictor.tta else ''}")
    say(f"open http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/ to draw a digit (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("stopped")
    finally:
        server.server_close()
    return 0


def say(*parts):
    """print, flushed: each line shows up at once even when stdout is a pipe (`python main.py | tee log`)."""
    print(*parts, flush=True)


COMMANDS = {
    "predict": (predict, "classify digits in image files with a trained network"),
    "evaluate": (evaluate, "score a run's checkpoint on the test set or the validation split it held out"),
    "report": (report_command, "the results table of run folders: mean ± std over seeds"),
    "serve": (serve_command, "draw a digit in the browser and see what the trained network reads"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, on_sigterm)  # a kill (or a batch system's stop) is handled as Ctrl-C is
    try:
        if argv[:1] and argv[0] in COMMANDS:
            return COMMANDS[argv[0]][0](argv[1:])
        return run(parse_args(argv))
    except KeyboardInterrupt as e:  # run() says what it kept; the commands write nothing
        print("interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
