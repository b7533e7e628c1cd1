"""`python -m launch.agent <torchrun arguments>`: torchrun (torch.distributed.run, the elastic agent of one node), with
its failure report summarised in one line instead of a traceback and a box per rank. The workers' own output (a
failed collective's report, train/watch.py) comes before it.
"""

from __future__ import annotations

import os
import socket
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def summary(error: ChildFailedError) -> str:
    """One line: the first rank that failed and how, then the others."""
    first_rank, first = error.get_first_failure()

    def how(rank: int, failure) -> str:
        if failure.exitcode < 0:
            return f"rank {rank} killed by {failure.signal_name()}"
        return f"rank {rank} exit {failure.exitcode}"

    others = [how(r, f) for r, f in sorted(error.failures.items()) if r != first_rank]
    then = f"; then {', '.join(others)}" if others else ""
    return f"launch: {error.name} failed on {socket.gethostname()}: first {how(first_rank, first)}{then}"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.max_restarts > 0:
        # torchrun's workers otherwise share the rendezvous store across restarts without a per-round prefix, and
        # the restarted process group reads the previous round's peer addresses (gloo: "Connection refused")
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(args)
    except ChildFailedError as e:
        print(summary(e), file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # noqa: BLE001 — the rendezvous and the agent raise many types; each ends the node's job
        text = str(e).strip().splitlines()
        print(f"launch: torchrun on {socket.gethostname()} stopped: {type(e).__name__}: {text[0] if text else ''}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
