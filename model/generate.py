"""Autoregressive decoding with the model's cache (absorbed MLA against its latent cache; K/V cache for mha/gqa/mqa)."""

from __future__ import annotations

import torch

from .transformer import Transformer


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None,
          top_p: float | None = None) -> torch.Tensor:
    """Next token [B] from last-position logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of the better tokens
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             eos_id: int | None = None, top_p: float | None = None, pad: torch.Tensor | None = None) -> torch.Tensor:
    """prompt [B, T0] -> [B, T0 + max_new_tokens] (rows that emit eos_id keep emitting it). pad [B]: the
    number of left-padding tokens of each prompt row (prompts of different lengths in one batch)."""
    was_training = model.training
    model.eval()
    b, t0 = prompt.shape
    cache = model.new_cache(b, t0 + max_new_tokens)
    logits = model.decode(prompt, cache, start=0, pad=pad)[:, -1]
    out = [prompt]
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        nxt = _pick(logits, temperature, top_k, generator, top_p)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done |= nxt == eos_id
        out.append(nxt[:, None])
        if i + 1 < max_new_tokens:
            logits = model.decode(nxt[:, None], cache, start=t0 + i, pad=pad)[:, -1]
    model.train(was_training)
    return torch.cat(out, dim=1)
