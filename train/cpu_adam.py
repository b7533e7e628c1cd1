"""AdamW by DeepSpeed's vectorized CPU kernel (`DeepSpeedCPUAdam`) for `parallel.cpu_offload=true`.

FSDP2's CPU offload keeps each rank's parameter shards, their gradients and so the optimizer states in host
memory; this optimizer updates those local shards with DeepSpeed's C++ Adam in AdamW mode. Its state is
torch.optim.AdamW's, key for key (`step` a float32 tensor, `exp_avg` and `exp_avg_sq` shaped and sharded like
the parameter; the same param-group keys), so a checkpoint resumes with offload switched on or off. DeepSpeed
builds the kernel at first use (a C++ compiler and ninja; cached under TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions): `cpu_adam_problem` says why it cannot be used. Importing this module imports DeepSpeed.
"""

from __future__ import annotations

import torch

from parallel.deepspeed_ops import import_deepspeed
from parallel.tensor import local_tensor

_adam = import_deepspeed("deepspeed.ops.adam")


def cpu_adam_problem() -> str | None:
    """Why DeepSpeed's CPU Adam kernel cannot be loaded or built here (one line), or None when it can."""
    try:
        import_deepspeed("deepspeed.ops.op_builder").CPUAdamBuilder().load(verbose=False)
    except Exception as e:  # the builder raises whatever the compiler or loader raised
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _torch_adamw_group_keys(lr: float) -> dict:
    """The param-group keys torch.optim.AdamW adds besides lr, betas, eps and weight_decay, with its defaults."""
    group = torch.optim.AdamW([torch.zeros(1)], lr=lr).param_groups[0]
    return {k: v for k, v in group.items() if k not in ("params", "lr", "betas", "eps", "weight_decay")}


class OffloadAdamW(_adam.DeepSpeedCPUAdam):
    """DeepSpeedCPUAdam (AdamW mode, bias-corrected) with torch.optim.AdamW's state layout; every parameter on CPU."""

    def __init__(self, params, lr: float, betas: tuple, eps: float, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)
        torch_keys = _torch_adamw_group_keys(lr)
        for group in [self.defaults, *self.param_groups]:
            group.pop("bias_correction", None)  # always on here, as in torch's AdamW
            group.update(torch_keys)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.device.type != "cpu":
            raise ValueError(f"OffloadAdamW steps parameters in host memory, got one on {p.device}")
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        self.ds_opt_adam.adam_update(self.opt_id, int(state["step"]), group["lr"], beta1, beta2, group["eps"],
                                     group["weight_decay"], True, local_tensor(p), local_tensor(p.grad),
                                     local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"]))
