"""The straggler sampler (train/straggler.py) in one process: which collective a stack waits in, and the share of
the time a thread spends there. The multi-rank report (a slowed rank named once) is in tests/test_multihost.py."""

import sys
import threading
import time

from train.metrics import tag_for
from train.straggler import ThreadWatch, WaitSampler, _over_median, thread_stack, waiting_in

# a stand-in for torch.distributed's module: frames of code compiled under its file name look like its calls
C10D = {}
exec(compile("def all_reduce(fn):\n    return fn()\n", "/site-packages/torch/distributed/distributed_c10d.py",
             "exec"), C10D)


def reduce_losses(fn):
    return C10D["all_reduce"](fn)


def stack_of(frame) -> list[tuple[str, str]]:
    stack = []
    while frame is not None:
        stack.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    return stack


def test_a_stack_in_a_collective_names_the_call_and_the_function_that_made_it():
    inside = reduce_losses(lambda: stack_of(sys._getframe(0)))
    assert waiting_in(inside) == "torch.distributed.all_reduce in reduce_losses"
    assert waiting_in(stack_of(sys._getframe(0))) is None


def test_the_stack_read_from_faulthandler_is_the_threads_own():
    """Another thread reads this one's stack (the sampler's way): the same entries as walking it here."""
    watch, got = ThreadWatch(), {}
    here = reduce_losses(lambda: stack_of(sys._getframe(0)))
    release = threading.Event()

    def look():  # until the thread is inside release.wait (it may still be starting this thread)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got["stack"] = watch._stack()
            if [n for _, n in got["stack"][:3]] == ["wait", "wait", "wait_here"]:
                break
            time.sleep(0.01)
        release.set()

    def wait_here():
        threading.Thread(target=look).start()
        release.wait()
        return stack_of(sys._getframe(0))

    mine = reduce_losses(wait_here)
    watch.close()
    # the reader saw this thread inside Event.wait (Condition.wait inside it), called from the frames of `mine`
    assert [n for _, n in got["stack"][:2]] == ["wait", "wait"] and got["stack"][2:6] == mine[:4]
    assert waiting_in(got["stack"]) == waiting_in(here) == "torch.distributed.all_reduce in reduce_losses"
    assert thread_stack('Thread 0x00000000000000ff (most recent call first):\n  File "/a b.py", line 3 in f\n'
                        'Current thread 0x0000000000000001 (most recent call first):\n  File "/c.py", line 1 in g\n',
                        255) == [("/a b.py", "f")]


def test_the_sampler_charges_the_time_in_a_collective_to_it():
    sampler = WaitSampler(interval=0.005)
    end = time.perf_counter() + 0.1
    while time.perf_counter() < end:  # own work, running
        pass
    reduce_losses(lambda: time.sleep(0.3))  # waiting
    fraction, waited = sampler.take()
    sampler.close()
    assert 0.6 < fraction < 0.9, fraction  # 0.3 s of 0.4 s
    assert list(waited) == ["torch.distributed.all_reduce in reduce_losses"]


def test_straggler_metrics_names():
    assert _over_median([0.1, 0.5, 0.1, 0.3], 1) == 0.5 / 0.1
    assert _over_median([0.0, 0.2], 1) == 0.2 / 0.01  # a median under one sample interval counts as one
    assert tag_for("step_time/max_over_median") == "perf/step_time/max_over_median"


def test_the_sampler_names_operations_from_code_alone():
    assert waiting_in([("/repo/parallel/expert.py", "compute")]) == "the expert all-to-all (combine, forward)"
    fsdp = "/site-packages/torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py"
    assert waiting_in([(fsdp, "post_backward"), ("/repo/x.py", "f")]) == "the FSDP reduce-scatter"
    assert waiting_in([("/repo/parallel/expert.py", "helper")]) is None
