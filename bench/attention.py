"""MLA against MHA, GQA and MQA in the same model: KV cache, generation throughput, quality.

  python bench/attention.py                 # all three tables
  python bench/attention.py --tables a b    # some of them; --help for sizes, steps and seeds

(a) KV-cache elements and bytes (BF16) per token, per layer and per model, for each variant at DeepSeek-V2's
    shapes (GQA with 8 and 16 K/V heads) and at table (b)'s shapes, from model.analysis (the cache tensors of a
    built model hold exactly these widths: tests/test_attention_variants.py), beside the seed's "57x".
(b) Generation on this CPU with one model (the `small` preset's widths, --layers layers): tokens/s of one
    decode step of a batch at contexts 1K / 4K / 16K, for MLA with its absorbed latent cache, MLA with a
    decompressed K/V cache, MHA and GQA (fp32; the cache is filled up to the context, the step's cost does not
    depend on its values). Then the largest batch each fits in a fixed cache budget at 4K and its tokens/s: the
    V2 paper's "maximum generation throughput" on this machine; ratios against MHA last.
(c) Quality: the `tiny` preset (--layers layers) trained on the same bytes of text (the Python standard
    library's sources; held-out files for validation) for the same steps and seeds, one run per variant and
    seed; the attention parameters per layer matched as closely as the shapes allow (GQA and MQA get more
    query heads of the same width so their q/o projections make up for their smaller k/v); validation loss
    mean and standard error over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import Transformer, load_preset  # noqa: E402
from model.analysis import attention_params, kv_cache_elements  # noqa: E402
from machine import describe  # noqa: E402  (bench/, beside this file)

MIB = 2 ** 20


# ------------------------------------------------------------------------------------------------- (a)
def kv_rows(cfg, kv8: int, kv16: int) -> list[tuple[str, object, str]]:
    """(name, config, cache kind) for every variant at cfg's shapes."""
    return [("MLA (latent, absorbed)", cfg, "mla"), ("MLA decompressed K/V", cfg, "mla_decompressed"),
            ("MHA", cfg.replace(attention="mha"), "mha"),
            (f"GQA {kv16} groups", cfg.replace(attention="gqa", num_key_value_heads=kv16), "gqa"),
            (f"GQA {kv8} groups", cfg.replace(attention="gqa", num_key_value_heads=kv8), "gqa"),
            ("MQA", cfg.replace(attention="mqa"), "mqa")]


def table_kv(name: str, cfg, kv8: int, kv16: int) -> None:
    mha = kv_cache_elements(cfg.replace(attention="mha"))
    print(f"\n(a) KV cache per token at {name}: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads of "
          f"{cfg.v_head_dim}, kv_lora_rank {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}; BF16 bytes")
    print(f"  {'variant':24s} {'elem/layer':>10s} {'bytes/layer':>11s} {'elem/model':>11s} {'KiB/model':>10s} "
          f"{'MHA / this':>10s}")
    for label, c, kind in kv_rows(cfg, kv8, kv16):
        e = kv_cache_elements(c, kind)
        n = e * cfg.num_hidden_layers
        print(f"  {label:24s} {e:10,d} {2 * e:11,d} {n:11,d} {2 * n / 1024:10.1f} {mha / e:9.2f}x")
    print(f"  the seed's claim: 57x smaller than MHA (32,768 / 576 = {32768 / 576:.1f})")


# ------------------------------------------------------------------------------------------------- (b)
def gen_models(layers: int) -> dict[str, tuple[Transformer, bool]]:
    """name -> (model, latent cache). MLA models share weights; MHA and GQA have the `small` head widths."""
    base = load_preset("small").replace(num_hidden_layers=layers)
    torch.manual_seed(0)
    mla = Transformer(base).eval()
    kv = max(1, base.num_attention_heads // 4)
    return {"MLA absorbed": (mla, True), "MLA decompressed": (mla, False),
            "MHA": (Transformer(base.replace(attention="mha")).eval(), True),
            f"GQA {kv} groups": (Transformer(base.replace(attention="gqa", num_key_value_heads=kv)).eval(), True)}


def cache_bytes_per_token(model: Transformer, latent: bool) -> int:
    """fp32 bytes one sequence's cache holds per token, all layers (from the cache tensors themselves)."""
    return sum(t.numel() * 4 for layer in model.new_cache(1, 1, latent) for t in vars(layer).values())


@torch.no_grad()
def decode_tokens_per_s(model: Transformer, latent: bool, batch: int, ctx: int, reps: int) -> float:
    """Tokens/s of one decode step for `batch` sequences at position ctx - 1 (median of reps steps)."""
    cache = model.new_cache(batch, ctx, latent)
    token = torch.zeros(batch, 1, dtype=torch.long)
    model.decode(token, cache, start=ctx - 1)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.decode(token, cache, start=ctx - 1)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def table_generation(args) -> None:
    models = gen_models(args.layers)
    cfg = next(iter(models.values()))[0].cfg
    per_token = {name: cache_bytes_per_token(m, latent) for name, (m, latent) in models.items()}
    print(f"\n(b) generation on this CPU: `small` widths (hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads), "
          f"{args.layers} layers, fp32, {torch.get_num_threads()} threads; tokens/s of one decode step "
          f"(median of {args.reps}); cache bytes per token (all layers): "
          + ", ".join(f"{n} {b:,}" for n, b in per_token.items()))
    print(f"  {'context':>7s} {'batch':>5s} " + "".join(f"{n:>18s}" for n in models))
    for ctx in args.contexts:
        for batch in args.batches:
            cells = []
            for name, (model, latent) in models.items():
                if per_token[name] * ctx * batch > args.cap_mib * MIB:
                    cells.append(f"{'(cache > cap)':>18s}")
                    continue
                cells.append(f"{decode_tokens_per_s(model, latent, batch, ctx, args.reps):18,.0f}")
            print(f"  {ctx:7d} {batch:5d} " + "".join(cells))
    max_throughput(models, per_token, args)


def max_throughput(models, per_token, args) -> None:
    ctx, budget = args.budget_ctx, args.budget_mib * MIB
    print(f"\n  largest batch in a {args.budget_mib} MiB cache at context {ctx} and its tokens/s "
          f"(the V2 paper's 'maximum generation throughput'):")
    rows = {}
    for name, (model, latent) in models.items():
        batch = min(budget // (per_token[name] * ctx), args.max_batch)
        rows[name] = (batch, decode_tokens_per_s(model, latent, batch, ctx, args.reps) if batch else 0.0)
        print(f"  {name:18s} batch {batch:5d}  {rows[name][1]:10,.0f} tokens/s")
    mha = rows["MHA"]
    print("  against MHA: " + ", ".join(f"{n} batch {b / mha[0]:.2f}x, tokens/s {t / mha[1]:.2f}x"
                                        for n, (b, t) in rows.items()))


# ------------------------------------------------------------------------------------------------- (c)
def corpus(seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens of standard-library sources cut into sequences of seq_len + 1: (train, validation files)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    train_files = ["argparse", "bisect", "csv", "shlex", "string", "textwrap", "dataclasses", "fractions", "heapq",
                   "inspect", "pprint", "statistics", "typing", "functools", "enum"]
    val_files = ["difflib", "calendar"]

    def cut(names):
        data = torch.tensor(list(b"".join((lib / f"{n}.py").read_bytes() for n in names)), dtype=torch.long)
        n = (len(data) - 1) // seq_len
        return torch.stack([data[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])

    return cut(train_files), cut(val_files)


def quality_configs(layers: int) -> dict[str, object]:
    """MLA (`tiny`), and MHA / GQA / MQA with heads of the same width whose attention weights match MHA's."""
    base = load_preset("tiny").replace(num_hidden_layers=layers)
    h = base.num_attention_heads
    return {"MLA": base, "MHA": base.replace(attention="mha"),
            "GQA": base.replace(attention="gqa", num_attention_heads=h + h // 2, num_key_value_heads=h // 2),
            "MQA": base.replace(attention="mqa", num_attention_heads=h + h // 2 + 1)}


def train_once(cfg, train: torch.Tensor, val: torch.Tensor, steps: int, batch: int, seed: int, lr: float) -> float:
    """AdamW (0.9, 0.95, wd 0.1), 10 warm-up steps then constant lr; the mean validation loss after `steps`."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    order = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        rows = train[torch.randint(0, len(train), (batch,), generator=order)]
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(v[:, :-1]).flatten(0, 1), v[:, 1:].flatten()).item() for v in val.split(batch)]
    return statistics.fmean(losses)


def table_quality(args) -> None:
    train, val = corpus(args.seq_len)
    val = val[:args.val_seqs]
    configs = quality_configs(args.layers)
    print(f"\n(c) quality: `tiny` widths, {args.layers} layers (MoE on), {args.steps} steps of {args.batch} x "
          f"{args.seq_len} bytes, lr {args.lr}, seeds {args.seeds}; validation: {len(val)} held-out sequences")
    print(f"  {'variant':8s} {'heads':>5s} {'K/V':>4s} {'attn params/layer':>17s} {'val loss mean':>13s} {'s.e.':>7s}  "
          f"per seed")
    results = {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        losses = [train_once(cfg, train, val, args.steps, args.batch, s, args.lr) for s in args.seeds]
        se = statistics.stdev(losses) / len(losses) ** 0.5 if len(losses) > 1 else float("nan")
        results[name] = (statistics.fmean(losses), se, losses)
        print(f"  {name:8s} {cfg.num_attention_heads:5d} {cfg.kv_heads:4d} {attention_params(cfg):17,d} "
              f"{results[name][0]:13.4f} {se:7.4f}  " + " ".join(f"{x:.4f}" for x in losses)
              + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("  against MHA, paired by seed (val loss difference, mean +- s.e.; negative: better): "
          + ", ".join(f"{n} {paired(v[2], results['MHA'][2])}" for n, v in results.items() if n != "MHA"))


def paired(a: list[float], b: list[float]) -> str:
    """Mean and standard error of the per-seed differences a - b (the same seed: the same batches)."""
    d = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return f"{statistics.fmean(d):+.4f} +- {se:.4f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    p.add_argument("--gen-layers", type=int, default=2, dest="gen_layers")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cap-mib", type=int, default=1024, dest="cap_mib", help="skip grid cells whose cache exceeds it")
    p.add_argument("--budget-mib", type=int, default=256, dest="budget_mib")
    p.add_argument("--budget-ctx", type=int, default=4096, dest="budget_ctx")
    p.add_argument("--max-batch", type=int, default=256, dest="max_batch")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the quality runs")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64, dest="seq_len")
    p.add_argument("--val-seqs", type=int, default=64, dest="val_seqs")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    print(describe())
    if "a" in args.tables:
        table_kv("DeepSeek-V2's shapes", load_preset("deepseek_v2"), 8, 16)
        table_kv("table (b)'s shapes (`small`)", load_preset("small"), 2, 4)
    if "b" in args.tables:
        table_generation(argparse.Namespace(**{**vars(args), "layers": args.gen_layers}))
    if "c" in args.tables:
        table_quality(args)


if __name__ == "__main__":
    main()
