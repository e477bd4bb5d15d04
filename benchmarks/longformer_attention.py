"""Longformer attention speed and memory, side by side in one process (run by hand, not a test).

    .venv/bin/python -m benchmarks.longformer_attention                       # full table
    .venv/bin/python -m benchmarks.longformer_attention --lengths 4096 --windows 128 --quick

Forward + backward of ONE attention layer (LongformerSelfAttention incl. its projections;
hidden 768, 12 heads, batch 1) and of a whole tiny LongformerModel (hidden 256, 4 layers,
4 heads), for overture's FastLongformerSelfAttention, transformers' LongformerSelfAttention
and dense SDPA (full T x T attention with the same projections, for reference; it does not
depend on the window, so it is measured once per length). Time: median of --repeats runs
after --warmup runs. Memory: peak tensor memory allocated during one forward + backward,
above what was allocated when it started (torch.profiler memory timeline, CPU allocations;
a separate, untimed run). Prints a Markdown table; ratios are transformers / overture.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LongformerConfig, LongformerModel
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from benchmarks.common import alternate, fmt, record, spread, table
from overture.pretrain.text.longformer_attention import FastLongformerSelfAttention, install


class DenseSelfAttention(LongformerSelfAttention):
    """Full attention over all tokens (local projections, padding keys masked): the reference."""

    def forward(self, hidden_states, attention_mask=None, is_index_masked=None, is_index_global_attn=None,
                is_global_attn=None, output_attentions=False):
        b, t, _ = hidden_states.shape
        h, hd = self.num_heads, self.head_dim

        def heads(x):
            return x.view(b, t, h, hd).transpose(1, 2)

        q, k, v = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
        mask = None
        if is_index_masked is not None and bool(is_index_masked.any()):
            mask = torch.zeros(b, 1, 1, t, dtype=q.dtype).masked_fill(
                is_index_masked[:, None, None, :], torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return (out.transpose(1, 2).reshape(b, t, h * hd),)


IMPLS = ("overture", "transformers", "sdpa")


def _config(scope, length, window, dropout=0.0):
    if scope == "layer":
        hidden, heads, layers, inter = 768, 12, 1, 3072
    else:
        hidden, heads, layers, inter = 256, 4, 4, 1024
    return LongformerConfig(
        hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=inter,
        attention_window=[window] * layers, vocab_size=1000, max_position_embeddings=length + 4,
        pad_token_id=1, attention_probs_dropout_prob=dropout, hidden_dropout_prob=0.0)


def _build(scope, impl, length, window, n_global, dropout=0.0):
    """Return a closure running one forward + backward (in training mode: ``dropout`` is
    the attention probabilities' dropout, as a pretraining recipe has it)."""
    torch.manual_seed(0)
    config = _config(scope, length, window, dropout)
    gen = torch.Generator().manual_seed(1)
    if scope == "layer":
        cls = {"overture": FastLongformerSelfAttention, "transformers": LongformerSelfAttention,
               "sdpa": DenseSelfAttention}[impl]
        module = cls(config, 0).train()
        x = torch.randn(1, length, config.hidden_size, generator=gen, requires_grad=True)
        mask = torch.zeros(1, length)
        mask[0, :n_global] = torch.finfo(torch.float32).max
        kw = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                  is_global_attn=n_global > 0)

        def step():
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x, **kw)[0].square().mean().backward()
        return step

    model = LongformerModel(config, add_pooling_layer=False).train()
    if impl == "overture":
        install(model)
    elif impl == "sdpa":
        for layer in model.encoder.layer:
            layer.attention.self.__class__ = DenseSelfAttention
    ids = torch.randint(3, config.vocab_size, (1, length), generator=gen)
    glob = torch.zeros(1, length, dtype=torch.long)
    glob[0, :n_global] = 1

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, global_attention_mask=glob).last_hidden_state.square().mean().backward()
    return step


def _time(step, warmup, repeats):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if times else 0.0


def _peak_mib(step):
    """Peak tensor memory (MiB) allocated during one step, above the level at its start."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    with contextlib.redirect_stdout(sys.stderr):
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(s) for s in sizes]
    return (max(totals) - totals[0]) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--windows", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--scopes", nargs="+", choices=["layer", "model"], default=["layer", "model"])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--globals", type=int, default=0, dest="n_global",
                   help="global-attention tokens at the start of the sequence (default 0)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="attention-probability dropout (default 0; Longformer pretrains at 0.1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    p.add_argument("--quick", action="store_true", help="--repeats 3 --warmup 1, layer scope only")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout: a probability in [0, 1), got {args.dropout}")
    if args.quick:
        args.repeats, args.warmup, args.scopes = 3, 1, ["layer"]
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average at start {load}; globals={args.n_global}; "
          f"attention dropout {args.dropout}; "
          f"median of {args.repeats} alternating rounds after {args.warmup} warm-up; memory = peak tensor memory above the "
          f"start of one forward+backward (torch.profiler memory timeline)\n", flush=True)
    header = ("| scope | T | w | overture ms | transformers ms | dense SDPA ms | speed-up vs tf "
              "| overture MiB | transformers MiB | dense SDPA MiB | memory vs tf |")
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    results = []
    for scope in args.scopes:
        for length in args.lengths:
            dense = None
            for window in args.windows:
                row = {}
                steps = {impl: _build(scope, impl, length, window, args.n_global, args.dropout)
                         for impl in args.impls if not (impl == "sdpa" and dense is not None)}
                for step in steps.values():
                    _time(step, args.warmup, 0)
                # alternating rounds: one step of each kernel per round, so a slow spell
                # of the machine hits all; the speed-up of every round is kept
                times = alternate({impl: lambda step=step: _time(step, 0, 1)
                                   for impl, step in steps.items()}, args.repeats)
                for impl, step in steps.items():
                    mib = math.nan if args.no_memory else _peak_mib(step)
                    row[impl] = (statistics.median(times[impl]) * 1e3, mib)
                    if impl == "sdpa":
                        dense = row[impl]
                if "sdpa" in args.impls and "sdpa" not in row:
                    row["sdpa"] = dense
                del steps
                if {"overture", "transformers"} <= set(times):
                    rounds = [t / o for t, o in zip(times["transformers"], times["overture"])]
                    results.append({"scope": scope, "length": length, "window": window,
                                    "overture_ms": spread([t * 1e3 for t in times["overture"]]),
                                    "transformers_ms": spread(
                                        [t * 1e3 for t in times["transformers"]]),
                                    "speedup": spread(rounds)})
                nan = (math.nan, math.nan)
                (o_ms, o_mb), (t_ms, t_mb), (d_ms, d_mb) = (row.get(i, nan) for i in IMPLS)
                print(f"| {scope} | {length} | {window} | {o_ms:.0f} | {t_ms:.0f} | {d_ms:.0f} | "
                      f"{t_ms / o_ms:.2f}x | {o_mb:.0f} | {t_mb:.0f} | {d_mb:.0f} | {o_mb / t_mb:.2f} |",
                      flush=True)
    print(f"\nload average at end {os.getloadavg() if hasattr(os, 'getloadavg') else None}")
    if results:
        print(table(["scope", "T", "w", "speed-up vs transformers, every round: median (min-max)"],
                    [[r["scope"], r["length"], r["window"], fmt(r["speedup"], 2)]
                     for r in results]))
        print(f"recorded in {record('longformer_attention', vars(args), results)}")
    return results


if __name__ == "__main__":
    main()
