"""torchrun, except that SIGUSR1 stops the workers the way SIGTERM does, and a stop reads as one line.

torchrun's agent passes SIGTERM and SIGINT on to its workers and waits for them, but SIGUSR1, which
Slurm's `--signal` and many preemption set-ups send ahead of a time limit, would simply kill the agent
(its default action) and leave the workers running unsupervised. Here the agent answers SIGUSR1 with a
SIGTERM to itself: the workers get SIGTERM, stop at their next safe point, and the agent waits for
them without restarting them, then exits with 128 + the number of the signal it received. When the
workers fail for good (after any restarts), it exits with the first failed worker's exit code (2 for bad
input or usage) and one line, instead of torchrun's traceback. Arguments are torchrun's.
"""

import os
import signal
import sys

received = []


def _stop_workers_as_on_sigterm(signum, _frame) -> None:
    received.append(signal.Signals(signum))
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as stop:
        stopped_by = (received or [signal.Signals(stop.sigval)])[0]
        _say(f"torchrun: stopped the workers on {stopped_by.name}; rerun the same command to resume")
        return 128 + stopped_by.value
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode  # -N: killed by signal N
        _say(f"torchrun: the workers failed (rank {rank} first, exit code {code}); their own lines say why")
        return code
    return 0


def _say(line: str) -> None:
    """One write, so that lines of agents sharing a log never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _stop_workers_as_on_sigterm)  # before the slow import of torch
    sys.exit(main())
