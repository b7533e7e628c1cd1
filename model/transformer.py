"""The DeepSeek-V2/V3 decoder: embedding -> blocks (MLA + dense MLP or DeepSeekMoE) -> norm -> head.

Shape legend: B batch, T tokens, D hidden, V vocab.

`layers` is a ModuleDict keyed by the global layer index so pipeline stages can drop the layers they do
not own (and drop `embed_tokens`, `norm`, `lm_head`, `mtp` by setting them to None) while parameter
names stay stable for checkpoints. Integer inputs are token ids (embedded), float inputs hidden states, so
a last stage may keep a copy of the embedding for MTP. `stage_part` makes such a part; the last one, with MTP,
returns hidden states from `forward` (`output_hidden`: it computes the heads in its loss, see
`heads_from_labels`). `return_head_input` (a constructor argument) makes every method that would return logits
return the head's input instead (the final norm's output [B, T, D]), for a loss that applies `lm_head` itself
(a fused linear cross-entropy). Build on the meta device for big presets, then `to_empty` and `init_weights()`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .attention import KVCache, LatentKVCache, build_attention, new_layer_cache
from .config import ModelConfig
from .layers import MLP, RMSNorm
from .moe import MoE, GroupedExperts
from .rope import rope_cos_sin


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, cache: LatentKVCache | KVCache, start: int,
               pad: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, cache, start, pad)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """One DeepSeek-V3 multi-token-prediction depth: h' = W [norm(emb(t_{i+k})); norm(h_{i}^{k-1})] -> block.

    The embedding and output head are the main model's (shared). Concatenation order (embedding first)
    follows the released V3 MTP weights (enorm, hnorm, eh_proj).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos, sin) -> torch.Tensor:
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(h, cos, sin)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, return_head_input: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        n = cfg.num_hidden_layers
        self.mtp = nn.ModuleList([MTPModule(cfg, n + k) for k in range(cfg.num_nextn_predict_layers)]) \
            if cfg.num_nextn_predict_layers > 0 else None
        self.output_hidden = False  # forward stops before the norm: a last pipeline stage with MTP (`stage_part`)
        self.return_head_input = return_head_input  # the head's input instead of logits (`decode` keeps logits)
        # (index, count): this model sees part `index` of `count` equal parts of every sequence, so its positions
        # start at index * T (context parallelism sets it; parallel/context.py)
        self.sequence_shard: tuple[int, int] = (0, 1)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    def stage_part(self, layers: set[str], first: bool, last: bool) -> Transformer:
        """A copy of this model that keeps only the blocks `layers`, the embedding if `first` (or `last` with MTP,
        whose depths embed too: a tied copy), and the norm, head and MTP if `last`. Modules not kept are never
        copied (works on meta, CPU or GPU models); this model is left unchanged."""
        dropped: list[nn.Module | None] = [block for name, block in self.layers.items() if name not in layers]
        if not first and not (last and self.mtp):
            dropped.append(self.embed_tokens)
        if not last:
            dropped += [self.norm, self.lm_head, self.mtp]
        # deepcopy maps anything already in the memo to the memo's value: dropped modules become None uncopied
        part = copy.deepcopy(self, {id(module): None for module in dropped if module is not None})
        for name in [name for name, block in part.layers.items() if block is None]:
            del part.layers[name]
        part.output_hidden = bool(last and self.mtp)  # heads run in the loss (`heads_from_labels`)
        return part

    # ------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix (0.006 in the DeepSeek presets), ones for norms."""
        gen = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                _normal_(module.weight, std, gen)
            elif isinstance(module, GroupedExperts):
                _normal_(module.gate_up_proj, std, gen)
                _normal_(module.down_proj, std, gen)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, MoE):
                _normal_(module.gate.weight, std, gen)
                module.gate.expert_bias.zero_()
                module.reset_stats()
        if self.cfg.tie_word_embeddings and self.lm_head is not None and self.embed_tokens is not None:
            self.lm_head.weight = self.embed_tokens.weight

    # ------------------------------------------------------------------------------------ forward
    def _rope(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.cfg, torch.arange(start, start + length, device=device))

    def hidden_states(self, tokens_or_h: torch.Tensor) -> torch.Tensor:
        """Embedding (of integer ids) and this stage's blocks: [B, T] ids or [B, T, D] -> [B, T, D]."""
        ids = not torch.is_floating_point(tokens_or_h)
        h = self.embed_tokens(tokens_or_h) if ids else tokens_or_h
        cos, sin = self._rope(self.sequence_shard[0] * h.shape[1], h.shape[1], h.device)
        for block in self.layers.values():
            h = block(h, cos, sin)
        return h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (pipeline stages: hidden states in/out where parts are absent)."""
        h = self.hidden_states(tokens)
        if self.norm is None or self.output_hidden:
            return h
        return self._logits(self.norm(h))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head on normed hidden states x [B, T, D] -> [B, T, V], or x itself under `return_head_input`."""
        return x if self.return_head_input else self.lm_head(x)

    def forward_with_mtp(self, tokens: torch.Tensor, lookahead: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits [B, T, V] and, per MTP depth k=1..D, logits [B, T-k, V] whose position i predicts
        token i+k+1 (i.e. labels[:, k:] with labels = tokens shifted by one).

        `lookahead` [B, <= D]: the tokens after `tokens` when they are a part of longer sequences (context
        parallelism); depth k then covers every position of the part whose token i+k is in tokens + lookahead."""
        ahead = tokens if lookahead is None else torch.cat([tokens, lookahead], dim=1)
        return self._heads(self.hidden_states(tokens), self.embed_tokens(ahead))

    def heads_from_labels(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward_with_mtp`'s outputs from the last layer's hidden states h [B, T, D] and the labels
        (the input tokens shifted by one): what a last pipeline stage, which never sees the input, can do.
        MTP depth k reads the embeddings of input positions >= k, i.e. of labels[:, :-1] shifted right.
        Labels running past h's positions (up to D more: a part of longer sequences) give the lookahead."""
        emb = self.embed_tokens(labels[:, :-1])
        return self._heads(h, torch.cat([torch.zeros_like(emb[:, :1]), emb], dim=1))

    def _heads(self, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits and MTP logits from hidden states h [B, T, D] and the input-token embeddings emb
        [B, T + lookahead, D] of the same positions onwards."""
        logits = self._logits(self.norm(h))
        start = self.sequence_shard[0] * h.shape[1]  # the part's first position in the whole sequence
        mtp_logits = []
        for k, module in enumerate(self.mtp or [], start=1):
            t = min(h.shape[1], emb.shape[1] - k)  # depth k sees positions whose token i+k is at hand
            cos, sin = self._rope(start, t, h.device)
            h = module(h[:, :t], emb[:, k:k + t], cos, sin)
            mtp_logits.append(self._logits(module.norm(h)))
        return logits, mtp_logits

    # ------------------------------------------------------------------------------------ generation
    def new_cache(self, batch: int, max_len: int, latent: bool = True) -> list[LatentKVCache | KVCache]:
        """One generation cache per layer: MLA's latent cache (latent=False: its decompressed keys and values),
        the K/V cache of mha/gqa/mqa."""
        p = self.embed_tokens.weight
        return [new_layer_cache(self.cfg, batch, max_len, p.dtype, p.device, latent) for _ in self.layers]

    def decode(self, tokens: torch.Tensor, cache: list[LatentKVCache | KVCache], start: int,
               pad: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for new tokens at positions [start, start+T), reading/writing the cache.
        pad [B]: row b's first pad[b] positions are left padding, which no other position attends to (RoPE
        is relative, so a row's positions need no shift)."""
        h = self.embed_tokens(tokens)
        cos, sin = self._rope(start, tokens.shape[1], h.device)
        for block, layer_cache in zip(self.layers.values(), cache):
            h = block.decode(h, cos, sin, layer_cache, start, pad)
        return self.lm_head(self.norm(h))

    # ------------------------------------------------------------------------------------ MoE access
    def moe_layers(self) -> dict[int, MoE]:
        """This model's (or stage's) MoE modules by global layer index (MTP depths follow the last layer)."""
        blocks = {int(i): b for i, b in self.layers.items()}
        for k, module in enumerate(self.mtp or []):
            blocks[self.cfg.num_hidden_layers + k] = module.block
        return {i: b.mlp for i, b in blocks.items() if isinstance(b.mlp, MoE)}

    def set_aux_loss_scale(self, scale: float) -> None:
        for moe in self.moe_layers().values():
            moe.aux_loss_scale = scale


def lm_and_mtp_loss(loss_fn, logits: torch.Tensor, mtp_logits: list[torch.Tensor], labels: torch.Tensor,
                    mtp_weight: float, parts: int = 1) -> torch.Tensor:
    """loss_fn(logits, labels) plus, per MTP depth k of D, mtp_weight / D * loss_fn(depth k's logits,
    labels[:, k:]) (DeepSeek-V3 eq. 25: the MTP losses averaged over depths and weighted by lambda).

    `parts` > 1: the logits are one of `parts` equal parts of longer sequences (context parallelism) and the
    labels may run up to D positions past them; the loss is then this part's term of a mean over the parts, and
    depth k's mean over its parts * T - k positions gets this part's share of them (the last part has fewer)."""
    t = logits.shape[1]
    loss = loss_fn(logits, labels[:, :t])
    for k, lg in enumerate(mtp_logits, start=1):
        n = lg.shape[1]
        share = n * parts / (parts * t - k)  # 1 for whole sequences
        loss = loss + mtp_weight / len(mtp_logits) * share * loss_fn(lg, labels[:, k:k + n])
    return loss


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator | None) -> None:
    if gen is None or t.device.type == "cpu":
        t.normal_(0.0, std, generator=gen)
    else:  # draw on CPU for reproducibility across devices
        t.copy_(torch.empty(t.shape, dtype=t.dtype).normal_(0.0, std, generator=gen))
