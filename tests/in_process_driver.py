"""A job that runs its own process group and calls esm_features' main() in-process, several times.

    torchrun --nproc_per_node=N tests/in_process_driver.py CALLS.json RESULTS

CALLS.json holds a list of argument lists. Each rank writes RESULTS.rank<R>.json: the exit codes, whether
the group is still initialised, the sum of (rank + 1) over the group afterwards, and threads left over.
"""

import json
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from extract.esm_features import main as esm_features  # noqa: E402


def main() -> None:
    calls = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
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
