"""The straggler sampler (train/straggler.py) in one process: which collective a stack waits in, and the share of
the time a thread spends there. The multi-rank report (a slowed rank named once) is in tests/test_multihost.py."""

import sys
import time

from train.metrics import tag_for
from train.straggler import WaitSampler, _over_median, waiting_in

# a stand-in for torch.distributed's module: frames of code compiled under its file name look like its calls
C10D = {}
exec(compile("def all_reduce(fn):\n    return fn()\n", "/site-packages/torch/distributed/distributed_c10d.py",
             "exec"), C10D)


def reduce_losses(fn):
    return C10D["all_reduce"](fn)


def test_a_stack_in_a_collective_names_the_call_and_the_function_that_made_it():
    inside = reduce_losses(lambda: sys._getframe(0))
    assert waiting_in(inside) == "torch.distributed.all_reduce in reduce_losses"
    assert waiting_in(sys._getframe(0)) is None


def test_the_sampler_charges_the_time_in_a_collective_to_it():
    sampler = WaitSampler(interval=0.005)
    time.sleep(0.1)  # own work
    reduce_losses(lambda: time.sleep(0.3))  # waiting
    fraction, waited = sampler.take()
    sampler.close()
    assert 0.6 < fraction < 0.9, fraction  # 0.3 s of 0.4 s
    assert list(waited) == ["torch.distributed.all_reduce in reduce_losses"]


def test_straggler_metrics_names():
    assert _over_median([0.1, 0.5, 0.1, 0.3], 1) == 0.5 / 0.1
    assert _over_median([0.0, 0.2], 1) == 0.2 / 0.01  # a median under one sample interval counts as one
    assert tag_for("step_time/max_over_median") == "perf/step_time/max_over_median"


class _Frame:
    """A stack frame stand-in whose locals must not be read (the sampler reads frames another thread runs)."""

    def __init__(self, filename: str, name: str, back=None):
        self.f_code = compile("pass", filename, "exec").replace(co_name=name, co_qualname=name)
        self.f_back = back

    @property
    def f_locals(self):
        raise AssertionError("a running frame's locals were read")


def test_the_sampler_names_operations_from_code_alone():
    assert waiting_in(_Frame("/repo/parallel/expert.py", "compute")) == "the expert all-to-all (combine, forward)"
    fsdp = "/site-packages/torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py"
    assert waiting_in(_Frame(fsdp, "post_backward", _Frame("/repo/x.py", "f"))) == "the FSDP reduce-scatter"
    assert waiting_in(_Frame("/repo/parallel/expert.py", "helper")) is None
