"""torchrun that exits with the exit status of the first rank that failed.

Run as:
    python -m lorafleet.torchrun [torchrun arguments] -m services.trainer.recipe CONFIG.yaml

torchrun itself exits 1 whatever its workers returned. The recipe exits 2 for an invalid job (bad
config or data), which launchers must not retry: through plain torchrun that status is lost, and a
local or Kubernetes launcher (whose ``podFailurePolicy`` fails the Job on exit status 2) would retry
an invalid job like a crash. A rank killed by signal ``N`` becomes ``128 + N``, as a shell reports it.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    sys.argv = ["torch.distributed.run", *sys.argv[1:]]
    try:
        runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        sys.exit(code if code > 0 else 128 - code if code < 0 else 1)


if __name__ == "__main__":
    main()
