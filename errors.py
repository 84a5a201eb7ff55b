"""The one kind of error a user's mistake or circumstance raises (a missing file, a damaged checkpoint, a device
that is not there): main.py alone catches it, prints its message on one line and exits with its status. Every
other exception is a bug, and shows its traceback.

Each module raises its own subclass (data_file.DataError, run_folder.RunFolderError, ...), so a message says
where it comes from; none of them is found by its name.
"""
import sys


class UserError(Exception):
    """A mistake or circumstance the user can put right; the message says what is wrong and what to do."""
    exit_status = 1


class CommandError(UserError):
    """A command found nothing to work on, or could not start."""


def exit_status(work):
    """Run a script's `work()` and return its exit status, as main.py does for its commands: 0 (or what work
    returns), a UserError's status after its one line on stderr, 130 after Ctrl-C."""
    try:
        return work() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
