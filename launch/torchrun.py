"""`python -m launch.torchrun [torchrun's arguments]`: torchrun (`torch.distributed.run`: the same arguments, the
same elastic agent), except that a job whose first failing worker exited with code 2 exits 2 with nothing more.

Code 2 is a configuration error, which `python -m train` prints once, on rank 0 (train/__main__.py). Plain
`torchrun` cannot stay quiet about it: its elastic agent (torch 2.13, `launch_agent` in
torch/distributed/launcher/api.py) raises ChildFailedError for every worker exit code other than 0, whatever the
code and whether or not the worker wrote an error file; `torchrun`'s `main` lets it escape, so Python prints its
traceback and the failure report (~35 lines), and torchrun exits 1 whatever the workers' code. No exit code or
error file makes it treat a failure as reported. This entry runs the same `torch.distributed.run.run` and catches
that ChildFailedError: code 2 is the job's exit code, silently; any other failure ends with one summary line (the
first rank that failed and how, then the others; the workers' own output, e.g. a failed collective's report from
train/watch.py, comes before it) and exit code 1. With --max-restarts > 0 every rendezvous round gets its own
store. `python -m launch` starts its workers through this module.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

CONFIG_EXIT = 2  # train/errors.py's CONFIG_EXIT (launch reads no train internals it need not)


class _HeldBack(logging.Filter):
    """Holds the records of the agent's process handling (a worker's failure, the signal that closes the others)
    until the job ends: they are dropped when it ended with a configuration error, which rank 0 has said, and
    replayed otherwise."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.append(record)
        return False


def summary(error) -> str:
    """A failed job (torchrun's ChildFailedError) in one line: the first rank that failed and how, then the others."""
    first_rank, first = error.get_first_failure()

    def how(rank: int, failure) -> str:
        if failure.exitcode < 0:
            return f"rank {rank} killed by {failure.signal_name()}"
        return f"rank {rank} exit {failure.exitcode}"

    others = [how(r, f) for r, f in sorted(error.failures.items()) if r != first_rank]
    then = f"; then {', '.join(others)}" if others else ""
    return f"launch: {error.name} failed on {socket.gethostname()}: first {how(first_rank, first)}{then}"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_restarts > 0:
        # torchrun's workers otherwise share the rendezvous store across restarts without a per-round prefix, and
        # the restarted process group reads the previous round's peer addresses (gloo: "Connection refused")
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    hold = _HeldBack()
    agent_log.addFilter(hold)
    code, last = 0, None  # last: the job's one summary line, printed after the agent's records
    try:
        run(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        code = CONFIG_EXIT if first.exitcode == CONFIG_EXIT else 1
        last = None if code == CONFIG_EXIT else summary(e)
    except Exception as e:  # noqa: BLE001 — the rendezvous and the agent raise many types; each ends the node's job
        text = (str(e).strip().splitlines() or [""])[0]
        code, last = 1, f"launch: torchrun on {socket.gethostname()} stopped: {type(e).__name__}: {text}"
    finally:
        agent_log.removeFilter(hold)
        for record in hold.held if code != CONFIG_EXIT else []:
            agent_log.handle(record)
    if last:
        print(last, file=sys.stderr, flush=True)
    return code

if __name__ == "__main__":
    sys.exit(main())
