"""Decoding benchmark: figures side by side, ours vs the baseline, in one run.

Measures, on an untrained Llama pair of realistic shape where the LLM costs >= 10x the SLM:
  1. our cached batched decoder vs the same policy with the LLM re-run over the whole prefix on
     every call (the public CITER code's batched path): tokens/s;
  2. router decoding at ~20% LLM tokens vs LLM-only decoding: wall-clock, next to the ideal
     speed-up 1 / (r + c_S / c_L) from the measured per-token costs, batched and one row at a time;
  3. the router's share of each step's time, and its memory;
  4. estimated FLOPs per generated token (2 x parameters per token each model processes).

Run: python benchmarks/decode.py [--batch 8] [--new-tokens 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.decoding import LLMOnly, RandomPolicy, SLMOnly, collaborative_decode, llm_call_ratio
from pipeline.models import count_parameters
from pipeline.router import Router, RouterSpec

VOCAB = 8192


def model(hidden: int, layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                      tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


class ScoredRandomPolicy(RandomPolicy):
    """Runs the router every step (so its cost is in every timing) but routes by seeded random
    draws at `ratio`: an untrained router on an untrained pair makes degenerate decisions (rows
    loop, and a whole row goes to one model), which would say nothing about a trained router."""

    def __init__(self, router: Router, ratio: float):
        super().__init__(ratio=ratio, seed=0)
        self.router = router

    def route(self, hidden, logits, rows, steps):
        self.router.prob(hidden)
        return super().route(hidden, logits, rows, steps)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--target-ratio", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    slm, llm = model(256, 4), model(768, 12)
    router = Router(RouterSpec(input_size=256)).eval()
    prompts = torch.randint(2, VOCAB, (args.batch, args.prompt_tokens)).tolist()
    prompts[1] = prompts[1][: args.prompt_tokens // 2]  # mixed lengths: a left-padded batch
    kw = dict(eos_ids=[1], pad_id=0, max_new_tokens=args.new_tokens)
    print(f"pair: untrained Llama, SLM hidden 256 x 4 layers ({count_parameters(slm) / 1e6:.1f}M params), "
          f"LLM hidden 768 x 12 layers ({count_parameters(llm) / 1e6:.1f}M params), vocab {VOCAB}")
    print(f"batch {args.batch}, prompts of {args.prompt_tokens // 2}-{args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens per row, median of {args.repeats} runs, {torch.get_num_threads()} threads\n")

    policy = ScoredRandomPolicy(router, args.target_ratio)

    t_slm, _ = timed(lambda: collaborative_decode(slm, None, prompts, SLMOnly(), **kw), args.repeats)
    t_llm, llm_gens = timed(lambda: collaborative_decode(None, llm, prompts, LLMOnly(), **kw), args.repeats)
    t_ours, ours = timed(lambda: collaborative_decode(slm, llm, prompts, policy, **kw), args.repeats)
    t_theirs, theirs = timed(lambda: collaborative_decode(slm, llm, prompts, policy, llm_cache=False, **kw),
                             args.repeats)
    assert [g.tokens for g in ours] == [g.tokens for g in theirs], "both LLM paths must decode the same tokens"
    n_tokens = sum(len(g.tokens) for g in ours)
    r = llm_call_ratio(ours)

    print("1. cached batched decoder vs LLM re-run over the whole prefix on every call")
    print(f"   {'ours (both KV caches)':<34}{n_tokens / t_ours:>9.0f} tok/s   {t_ours:6.2f} s")
    print(f"   {'re-run prefix (public CITER code)':<34}{n_tokens / t_theirs:>9.0f} tok/s   {t_theirs:6.2f} s")
    print(f"   ratio ours/baseline: {t_theirs / t_ours:.2f}x  (LLM tokens {r:.1%}; decisions: seeded random at "
          f"{args.target_ratio:.0%} per token, the router run every step for its cost)\n")

    c_s, c_l = t_slm / n_tokens, t_llm / sum(len(g.tokens) for g in llm_gens)
    ideal = 1.0 / (r + c_s / c_l)
    print(f"2. router decoding at {r:.1%} LLM tokens vs LLM-only decoding (wall-clock)")
    print(f"   {'LLM only':<34}{t_llm:>9.2f} s")
    print(f"   {'router decoding':<34}{t_ours:>9.2f} s")
    print(f"   speed-up: {t_llm / t_ours:.2f}x measured vs {ideal:.2f}x ideal = 1/(r + c_S/c_L) with "
          f"c_S = {1e3 * c_s:.2f} ms, c_L = {1e3 * c_l:.2f} ms per token (batched)")
    # One row at a time: the LLM runs only on the steps it is called for.
    rows = prompts[: max(1, args.batch // 2)]
    one = lambda p: [collaborative_decode(slm, llm, [row], p, row_ids=[i], **kw)  # noqa: E731
                     for i, row in enumerate(rows)]
    t_llm1, _ = timed(lambda: one(LLMOnly()), args.repeats)
    t_slm1, _ = timed(lambda: one(SLMOnly()), args.repeats)
    t_ours1, gens1 = timed(lambda: one(policy), args.repeats)
    r1 = llm_call_ratio([g for gs in gens1 for g in gs])
    ideal1 = 1.0 / (r1 + t_slm1 / t_llm1)
    print(f"   batch 1 ({len(rows)} rows one by one, {r1:.1%} LLM tokens): LLM only {t_llm1:.2f} s, router decoding "
          f"{t_ours1:.2f} s, speed-up {t_llm1 / t_ours1:.2f}x measured vs {ideal1:.2f}x ideal")
    print("   (in a batch, a step needs the LLM when any row does: with r per token that is 1-(1-r)^batch of "
          f"steps = {1 - (1 - r) ** args.batch:.0%} here)\n")

    h = torch.randn(args.batch, 256)
    t_router, _ = timed(lambda: [router.prob(h) for _ in range(200)], args.repeats)
    per_step_router = t_router / 200
    per_step = t_ours / args.new_tokens
    router_bytes = sum(p.numel() * p.element_size() for p in router.parameters()) + sum(
        b.numel() * b.element_size() for b in router.buffers())
    print("3. router overhead per decoding step (batch of rows)")
    print(f"   router {1e3 * per_step_router:.3f} ms of {1e3 * per_step:.2f} ms per step = "
          f"{per_step_router / per_step:.2%}; router weights {router_bytes / 2**20:.2f} MiB "
          f"({count_parameters(router) / 1e6:.2f}M params) vs SLM {count_parameters(slm) * 4 / 2**20:.0f} MiB, "
          f"LLM {count_parameters(llm) * 4 / 2**20:.0f} MiB\n")

    f_s, f_l, f_r = (2 * count_parameters(m) for m in (slm, llm, router))
    routed = f_s + f_r + r * f_l
    print("4. estimated FLOPs per generated token (2 x parameters per processed token)")
    print(f"   {'LLM only':<34}{f_l / 1e6:>9.1f} MFLOP")
    print(f"   {'router decoding':<34}{routed / 1e6:>9.1f} MFLOP   (SLM {f_s / 1e6:.1f} + router {f_r / 1e6:.2f} "
          f"+ {r:.1%} x LLM)")
    print(f"   ratio LLM-only/router: {f_l / routed:.2f}x at LLM call ratio {r:.1%}")


if __name__ == "__main__":
    main()
