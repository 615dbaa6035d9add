"""torchrun (``torch.distributed.run``, same arguments), with a stop signal said in one line.

On Ctrl-C or a scheduler's SIGTERM, torchrun passes the signal on to its processes, waits for them
(ours save and exit 75) and then raises its own ``SignalException``: a 30-line traceback that ends
the output of a stop that went as planned, and exit status 1, as for a crash. Here it is one line
and the shell's status for the signal (130 for SIGINT, 143 for SIGTERM), which run.sh reads.

    python -m pretrain.engine.torchrun --nproc_per_node 8 -m pretrain train --config ...
"""
from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.run import main as torchrun_main


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as stop:
        name = signal.Signals(stop.sigval).name
        print(f"torchrun: {name} passed on to its processes, which have ended (their own lines above say "
              "whether they saved)", file=sys.stderr, flush=True)
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
