"""torchrun, except that SIGUSR1 stops the workers the way SIGTERM does, and a stop reads as one line.

torchrun's agent passes SIGTERM and SIGINT on to its workers and waits for them, but SIGUSR1, which
Slurm's `--signal` and many preemption set-ups send ahead of a time limit, would simply kill the agent
(its default action) and leave the workers running unsupervised. Here the agent answers SIGUSR1 with a
SIGTERM to itself: the workers get SIGTERM, stop at their next safe point, and the agent waits for
them without restarting them, then exits with 128 + the number of the signal it received.
Arguments are torchrun's.
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
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as stop:
        stopped_by = (received or [signal.Signals(stop.sigval)])[0]
        # One write, so that lines of agents sharing a log never interleave.
        sys.stderr.write(f"torchrun: stopped the workers on {stopped_by.name}; rerun the same command to resume\n")
        sys.stderr.flush()
        return 128 + stopped_by.value
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _stop_workers_as_on_sigterm)  # before the slow import of torch
    sys.exit(main())
