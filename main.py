"""The command line: train a tiny CNN on MNIST (the default), then use what was trained.

    python main.py                              # recipe net-1epoch: the 13,242-parameter Net, one epoch at batch 10
    python main.py --recipe ressenet-8epoch --seed 2
    python main.py --dry-run                    # a few steps end to end
    python main.py --resume RUN_DIR             # go on with an interrupted multi-epoch run
    python main.py predict digit.png            # with the newest runs/*/model.pt
    python main.py evaluate [RUN_DIR]           # score a checkpoint again: test set or validation split
    python main.py report                       # the results table of every run under runs/
    python main.py serve                        # draw digits in the browser at http://127.0.0.1:8000/

The training flags are model_train.Config's fields, each declared there once with its help; a recipe
(model_train.RECIPES) sets their defaults (`python main.py --recipe ressenet-8epoch --help` shows its values).
A run's folder is run_folder.Run's job; every user error is one line on stderr and an exit status, said in main().
"""
import argparse
import dataclasses
import glob
import os
import signal
import sys

import data_file
import model_train
import report
import run_folder
from model import MODELS, count_parameters


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (None, an on/off switch)."""

    def _get_help_string(self, action):
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)  # --dry-run, --no-accel
        if action.default is None or switch or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class HelpFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """DefaultsFormatter, with the command list in the epilog kept as written."""


RECIPE_NAMES = sorted(model_train.RECIPES) + sorted(model_train.ALIASES)
RESUME_KEEPS = {"resume", "no_progress", "no_save_model", "data_dir"}  # none changes what the run computes


def recipe_name(name):
    """--recipe's type: a retired recipe is refused with the recipe and flags that make the same run."""
    if name in model_train.RETIRED:
        recipe, changes = model_train.RETIRED[name]
        raise argparse.ArgumentTypeError(f"{name} has left the recipe list; the same run is `--recipe {recipe} "
                                         f"{' '.join(model_train.as_flags(changes))}` (docs/experiments.md)")
    return name


def add_config_flags(p):
    """One flag per model_train.Config field that has one, typed, checked and described as the field says."""
    for field in dataclasses.fields(model_train.Config):
        meta = field.metadata
        if not meta["cli"]:
            continue
        kwargs = dict(dest=field.name, help=meta["help"].replace("%", "%%"))
        if field.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=model_train.flag_type(field.type, meta["check"]) if meta["check"] else field.type,
                          choices=meta["choices"])
        p.add_argument(*(meta["flags"] or ["--" + field.name.replace("_", "-")]), **kwargs)


def build_parser(recipe, defaults=True):
    """The training flags, with `recipe`'s values as defaults; defaults=False leaves out every flag not given
    (to see which flags a command line gives)."""
    commands = "\n".join(f"  {name:<9} {line}" for name, (_, line) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="main.py", description="Train a tiny CNN on MNIST.", formatter_class=HelpFormatter,
        usage="%(prog)s [flags]          train (the default)\n       %(prog)s COMMAND [flags]  "
              f"one of {', '.join(COMMANDS)}",
        epilog=f"commands:\n{commands}\n\n`python main.py COMMAND --help` shows a command's flags.",
        argument_default=None if defaults else argparse.SUPPRESS)
    p.add_argument("--recipe", type=recipe_name, choices=RECIPE_NAMES,
                   default="net-1epoch" if defaults else argparse.SUPPRESS,
                   help="named set of defaults for the flags below (seed1, seed2: old names of net-1epoch, "
                        "ressenet-8epoch)")
    add_config_flags(p)
    # The run's own flags: where it is written and how it is shown, none of them part of its config.
    p.add_argument("--no-accel", dest="device", action="store_const", const="cpu", help="the same as --device cpu")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="go on with an interrupted multi-epoch run from its last finished epoch, with its stored "
                        "config (no other training flags but --data-dir)")
    p.add_argument("--dry-run", action="store_true",
                   help="one epoch of five batches and small evaluations, to check the pipeline; writes nothing "
                        "unless --out-dir is given")
    p.add_argument("--out-dir", type=model_train.flag_type(str, "not_empty"),
                   help="run folder (default: runs/<recipe>-seed<seed>-<date>-<time>)")
    p.add_argument("--no-save-model", action="store_true", help="write no checkpoint model.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if defaults:
        p.set_defaults(**dataclasses.asdict(model_train.recipe_config(recipe)))
    return p


def parse_args(argv=None):
    # The recipe decides the other defaults, so read it first, then parse everything against it.
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--recipe", type=recipe_name, choices=RECIPE_NAMES, default="net-1epoch")
    try:
        recipe = pre.parse_known_args(argv)[0].recipe
    except argparse.ArgumentError:
        recipe = "net-1epoch"  # the full parser below says what is wrong with it
    parser = build_parser(recipe)
    args = parser.parse_args(argv)
    if args.resume is not None:
        given = set(vars(build_parser(recipe, defaults=False).parse_args(argv)))
        if given - RESUME_KEEPS:
            flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given - RESUME_KEEPS))
            parser.error(f"argument --resume: a resumed run keeps the config it started with; drop {flags}")
        if "data_dir" not in given:
            args.data_dir = None  # where the run found its data (run_folder.Run.resume)
        return args
    args.recipe = model_train.ALIASES.get(args.recipe, args.recipe)
    return args


def config_from(args):
    """The training config: the parsed flags that model_train.Config has."""
    return model_train.Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(model_train.Config)})


def run(args):
    """Train a recipe, or go on with an interrupted run, in its run folder."""
    if args.resume is not None:
        run = run_folder.Run.resume(args.resume, args.data_dir, save_model=not args.no_save_model, log=say)
    else:
        run = run_folder.Run.new(config_from(args), args.out_dir, save_model=not args.no_save_model, log=say)
    model_train.pick_device(run.config.device)  # an unavailable device is refused before anything is written
    with run:
        model, metrics = model_train.train(run.config, log=say, progress=not args.no_progress,
                                           on_epoch=run.on_epoch, resume=run.state)
        run.finish(model, metrics)
    return 0


def command_parser(name, details=""):
    """The parser of `python main.py NAME`, described by its line in COMMANDS."""
    line = COMMANDS[name][1]
    return argparse.ArgumentParser(prog=f"main.py {name}", description=f"{line[0].upper()}{line[1:]}. {details}",
                                   formatter_class=DefaultsFormatter)


CHECKPOINT_HELP = f"a model.pt or run folder written by main.py (default: the newest {run_folder.RUNS}/*/model.pt)"


def predict(argv):
    """`python main.py predict IMAGE... [--checkpoint PATH]`: the digit and top-3 probabilities per image."""
    p = command_parser("predict", "Each image is prepared the way MNIST's digits were (data_file.digit_from_image).")
    p.add_argument("images", nargs="+", help="PNG/JPEG files, one digit each, any size, either polarity")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--model", choices=sorted(MODELS), help="refuse a checkpoint of any other network")
    args = p.parse_args(argv)
    _, model, checkpoint = run_folder.load_named_checkpoint(args.checkpoint, args.model)
    tta = model_train.checkpoint_tta(checkpoint)
    failed = 0
    for image in args.images:
        try:
            x = data_file.digit_from_image(image)
        except data_file.ImageError as e:  # the other images are still read
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = model_train.digit_probabilities(model, x, tta)  # scored as training scored it
        top = probs.topk(3)
        ranked = ", ".join(f"{d} {100 * p:.1f}%" for p, d in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{image}: {top.indices[0].item()}  ({ranked})")
    return 1 if failed else 0


def evaluate_command(argv):
    """`python main.py evaluate [RUN_DIR | CHECKPOINT]`: accuracy, loss and per-class accuracy, as the run scored."""
    p = command_parser("evaluate", "Single-view and, when the run used it, with TTA; the same batches, kernels "
                                   "and memory layout as its training, so the figures equal what the run recorded.")
    p.add_argument("run", nargs="?", metavar="RUN_DIR | CHECKPOINT", help=CHECKPOINT_HELP)
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
    path, model, checkpoint = run_folder.load_named_checkpoint(args.run)
    config = model_train.config_from_dict(checkpoint.get("config") or {"model": checkpoint["model_name"]})
    config = dataclasses.replace(config, device=args.device, data_dir=args.data_dir or config.data_dir)
    say(f"{path}: {checkpoint['model_name']} ({count_parameters(model):,} parameters), recipe "
        f"{config.recipe}, seed {config.seed}{', a dry run' if config.dry_run else ''}")
    for line in model_train.evaluation_lines(model, config, args.split, checkpoint.get("metrics") or {}, log=say):
        say(line)
    if args.uci_digits:
        tta = model_train.checkpoint_tta(checkpoint)
        accuracy = model_train.score_uci_digits(model, tta)
        where = run_folder.record_uci(path, accuracy)
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
        raise CommandError(f"no run folders in {run_folder.RUNS}/: train one first with `python main.py`, or name them")
    rows, left_out = report.collect(folders)
    print(report.to_csv(rows) if args.csv else report.to_markdown(rows), end="")
    if left_out:
        print("left out: " + ", ".join(f"{what}: {n}" for what, n in left_out.items()), file=sys.stderr)
    return 0


def serve_command(argv):
    """`python main.py serve [--checkpoint PATH] [--host H] [--port P]`: the drawing page and POST /predict."""
    p = command_parser("serve", "The page posts the canvas after every stroke and shows the predicted digit, "
                                "each class's probability and the 28x28 image the network saw; answers come from "
                                "exactly predict's path. Ctrl-C stops it.")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=model_train.flag_type(int, "port"), default=8000,
                   help="port to listen on (0: any free one)")
    args = p.parse_args(argv)
    import serve  # its http.server is needed by this command alone
    path, model, checkpoint = run_folder.load_named_checkpoint(args.checkpoint)
    say(f"{path}: {checkpoint['model_name']}, recipe {checkpoint.get('config', {}).get('recipe', '?')}")
    try:
        server = serve.make_server(serve.Predictor(model, checkpoint), args.host, args.port)
    except OSError as e:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    serve.serve_until_interrupted(server, log=say)
    return 0


def say(*parts):
    """print, flushed: each line shows up at once even when stdout is a pipe (`python main.py | tee log`)."""
    print(*parts, flush=True)


COMMANDS = {
    "predict": (predict, "classify digits in image files with a trained network"),
    "evaluate": (evaluate_command, "score a run's checkpoint on the test set or the validation split it held out"),
    "report": (report_command, "the results table of run folders: mean ± std over seeds"),
    "serve": (serve_command, "draw a digit in the browser and see what the trained network reads"),
}


class CommandError(Exception):
    """A command found nothing to work on, or could not start; the message says what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: whatever can be resumed is kept."""


def on_sigterm(signum, frame):
    raise Terminated()


# What a user's mistake or circumstance raises: one line on stderr and this exit status, never a traceback.
USER_ERRORS = {run_folder.RunFolderError: 1, data_file.DataError: 1, model_train.NonFiniteLoss: 1,
               model_train.NoValidationSplit: 1, CommandError: 1, model_train.DeviceError: 2}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, on_sigterm)  # a kill (or a batch system's stop) is handled as Ctrl-C is
    try:
        if argv[:1] and argv[0] in COMMANDS:
            return COMMANDS[argv[0]][0](argv[1:])
        return run(parse_args(argv))
    except tuple(USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return next(code for kind, code in USER_ERRORS.items() if isinstance(e, kind))
    except KeyboardInterrupt as e:  # a run says what it kept (run_folder.Run); the commands write nothing
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
