"""Activation checkpointing and per-block compile change memory and speed, never the numbers."""

import pytest
import torch
import torch.nn.functional as F

from model import Transformer
from model.config import load_preset
from parallel.recompute import apply_activation_checkpointing, apply_compile


def step(mode: str = "none", compile_backend: str | None = None):
    """Loss, gradients, routed loads and the bytes autograd kept for backward, for one tiny-model step."""
    torch.manual_seed(0)
    model = Transformer(load_preset("tiny"))
    model.init_weights(seed=0)
    apply_activation_checkpointing(model, mode)
    if compile_backend:
        apply_compile(model, backend=compile_backend)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    loads = torch.stack([m.tokens_per_expert for m in model.moe_layers().values()])
    return loss.item(), grads, loads, sum(saved)


def test_checkpointing_keeps_the_numbers_and_saves_memory():
    loss, grads, loads, kept = step("none")
    kept_by_mode = {}
    for mode in ("full", "selective"):
        l2, g2, loads2, kept_by_mode[mode] = step(mode)
        assert l2 == pytest.approx(loss, rel=1e-6)
        for name in grads:
            torch.testing.assert_close(g2[name], grads[name], rtol=1e-5, atol=1e-8, msg=lambda m: f"{mode} {name}: {m}")
        assert torch.equal(loads2, loads), f"{mode}: recomputation counted routed tokens twice"
    # full keeps only block inputs; selective drops the norms' and up-projections' outputs
    assert kept_by_mode["full"] < 0.2 * kept, (kept_by_mode, kept)
    assert kept_by_mode["full"] < kept_by_mode["selective"] < 0.95 * kept, (kept_by_mode, kept)


def test_compiled_blocks_give_the_same_step():
    loss, grads, loads, _ = step("none")
    l2, g2, loads2, _ = step("selective", compile_backend="aot_eager")
    assert l2 == pytest.approx(loss, rel=1e-5)
    for name in grads:
        torch.testing.assert_close(g2[name], grads[name], rtol=1e-4, atol=1e-7)
    assert torch.equal(loads2, loads)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="activation_checkpoint='some'"):
        apply_activation_checkpointing(Transformer(load_preset("tiny")), "some")
