"""The one kind of error a user's mistake or circumstance raises (a missing file, a damaged checkpoint, a device
that is not there): main.py alone catches it, prints its message on one line and exits with its status. Every
other exception is a bug, and shows its traceback.

Each module raises its own subclass (data_file.DataError, run_folder.RunFolderError, ...), so a message says
where it comes from; none of them is found by its name.
"""


class UserError(Exception):
    """A mistake or circumstance the user can put right; the message says what is wrong and what to do."""
    exit_status = 1


class CommandError(UserError):
    """A command found nothing to work on, or could not start."""
