"""The launchers run.sh starts multi-process training with, ending a stop on a signal cleanly.

``python -m pretrain.engine.launchers torchrun ARGS`` is ``torchrun ARGS``, and ``... deepspeed ARGS``
is ``deepspeed ARGS`` (the DeepSpeed launcher), except after Ctrl-C or a scheduler's SIGTERM:

- torchrun passes the signal on to its processes, waits for them (ours save and exit 75), then
  raises its own ``SignalException``: a 30-line traceback after a stop that went as planned, and
  status 1, as for a crash.
- The DeepSpeed launcher on one node ends at once (a ``KeyboardInterrupt`` traceback, or killed by
  SIGTERM) while the per-node launcher it started is still stopping the processes, which save:
  run.sh would say the stage stopped, and a requeueing wrapper start it again, while they still
  write; and a SIGTERM to it alone reached nobody. Here it passes the signal on to the per-node
  launcher, which sends its processes SIGTERM (again, when the whole group got the signal too: our
  processes take a repeated stop request as one), and waits for it. Several nodes over pdsh keep
  DeepSpeed's own handling.

Under a dynamic rendezvous (``--rdzv-backend c10d``, ``--standalone``) torchrun's workers form each
round's group through a store of their own (``_round_stores_apart``).

Both also pass a SIGUSR1 on (torchrun's default set of signals leaves it out: it ended at once,
its processes unsaved), and then say the stop in one line and end with the shell's status for the
signal (130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1), which run.sh reads.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys

from data_tools.command import HANGUP_STOPS_ENV, STOP_SIGNALS, StopRequests, leave_a_hung_up_terminal


def _say_stopped(launcher: str, signum: int) -> int:
    leave_a_hung_up_terminal()
    print(f"{launcher}: {signal.Signals(signum).name} passed on to its processes, which have ended (their own "
          "lines above say whether they saved)", file=sys.stderr, flush=True)
    return 128 + int(signum)


def _one_stop_request(api) -> StopRequests | None:
    """torchrun raises its SignalException for every signal it handles. A scheduler's SIGTERM to the
    process group and run.sh's pass-on of it (for a SIGTERM to run.sh alone, or a Ctrl-C) are one
    request, but a second one, arriving while torchrun stopped its processes, raised again there: a
    traceback, and its processes signalled again as they saved. So the same request again is dropped;
    a second Ctrl-C still counts (stop at once) (:class:`StopRequests`). torchrun looks its handler up
    by this module-level name when it installs it (no public hook); a torch without it keeps its own
    handling."""
    raise_stop = getattr(api, "_terminate_process_handler", None)
    if raise_stop is None:
        return None
    requests = StopRequests()

    def once(signum, frame):
        if signum == signal.SIGHUP and signal.SIGHUP not in STOP_SIGNALS:
            return  # under nohup: a torch before 2.9 handles a hang-up whatever --signals-to-handle says
        if requests.take(signum) != StopRequests.AGAIN:
            raise_stop(signum, frame)

    api._terminate_process_handler = once
    return requests


def _handle_sigusr1_before_torch_2_9(api) -> None:
    """torchrun has --signals-to-handle from torch 2.9; before, it handles SIGTERM, SIGINT, SIGHUP and
    SIGQUIT only, and a SIGUSR1 ended it at once, unsaved. There its handler is set for SIGUSR1 here, so
    that the stop goes the same way: torchrun passes the signal on to its processes, which save."""
    from torch.distributed.run import get_args_parser

    if getattr(api, "_terminate_process_handler", None) is None or any(
            "--signals-to-handle" in action.option_strings for action in get_args_parser()._actions):
        return
    signal.signal(signal.SIGUSR1, lambda signum, frame: api._terminate_process_handler(signum, frame))


def _round_stores_apart(args, env=os.environ) -> None:
    """Under a dynamic rendezvous, each round of workers forms its process group through a store of its
    own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0 of the round serves one on a port chosen for the
    round). Shared, the agent's store outlives the rounds, and the workers' only key for a round, their
    restart count, is their node's own (pytorch issue 108158): a node whose processes were restarted
    for another node's failure (or for a node joining) keeps its count, so the nodes' counts differed
    and the new round waited until the timeout, and again in every round after (measured: two nodes,
    one worker killed, `--max-restarts 2`: all restarts spent). Under a static rendezvous (run.sh's
    `--master_port`) every restart is a node's own failure, and the count keys the round
    (``distributed.restart_safe_store``). A value given wins. ``args``: torchrun's parsed arguments."""
    if args.standalone or args.rdzv_backend != "static":
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")


@contextlib.contextmanager
def _log_folder_removed_when_empty(log_dir: str | None, env=os.environ):
    """torchrun makes a ``torchelastic_*`` folder in the temporary folder at every launch, for its
    processes' error records, and never removes it: a node that trains often collects them by the
    thousand. Unless ``--log-dir`` says where, the folder is made here and removed at the end when no
    file was written into it (a process's error record is kept, and said)."""
    import shutil
    import tempfile

    if log_dir:  # torchrun's --log-dir, or PET_LOG_DIR
        yield
        return
    folder = tempfile.mkdtemp(prefix="torchelastic_")
    env["PET_LOG_DIR"] = folder
    try:
        yield
    finally:
        env.pop("PET_LOG_DIR", None)
        if any(files for _, _, files in os.walk(folder)):
            print(f"torchrun: its processes' records are kept in {folder}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def torchrun(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException, api
    from torch.distributed.run import get_args_parser, main

    # torchrun's default --signals-to-handle leaves out SIGUSR1 (a preemption notice, as SLURM's
    # --signal sends it), whose default action ended torchrun at once, and its processes with it,
    # unsaved: passed on, our processes take it as a stop request. The flag, given, still wins.
    # Under nohup SIGHUP stays ignored, here and (inherited) in the processes (data_tools.command).
    hangup = ",SIGHUP" if signal.SIGHUP in STOP_SIGNALS else ""
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGQUIT,SIGUSR1" + hangup)
    args = get_args_parser().parse_args(argv)
    _round_stores_apart(args)
    requests = _one_stop_request(api)
    _handle_sigusr1_before_torch_2_9(api)
    try:
        with _log_folder_removed_when_empty(args.log_dir):
            main(argv)
    except SignalException as stop:
        return _say_stopped("torchrun", stop.sigval if requests is None else requests.signum)
    return 0


def deepspeed(argv: list[str]) -> int:
    import psutil
    from deepspeed.launcher.runner import main

    requests = StopRequests()

    def pass_on(signum, frame):
        if requests.take(signum) == StopRequests.AGAIN:
            return  # the same stop request again (as torchrun's, _one_stop_request); a second Ctrl-C still counts
        launchers = psutil.Process().children()
        if not launchers:  # none started yet: nothing to wait for
            raise SystemExit(128 + signum)
        for launcher in launchers:  # DeepSpeed's per-node launcher would die of a SIGUSR1: SIGTERM for it
            with contextlib.suppress(psutil.NoSuchProcess):
                launcher.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    # A hang-up of the terminal reaches the launchers and the processes alike (one process group): the
    # processes save on it; DeepSpeed's per-node launcher, which has no handler for it, died, and the
    # kernel killed its processes with it (die_with_launcher), unsaved. Ignored here, and so in the
    # launchers started from here (an ignored signal stays ignored across exec; our processes set
    # their own handler, told by HANGUP_STOPS_ENV; not under nohup). run.sh passes a SIGHUP to it alone
    # on as SIGTERM.
    if signal.SIGHUP in STOP_SIGNALS:
        os.environ[HANGUP_STOPS_ENV] = "1"
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, pass_on)
    try:
        main(argv)
        status = 0
    except SystemExit as end:  # the launcher's way of passing on its processes' status
        status = 0 if end.code is None else end.code if isinstance(end.code, int) else 1
    return _say_stopped("deepspeed", requests.signum) if requests.signum is not None else status


LAUNCHERS = {"torchrun": torchrun, "deepspeed": deepspeed}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in LAUNCHERS:
        print(f"usage: python -m pretrain.engine.launchers {{{','.join(LAUNCHERS)}}} LAUNCHER_ARGS...", file=sys.stderr)
        return 2
    sys.argv[0] = argv[0]  # the launcher's own messages name it as its command does
    return LAUNCHERS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
