"""A run folder: metrics.json (the config and every figure) and model.pt (the checkpoint), written atomically;
while a multi-epoch run trains, also resume.pt, the state to resume it from after an interruption.

The checkpoint is {"model": state_dict, "model_name", "config", "metrics"}; it and resume.pt are always read
back with torch.load(..., weights_only=True), so nothing in a file is ever run. Every failure a user can cause
(a folder that cannot be written, a missing or damaged file) raises RunFolderError with a one-line message.
"""
import glob
import json
import os
import tempfile

import torch

from model import MODELS, build_model

RUNS = "runs"  # where main.py puts its run folders
METRICS, CHECKPOINT, RESUME = "metrics.json", "model.pt", "resume.pt"
UCI = "uci-digits.json"  # `python main.py evaluate --uci-digits`: the run's accuracy on the UCI digits, per form
UMASK = os.umask(0o022)  # read once, at import: os.umask can only be read by setting it
os.umask(UMASK)


class RunFolderError(Exception):
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


def atomic_write(path, write):
    """Call write(file_object) on a temporary file beside `path`, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes the file private; give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
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


def save(out_dir, config, model, metrics, save_model=True):
    """Write metrics.json and, with save_model, model.pt into `out_dir`; return the paths written."""
    text = json.dumps({"config": config, **metrics}, indent=2).encode()
    files = [(METRICS, lambda f: f.write(text))]
    if save_model:
        checkpoint = {"model": model.state_dict(), "model_name": metrics["model"], "config": config,
                      "metrics": metrics}
        files.append((CHECKPOINT, lambda f: torch.save(checkpoint, f)))
    return write_files(out_dir, files)


def save_resume(out_dir, config, model_name, state):
    """Write resume.pt: the config and model_train.train's resumable state after the epoch just finished."""
    resume = {"config": config, "model_name": model_name, "state": state}
    write_files(out_dir, [(RESUME, lambda f: torch.save(resume, f))])


def remove_resume(out_dir):
    """A finished run keeps only its results: drop resume.pt."""
    try:
        os.remove(os.path.join(out_dir, RESUME))
    except FileNotFoundError:
        pass


def load_resume(run_dir):
    """The {"config", "model_name", "state"} in <run_dir>/resume.pt, to go on with an interrupted run."""
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
            or not isinstance(resume.get("state"), dict) or resume.get("model_name") not in MODELS:
        raise RunFolderError(f"{path}: not a resumable state written by main.py")
    return resume


def save_uci(run_dir, accuracy):
    """Record a run's accuracy on the UCI digits ({form: %}) beside its metrics, for the report."""
    text = json.dumps({"half": "report", "accuracy": accuracy}, indent=2).encode()
    return write_files(run_dir, [(UCI, lambda f: f.write(text))])


def read_uci(run_dir):
    """The {form: %} recorded by save_uci, or None when the run has none (or it cannot be read)."""
    try:
        with open(os.path.join(run_dir, UCI)) as f:
            accuracy = json.load(f)["accuracy"]
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


def newest_checkpoint(root=RUNS):
    """The most recently written <root>/*/model.pt, or None."""
    found = glob.glob(os.path.join(root, "*", CHECKPOINT))
    return max(found, key=os.path.getmtime) if found else None


def load_named_checkpoint(path=None, model_name=None):
    """(path, model, checkpoint) of a run folder (its model.pt) or a checkpoint file, or of the newest run's
    when `path` is None: how predict, evaluate and serve find what to load."""
    path = (os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path) if path else newest_checkpoint()
    if path is None:
        raise RunFolderError(f"no checkpoint in {RUNS}/: train one first with `python main.py`, or name one")
    return (path, *load_checkpoint(path, model_name))


def load_file(path):
    """torch.load(path, weights_only=True), its failures as RunFolderError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunFolderError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise RunFolderError(f"{path}: is a directory, not a checkpoint") from None
    except Exception as e:  # torch.load raises many kinds for a file that is not a plain checkpoint
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise RunFolderError(f"{path}: not a readable checkpoint ({reason})") from None


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
