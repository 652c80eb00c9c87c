"""The ways a job ends other than complete, each shown to the user as one plain line, never a traceback."""

import signal


class UserError(Exception):
    """Bad usage or bad input: one line naming what is wrong; exit code 2."""

    exit_code = 2
    prefix = "error: "


class JobError(Exception):
    """The job could not finish for a reason other than bad input; exit code 1."""

    exit_code = 1
    prefix = "error: "


def peers_lost() -> JobError:
    """A collective or the group's store failed: another rank is gone (torchrun is ending the job)."""
    return JobError("lost contact with another rank of this job (it failed or was stopped); "
                    "rerun the same command to resume")


class StopRequested(Exception):
    """A signal asked the job to stop; it did at a safe point. Exit code 128 + the signal's number,
    as a shell reports a process ended by that signal."""

    prefix = ""

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        self.exit_code = 128 + signal.Signals[signal_name].value
        super().__init__(f"stopped by {signal_name}; every finished row is saved; "
                         f"rerun the same command to resume")
