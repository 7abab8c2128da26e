"""Run one attempt's command and leave its exit status in a file.

The local launcher starts this wrapper in a new session (its own process group), so that:

- the attempt outlives a killed service, and a restarted service can still learn how it ended: the
  exit status is in ``exit_status.json``, not only in a ``wait()`` that died with the old service;
- cancel can signal the whole group at once.

Run as:
    python -m services.trainer.launchers.supervise --status FILE --log FILE -- COMMAND...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _write_status(path: Path, code: int) -> None:
    """Atomic write: a reader sees no file or the whole status."""
    status: dict[str, object] = {"exit_code": code, "finished_at": time.time()}
    if code < 0:
        status["signal"] = signal.Signals(-code).name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--status", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    with open(args.log, "ab", buffering=0) as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def forward(signum: int, _frame: object) -> None:
            # The launcher signals the whole group; forwarding covers a signal sent to us alone.
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        code = child.wait()
    _write_status(Path(args.status), code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
