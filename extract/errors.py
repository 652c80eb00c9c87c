"""The errors a user sees as one plain line instead of a traceback."""


class UserError(Exception):
    """Bad usage or bad input: one line naming what is wrong; exit code 2."""

    exit_code = 2


class JobError(Exception):
    """The job could not finish for a reason other than bad input; exit code 1."""

    exit_code = 1
