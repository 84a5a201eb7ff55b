"""A run folder: metrics.json (the config and every figure) and model.pt (the checkpoint), written atomically;
while a multi-epoch run trains, also resume.pt, the state to resume it from after an interruption.

The checkpoint is {"model": state_dict, "model_name", "config", "metrics"}; it and resume.pt are always read
back with torch.load(..., weights_only=True), so nothing in a file is ever run. Every failure a user can cause
(a folder that cannot be written, a missing or damaged file) raises RunFolderError with a one-line message.
"""
import contextlib
import dataclasses
import glob
import json
import os
import secrets
import tempfile
import time
import zipfile

import torch

import recipes
from errors import UserError
from model import MODELS, ROW_MODELS, build_model

RUNS = "runs"  # where main.py puts its run folders
# The reader the repository ships (made by the command in README.md, its config and figures inside it): what
# predict, serve, evaluate and export load when no checkpoint is named and runs/ holds none.
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "reader.pt")
# The row reader it ships (model.RowNet with a mark class, the rows-nd-ctc recipe at 8 epochs): how every reader finds
# the digits in a row, and the marks among them that are no digit.
SHIPPED_ROWS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "rows.pt")
METRICS, CHECKPOINT, RESUME = "metrics.json", "model.pt", "resume.pt"
UCI = "uci-digits.json"  # `python main.py evaluate --uci-digits`: the run's accuracy on the UCI digits, per form


class RunFolderError(UserError):
    """A run folder cannot be written, or a file in one cannot be read; the message names the path."""


def default_run_dir(recipe, seed, stamp, root=RUNS):
    """<root>/<recipe>-seed<seed>-<stamp>, not yet taken: the recipe and seed say what ran, the time stamp (and a
    counter, for runs started in the same second) keeps runs apart."""
    path = base = os.path.join(root, f"{recipe}-seed{seed}-{stamp}")
    n = 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def atomic_write(path, write, check=None):
    """Call write(file_object) on a temporary file beside `path`, then (after check(temporary path), which may
    refuse it by raising) rename it into place. Whenever it stops (an error, Ctrl-C), `path` is either the old
    file or the whole new one, and no temporary file is left."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:  # a fresh name, made with the mode open() gives (0o666 less the umask), as mkstemp's would not be
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # gone already when the stop came after the rename
            os.unlink(tmp)
        raise


def prepare(out_dir):
    """Make sure `out_dir` exists and takes files, before any training is spent on a run that could not be saved.

    Returns the folders it created (deepest last), so a run that ends without results can remove them again.
    """
    created, path = [], os.path.abspath(out_dir)
    while not os.path.exists(path):
        created.insert(0, path)
        path = os.path.dirname(path)
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # a folder we may not write into fails here
    except FileExistsError:
        raise RunFolderError(f"cannot use {out_dir} as the run folder: a file is in the way") from None
    except OSError as e:
        remove_empty(created)
        raise RunFolderError(f"cannot write into run folder {out_dir}: {e.strerror}") from None
    return created


def remove_empty(folders):
    """Remove those of `folders` (deepest last) that are empty: what prepare made for a run that saved nothing."""
    for path in reversed(folders):
        try:
            os.rmdir(path)
        except OSError:
            return


def write_files(out_dir, files, written=()):
    """Write each (name, write(file_object)) of `files` into `out_dir` atomically; return the paths written.

    A failure raises RunFolderError naming the file that failed and the files already written (`written`:
    the ones written before this call, for the message)."""
    written = list(written)
    for name, write in files:
        path = os.path.join(out_dir, name)
        try:
            atomic_write(path, write)
        except OSError as e:
            done = f"already written: {', '.join(written)}" if written else "nothing was written"
            raise RunFolderError(f"cannot write {path}: {e.strerror or e} ({done})") from None
        written.append(path)
    return written


def on_cpu(tree):
    """A state dict (or any nest of dicts and lists) with every tensor copied to the CPU: a file written on a GPU
    then loads on a machine without one."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_cpu(v) for v in tree)
    return tree


def save_checkpoint(out_dir, config, model, metrics):
    """Write model.pt into `out_dir`: {"model": state_dict, "model_name", "config", "metrics"}; return its path."""
    checkpoint = {"model": on_cpu(model.state_dict()), "model_name": metrics["model"], "config": config,
                  "metrics": metrics}
    return write_files(out_dir, [(CHECKPOINT, lambda f: torch.save(checkpoint, f))])


def save_metrics(out_dir, config, metrics, written=()):
    """Write metrics.json into `out_dir`, the file that marks a run finished; return its path."""
    text = json.dumps({"config": config, **metrics}, indent=2).encode()
    return write_files(out_dir, [(METRICS, lambda f: f.write(text))], written)[len(written):]


def save(out_dir, config, model, metrics, save_model=True):
    """Write model.pt (with save_model) and then metrics.json into `out_dir`; return the paths written."""
    written = save_checkpoint(out_dir, config, model, metrics) if save_model else []
    return written + save_metrics(out_dir, config, metrics, written)


def save_resume(out_dir, config, model_name, state, data_dir):
    """Write resume.pt: the config and model_train.train's resumable state after the epoch just finished, and
    where the data was found (an absolute path: a run resumed from another folder finds it there too)."""
    resume = {"config": config, "model_name": model_name, "state": on_cpu(state), "data_dir": os.path.abspath(data_dir)}
    write_files(out_dir, [(RESUME, lambda f: torch.save(resume, f))])


def remove_resume(out_dir):
    """A finished run keeps only its results: drop resume.pt."""
    try:
        os.remove(os.path.join(out_dir, RESUME))
    except FileNotFoundError:
        pass


def load_resume(run_dir):
    """The {"config", "model_name", "state", "data_dir"} in <run_dir>/resume.pt, checked whole (load_file) and
    its weights against the network its config names, to go on with an interrupted run."""
    path = os.path.join(run_dir, RESUME)
    if not os.path.isdir(run_dir):
        raise RunFolderError(f"{run_dir}: no such run folder")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(run_dir, METRICS)):
            raise RunFolderError(f"{run_dir}: this run is finished (it has {METRICS}); nothing to resume")
        raise RunFolderError(f"{run_dir}: no {RESUME} (only a multi-epoch run interrupted after its first epoch "
                             f"can be resumed)")
    resume = load_file(path)
    if not isinstance(resume, dict) or not isinstance(resume.get("config"), dict) \
            or not isinstance(resume.get("state"), dict) or not isinstance(resume["state"].get("model"), dict) \
            or resume.get("model_name") not in MODELS:
        raise RunFolderError(f"{path}: not a resumable state written by main.py")
    name = resume["config"].get("model")
    if name != resume["model_name"]:
        raise RunFolderError(f"{path}: its config names the {name!r} network, its weights are {resume['model_name']!r}")
    try:
        build_model(name).load_state_dict(resume["state"]["model"])
    except (RuntimeError, TypeError):
        raise RunFolderError(f"{path}: its weights do not fit the {name!r} network its config names") from None
    return resume


def resumable_epochs(run_dir):
    """How many epochs <run_dir>/resume.pt holds, read from the file itself; 0 when there is none to resume."""
    try:
        return len(load_resume(run_dir)["state"]["history"])
    except (RunFolderError, KeyError, TypeError):
        return 0


def save_uci(run_dir, accuracy, unseen=None):
    """Record a run's accuracy on the UCI digits ({form: %}: the report half of the 13 writers, and the 30
    unseen writers when they were scored) beside its metrics, for the report."""
    text = json.dumps({"half": "report", "accuracy": accuracy, "unseen": unseen}, indent=2).encode()
    return write_files(run_dir, [(UCI, lambda f: f.write(text))])


def record_uci(checkpoint_path, accuracy, unseen=None):
    """save_uci beside a checkpoint that lies in a run folder; returns where it went, in words."""
    folder = os.path.dirname(checkpoint_path) or "."
    if not os.path.exists(os.path.join(folder, METRICS)):
        return "not recorded: not a run folder"
    return f"recorded in {save_uci(folder, accuracy, unseen)[0]}"


def read_uci(run_dir, key="accuracy"):
    """The {form: %} recorded by save_uci (key "accuracy": the 13 writers' report half; "unseen": the 30 other
    writers), or None when the run has none (or it cannot be read)."""
    try:
        with open(os.path.join(run_dir, UCI)) as f:
            accuracy = json.load(f)[key]
        return {str(k): float(v) for k, v in accuracy.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read_metrics(run_dir):
    """The dict in <run_dir>/metrics.json."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isdir(run_dir):
        raise RunFolderError(f"{run_dir}: no such run folder")
    try:
        with open(path) as f:
            run = json.load(f)
    except FileNotFoundError:
        raise RunFolderError(f"{path}: no such file (is {run_dir} a run folder written by main.py?)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); is it cut off?") from None
    if not isinstance(run, dict):
        raise RunFolderError(f"{path}: not the metrics of a run")
    return run


def newest_checkpoint(root=RUNS, rows=False):
    """The most recently written <root>/*/model.pt of a digit network (with rows, of a row reader), or None."""
    found = [path for path in glob.glob(os.path.join(root, "*", CHECKPOINT))
             if (run_model(os.path.dirname(path)) in ROW_MODELS) == rows]
    return max(found, key=os.path.getmtime) if found else None


def run_model(folder):
    """The network a finished run folder trained, from its metrics (None when they cannot be read)."""
    try:
        with open(os.path.join(folder, METRICS)) as f:
            return json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
        return None


def load_named_checkpoint(path=None, model_name=None, rows_too=False):
    """(path, model, checkpoint) of a run folder (its model.pt) or a checkpoint file, or when `path` is None of the
    newest run's, else the shipped reader (SHIPPED): how predict, evaluate, serve and export find what to load. A
    row reader is refused unless rows_too (evaluate scores one): elsewhere it is named with --rows (load_row_reader)."""
    path, model, checkpoint = load_named(path, model_name, newest_checkpoint(), SHIPPED)
    if checkpoint["model_name"] in ROW_MODELS and not rows_too:
        raise RunFolderError(f"{path} holds a row reader, not a digit network: name it with --rows")
    return path, model, checkpoint


def load_row_reader(path=None):
    """(path, model, checkpoint) of a row reader (model.ROW_MODELS): a run folder or checkpoint file, or when
    `path` is None the newest row reader's run, else the shipped one (SHIPPED_ROWS)."""
    path, model, checkpoint = load_named(path, None, newest_checkpoint(rows=True), SHIPPED_ROWS)
    if checkpoint["model_name"] not in ROW_MODELS:
        raise RunFolderError(f"{path} holds a {checkpoint['model_name']!r} digit network, not a row reader")
    return path, model, checkpoint


def load_named(path, model_name, newest, shipped):
    """load_named_checkpoint's and load_row_reader's search: the named path, else `newest`, else `shipped`."""
    if path and os.path.isdir(path):
        folder, path = path, os.path.join(path, CHECKPOINT)
        if not os.path.exists(path):
            raise RunFolderError(f"{folder}: {missing_checkpoint(folder)}")
    path = path or newest or (shipped if os.path.exists(shipped) else None)
    if path is None:
        raise RunFolderError(f"no checkpoint in {RUNS}/: train one first with `python main.py`, or name one")
    return (path, *load_checkpoint(path, model_name))


def missing_checkpoint(folder):
    """Why a folder has no model.pt, and what to do, in words."""
    if os.path.exists(os.path.join(folder, RESUME)):
        return (f"an interrupted run, with no {CHECKPOINT} yet: finish it with `python main.py --resume {folder}`")
    if os.path.exists(os.path.join(folder, METRICS)):
        return f"a run that saved no {CHECKPOINT} (--no-save-model): train it again without that flag"
    return f"no {CHECKPOINT} here: name a run folder written by main.py, or its model.pt"


def load_file(path):
    """torch.load(path, weights_only=True) after checking the CRC-32 of every record in the file (torch's format
    is a zip archive; torch.load itself checks none, and would load flipped bytes as weights); failures as
    RunFolderError."""
    hint = "" if os.path.basename(path) == RESUME else ": name a run folder or its model.pt"
    if os.path.isdir(path):
        raise RunFolderError(f"{path}: is a directory, not a checkpoint")
    if not os.path.exists(path):
        raise RunFolderError(f"{path}: no such checkpoint")
    try:
        if not zipfile.is_zipfile(path):  # torch.save's format; anything else would fail deep inside torch.load
            raise RunFolderError(f"{path}: not a checkpoint (main.py writes zip archives; this file is not one){hint}")
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise RunFolderError(f"{path}: damaged (the checksum of {damaged.split('/', 1)[-1]} does not match "
                                 f"what it holds)")
        return torch.load(path, map_location="cpu", weights_only=True)
    except RunFolderError:
        raise
    except OSError as e:
        raise RunFolderError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # torch.load raises many kinds for an archive that is not a plain checkpoint
        raise RunFolderError(f"{path}: not a checkpoint written by main.py (torch.load with weights_only=True "
                             f"refuses it: {type(e).__name__}){hint}") from None


def load_checkpoint(path, model_name=None):
    """Load a checkpoint written by save(); return (model in eval mode, checkpoint dict).

    With `model_name`, a checkpoint of another network is refused, naming both.
    """
    checkpoint = load_file(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict) \
            or checkpoint.get("model_name") not in MODELS:
        raise RunFolderError(f"{path}: not a checkpoint of this project (no known model_name and state_dict)")
    name = checkpoint["model_name"]
    if model_name is not None and name != model_name:
        raise RunFolderError(f"{path} holds a {name!r} network, not the {model_name!r} network asked for")
    model = build_model(name)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise RunFolderError(f"{path}: its weights do not fit the {name!r} network it names") from None
    return model.eval(), checkpoint


class Run:
    """A training run's life in its folder, as a context manager:

        with Run.new(config, out_dir) as run:                 # or Run.resume(run_dir)
            model, metrics = model_train.train(run.config, on_epoch=run.on_epoch, resume=run.state)
            run.finish(model, metrics)

    Entering prepares the folder, before any training is spent on a run that could not be saved. on_epoch writes
    resume.pt after every epoch. finish writes model.pt, the plots and, last, metrics.json (the file that marks a
    run finished), then drops resume.pt. Leaving on Ctrl-C or a failure to write says what the folder holds, read
    from the folder rather than remembered, so an interrupt at any instant says the truth: the finished run, the
    epoch resume.pt holds and the command that goes on from it, or nothing; a folder made for a run that saved
    nothing is removed again."""

    def __init__(self, config, out_dir, stored=None, state=None, write=True, save_model=True, log=print):
        self.config, self.out_dir, self.state = config, out_dir, state
        self.stored = dataclasses.asdict(config) if stored is None else stored  # the config the files record
        self.write, self.save_model, self.log = write, save_model, log
        self.created = []

    @classmethod
    def new(cls, config, out_dir=None, save_model=True, log=print, dry_run=False):
        """A run from the start, into out_dir (default: default_run_dir); a dry run writes only where told to."""
        write = not dry_run or out_dir is not None
        if out_dir is None:
            out_dir = default_run_dir(config.recipe, config.seed, time.strftime("%Y%m%d-%H%M%S"))
        return cls(config, out_dir, write=write, save_model=save_model, log=log)

    @classmethod
    def resume(cls, run_dir, data_dir=None, save_model=True, log=print):
        """The interrupted run in run_dir, from its resume.pt; data_dir (where MNIST is) overrides the stored one."""
        resume = load_resume(run_dir)
        config = recipes.config_from_dict(resume["config"])
        config = dataclasses.replace(config, data_dir=data_dir or resume.get("data_dir") or config.data_dir)
        return cls(config, run_dir, stored=resume["config"], state=resume["state"], save_model=save_model, log=log)

    @property
    def on_epoch(self):
        """model_train.train's on_epoch: resume.pt written after every epoch; None when the run writes nothing."""
        return self.save_epoch if self.write else None

    def save_epoch(self, state):
        save_resume(self.out_dir, self.stored, self.config.model, state, self.config.data_dir)

    def __enter__(self):
        if self.write and self.state is None:
            # Never over another run: its results, or the state it would go on from, would be overwritten.
            if os.path.exists(os.path.join(self.out_dir, METRICS)):
                raise RunFolderError(f"{self.out_dir} already holds a finished run: choose another --out-dir")
            if os.path.exists(os.path.join(self.out_dir, RESUME)):
                raise RunFolderError(f"{self.out_dir} already holds an interrupted run: go on with "
                                     f"`python main.py --resume {self.out_dir}`, or choose another --out-dir")
            self.created = prepare(self.out_dir)
        return self

    def finish(self, model, metrics, draw=None):
        """Write the results: model.pt, the figures (`draw(out_dir, metrics, data_dir, written)` writes them and
        returns their names: plots.save_plots), then metrics.json; then drop resume.pt."""
        if not self.write:
            self.log("a dry run: nothing was written (--out-dir DIR keeps its files)")
            return
        written = save_checkpoint(self.out_dir, self.stored, model, metrics) if self.save_model else []
        figures = draw(self.out_dir, metrics, self.config.data_dir, written) if draw else []
        written += [os.path.join(self.out_dir, name) for name in figures]
        written += save_metrics(self.out_dir, self.stored, metrics, written)
        remove_resume(self.out_dir)
        self.log(f"wrote {', '.join(written)}")

    def kept(self):
        """What the folder holds of this run, in words ("" for nothing), read from the folder itself."""
        if not self.write:
            return ""
        if os.path.exists(os.path.join(self.out_dir, METRICS)):  # written last: every result is there
            remove_resume(self.out_dir)
            return f"the finished run is saved in {self.out_dir}"
        epochs = resumable_epochs(self.out_dir)
        if not epochs:
            return ""
        return (f"{self.out_dir} keeps the run after epoch {epochs} of {self.config.epochs}; go on with "
                f"`python main.py --resume {self.out_dir}`")

    def __exit__(self, kind, error, traceback):
        if error is None:
            return False
        try:
            if isinstance(error, KeyboardInterrupt):
                error.args = (self.kept() or "nothing was saved",)  # main prints it after "interrupted: "
            elif isinstance(error, (RunFolderError, OSError)):  # a failure to write: what was kept can go on
                kept = self.kept()
                if kept:
                    raise RunFolderError(f"{error}; {kept}") from None
        finally:
            remove_empty(self.created)
        return False
