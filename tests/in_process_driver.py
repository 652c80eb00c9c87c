"""A job that runs its own process group and calls esm_features' main() in-process, several times.

    torchrun --nproc_per_node=N tests/in_process_driver.py CALLS.json RESULTS

CALLS.json holds a list of argument lists. Each rank writes RESULTS.rank<R>.json: the exit codes, whether
the group is still initialised, the sum of (rank + 1) over the group afterwards, and threads left over.
With STOP_RANK_1_IN_ITS_FIRST_BATCH set, rank 1 sends itself SIGTERM in the first call's first batch, and
rank 0 takes two seconds more to mark the output, so that rank 1 waits for it at the last barrier.
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from extract.engine import batch_runner  # noqa: E402
from extract.output import hdf5_file  # noqa: E402
from extract.esm_features import main as esm_features  # noqa: E402


def stop_rank_1_in_its_first_batch() -> None:
    if dist.get_rank() == 0:
        mark_complete = hdf5_file.mark_complete

        def slowly(*args, **kwargs):
            time.sleep(2)
            return mark_complete(*args, **kwargs)

        hdf5_file.mark_complete = slowly
        return
    run = batch_runner.BatchRunner.run
    first = [True]

    def stop_then_run(self, prepared):
        if first[0]:
            first[0] = False
            os.kill(os.getpid(), signal.SIGTERM)  # a stop request, acted on at this rank's next safe point
        return run(self, prepared)

    batch_runner.BatchRunner.run = stop_then_run


def main() -> None:
    calls = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    if os.environ.get("STOP_RANK_1_IN_ITS_FIRST_BATCH"):
        stop_rank_1_in_its_first_batch()
    threads = threading.active_count()
    codes = [esm_features(argv) for argv in calls]
    total = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(total)
    result = {"codes": codes, "initialized": dist.is_initialized(), "sum": int(total),
              "threads_left": threading.active_count() - threads}
    Path(f"{sys.argv[2]}.rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
