"""Decoding benchmark: router decoding vs LLM-only decoding (and speculative decoding), side by side.

  1. Per-pass costs, measured: one forward of each model over B rows x k new tokens with a
     64-token cache. They give each batch size's ceiling: LLM-only time over the time of T SLM
     passes plus r*T LLM passes over 1/r catch-up tokens each (router decoding with free waiting).
  2. An untrained Llama pair of realistic shape (SLM 256 x 4, LLM 768 x 12), at batch 1, 8 and 32:
     LLM-only vs router decoding at ~20% LLM tokens, with the LLM called at once for any row
     ("immediate") and batched across steps ("batched": once half the active rows wait, or a
     row waited `--max-wait` steps). Decisions are seeded random draws at the target ratio (the router
     still runs every step, for its cost): an untrained router on an untrained pair makes
     degenerate choices. Tokens/s, LLM passes, tokens the LLM read, speed-up and its ceiling.
  3. The demo pair with its trained router (from `make demo`'s run), and speculative decoding
     (transformers' assisted generation, the SLM as draft, batch 1, exact LLM output) on the same
     prompts, on both pairs.

Every row's tokens are checked equal across schedules (greedy output does not depend on them).

Run: python benchmarks/decode.py [--json out.json] [--repeats 1]
On a GPU: python benchmarks/decode.py --device cuda --dtype bfloat16 --shapes 576,30,2048,24 (the
shapes of SmolLM2-135M and SmolLM2-1.7B); the demo pair then runs on the GPU too.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.decoding import (
    IMMEDIATE,
    LLMOnly,
    RandomPolicy,
    RouterPolicy,
    Schedule,
    decode,
    llm_call_ratio,
    speculative_decode,
)
from pipeline.models import count_parameters

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 8192


def llama(hidden: int, layers: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                      tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def sync() -> None:
    """Wait for queued GPU work, so that a clock read after it counts it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ScoredRandomPolicy(RandomPolicy):
    """Routes by seeded random draws at `ratio`, but runs the router every step for its cost."""

    def __init__(self, router, ratio: float):
        super().__init__(ratio=ratio, seed=0)
        self.router = router

    def route(self, hidden, logits, rows, steps):
        self.router.prob(hidden)
        return super().route(hidden, logits, rows, steps)


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.no_grad()
def pass_cost(model, rows: int, tokens: int, cached: int = 64, repeats: int = 5) -> float:
    """Seconds for one forward of `rows` x `tokens` new tokens after `cached` cached ones."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (rows, cached), device=model.device)
    new = torch.randint(2, vocab, (rows, tokens), device=model.device)
    costs = []
    for _ in range(repeats):
        cache = DynamicCache()
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        sync()
        t0 = time.perf_counter()
        model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=1)
        sync()
        costs.append(time.perf_counter() - t0)
    return statistics.median(costs)


def batch_1(out: list[dict], name: str, slm, llm, prompts, policy, kw: dict, exact: bool = True) -> None:
    """LLM-only, router decoding (LLM called at once) and speculative decoding, one prompt at a time."""
    for label, fn in (("llm-only", lambda: decode(slm, llm, prompts, LLMOnly(), batch_size=1, **kw)),
                      ("router", lambda: decode(slm, llm, prompts, policy, batch_size=1, schedule=IMMEDIATE, **kw)),
                      ("speculative", lambda: speculative_decode(slm, llm, prompts, **kw))):
        seconds, done = timed(fn, 1)
        out.append({"pair": name, "method": label, "seconds": seconds, "llm_passes": done.llm_passes,
                    "llm_call_ratio": llm_call_ratio(done.generations),
                    "tokens": sum(len(g.tokens) for g in done.generations),
                    "tokens_list": [g.tokens for g in done.generations]})
    if exact:  # in bf16, verifying several tokens in one pass can move a near-tie
        assert out[-1]["tokens_list"] == out[-3]["tokens_list"], "speculative decoding must give the LLM's tokens"


def run_pair(name: str, slm, llm, prompts, policy, *, batches, max_new_tokens, eos_ids, pad_id, n_ids, repeats,
             max_wait: int, costs: dict, exact: bool = True) -> list[dict]:
    rows = []
    for batch in batches:
        kw = dict(eos_ids=eos_ids, pad_id=pad_id, max_new_tokens=max_new_tokens, n_ids=n_ids, batch_size=batch)
        use = prompts[: max(batch, min(len(prompts), 2 * batch))]  # at least two batches' worth where there are
        t_llm, llm_only = timed(lambda u=use, k=kw: decode(slm, llm, u, LLMOnly(), **k), repeats)
        tokens = [g.tokens for g in llm_only.generations]
        n_llm = sum(map(len, tokens))
        results = {"llm-only": (t_llm, llm_only)}
        batched = Schedule(wait_fraction=0.5, max_wait=max_wait)
        for label, schedule in (("immediate", IMMEDIATE), ("batched", batched)):
            results[label] = timed(lambda u=use, k=kw, s=schedule: decode(slm, llm, u, policy, schedule=s, **k),
                                   repeats)
        routed = [g.tokens for g in results["immediate"][1].generations]
        other = [g.tokens for g in results["batched"][1].generations]
        pairs = zip(routed, other, strict=True)
        agree = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=False)) / max(1, sum(map(len, routed)))
        if exact:  # in bf16 a batch's composition can move a near-tie, so there it is measured, not asserted
            assert routed == other, "schedules must give equal tokens"
        r = llm_call_ratio(results["batched"][1].generations)
        steps = statistics.mean(len(t) for t in routed)
        c_s, c_l1 = costs[name]["slm"](batch, 1), costs[name]["llm"](batch, 1)
        chunk = max(1, round(1 / r)) if r > 0 else 1
        c_lk = costs[name]["llm"](batch, chunk)
        ceiling = (steps * c_l1) / (steps * c_s + r * steps * c_lk)
        for label, (seconds, done) in results.items():
            n = sum(len(g.tokens) for g in done.generations)
            rows.append({"pair": name, "batch": batch, "rows": len(use), "method": label,
                         "llm_call_ratio": llm_call_ratio(done.generations), "seconds": seconds,
                         "tokens_per_s": n / seconds, **done.counts(),
                         "speedup_vs_llm_only": (t_llm / n_llm) / (seconds / n) if label != "llm-only" else 1.0,
                         "ceiling": ceiling if label != "llm-only" else None, "schedules_token_agreement": agree})
    return rows


def print_rows(rows: list[dict]) -> None:
    head = (f"{'pair':<10}{'batch':>6}{'method':>11}{'LLM tok':>9}{'tok/s':>8}{'LLM passes':>11}{'LLM read':>10}"
            f"{'SLM passes':>11}{'speed-up':>10}{'ceiling':>9}{'of ceiling':>11}")
    print(head + "\n" + "-" * len(head))
    for x in rows:
        ceiling = "-" if x["ceiling"] is None else f"{x['ceiling']:.2f}x"
        share = "-" if x["ceiling"] is None else f"{x['speedup_vs_llm_only'] / x['ceiling']:.0%}"
        print(f"{x['pair']:<10}{x['batch']:>6}{x['method']:>11}{x['llm_call_ratio']:>8.1%}{x['tokens_per_s']:>8.0f}"
              f"{x['llm_passes']:>11,}{x['llm_tokens_processed']:>10,}{x['slm_passes']:>11,}"
              f"{x['speedup_vs_llm_only']:>9.2f}x{ceiling:>9}{share:>11}")


def demo_pair(run: Path, device: str, dtype: str):
    """The demo world's pair and the newest trained router of `run`, or None when absent."""
    from pipeline.config import ModelsConfig
    from pipeline.models import load_pair
    from pipeline.router import load_router

    routers = sorted(run.glob("iter-*/router"))
    world = ROOT / ".citer" / "demo-world"
    if not routers or not (world / "llm").is_dir():
        return None
    pair = load_pair(ModelsConfig(slm=str(world / "slm"), llm=str(world / "llm"), device=device, dtype=dtype))
    return pair, load_router(routers[-1], expected_input_size=pair.hidden_size, device=pair.device).router, routers[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--target-ratio", type=float, default=0.2)
    ap.add_argument("--max-wait", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--demo-run", type=Path, default=ROOT / "runs" / "demo", help="a `make demo` run directory")
    ap.add_argument("--demo-threshold", type=float, default=0.9, help="router threshold on the demo pair")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--shapes", default="256,4,768,12", help="SLM width,layers,LLM width,layers of the realistic pair")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    report: dict = {"device": where, "args": {k: str(v) for k, v in vars(args).items()}}

    sw, sl, lw, ll = map(int, args.shapes.split(","))
    dtype = getattr(torch, args.dtype)
    slm, llm = llama(sw, sl, args.device, dtype), llama(lw, ll, args.device, dtype)
    from pipeline.router import Router, RouterSpec

    router = Router(RouterSpec(input_size=sw)).eval().to(args.device)
    print(f"realistic pair: untrained Llama, SLM {sw} x {sl} ({count_parameters(slm) / 1e6:.1f}M params), "
          f"LLM {lw} x {ll} ({count_parameters(llm) / 1e6:.1f}M params), vocab {VOCAB}; {args.dtype} on {where}")

    print("\n1. one forward pass, 64 cached tokens (ms)")
    measured: dict = {}
    for label, model in (("slm", slm), ("llm", llm)):
        for rows in args.batches:
            for k in (1, 5):
                measured[f"{label} {rows}x{k}"] = pass_cost(model, rows, k)
        print("   " + label.upper() + ": " + ", ".join(f"{key.split()[1]} {1e3 * v:.0f}"
                                                       for key, v in measured.items() if key.startswith(label)))

    def cost_fn(model, label):
        def cost(rows, k):
            key = f"{label} {rows}x{k}"
            if key not in measured:
                measured[key] = pass_cost(model, rows, k)
            return measured[key]
        return cost

    costs = {"realistic": {"slm": cost_fn(slm, "slm"), "llm": cost_fn(llm, "llm")}}
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, VOCAB, (args.prompt_tokens - (i % 3) * 8,), generator=gen).tolist() for i in range(64)]

    print(f"\n2. router decoding at ~{args.target_ratio:.0%} LLM tokens vs LLM-only, {args.new_tokens} new tokens "
          f"a row, median of {args.repeats}")
    rows = run_pair("realistic", slm, llm, prompts, ScoredRandomPolicy(router, args.target_ratio),
                    batches=args.batches, max_new_tokens=args.new_tokens, eos_ids=[1], pad_id=0, n_ids=None,
                    repeats=args.repeats, max_wait=args.max_wait, costs=costs, exact=args.dtype == "float32")
    print_rows(rows)
    if args.dtype != "float32":
        print("   tokens equal across the two schedules: "
              + ", ".join(f"batch {x['batch']} {x['schedules_token_agreement']:.1%}" for x in rows[::3]))

    print("\n3. speculative decoding (assisted generation, the SLM drafts; batch 1) vs LLM-only vs router, batch 1")
    spec_rows: list[dict] = []
    batch_1(spec_rows, "realistic", slm, llm, prompts[:4], ScoredRandomPolicy(router, args.target_ratio),
            dict(eos_ids=[1], pad_id=0, max_new_tokens=args.new_tokens), exact=args.dtype == "float32")

    demo = demo_pair(args.demo_run, args.device, args.dtype)
    if demo is None:
        print(f"\n(demo pair skipped: no trained router under {args.demo_run}; run `make demo` first)")
    else:
        pair, trained, where = demo
        from pipeline.worlds.demo import make_problem

        tok = pair.tokenizer
        demo_prompts = [tok(make_problem(random.Random(10_000 + i), 3)["question"] + "\n",
                            add_special_tokens=False)["input_ids"] for i in range(64)]
        policy = RouterPolicy(trained, args.demo_threshold)
        print(f"\n   demo pair, router {where} at threshold {args.demo_threshold}")
        costs["demo"] = {"slm": cost_fn(pair.slm, "demo-slm"), "llm": cost_fn(pair.llm, "demo-llm")}
        demo_rows = run_pair("demo", pair.slm, pair.llm, demo_prompts, policy, batches=[8], max_new_tokens=48,
                             eos_ids=pair.eos_ids, pad_id=tok.pad_token_id, n_ids=pair.n_ids, repeats=args.repeats,
                             max_wait=args.max_wait, costs=costs, exact=args.dtype == "float32")
        print_rows(demo_rows)
        rows += demo_rows
        batch_1(spec_rows, "demo", pair.slm, pair.llm, demo_prompts[:16], policy,
                dict(eos_ids=pair.eos_ids, pad_id=tok.pad_token_id, max_new_tokens=48), exact=args.dtype == "float32")

    print(f"\n{'pair':<10}{'method':>12}{'seconds':>9}{'tok/s':>8}{'LLM passes':>11}{'speed-up':>10}")
    for x in spec_rows:
        base = next(y for y in spec_rows if y["pair"] == x["pair"] and y["method"] == "llm-only")
        print(f"{x['pair']:<10}{x['method']:>12}{x['seconds']:>9.2f}{x['tokens'] / x['seconds']:>8.0f}"
              f"{x['llm_passes']:>11,}{base['seconds'] / x['seconds'] * x['tokens'] / base['tokens']:>9.2f}x")
    print("(router LLM passes count only the LLM's forward calls; speculative: the LLM's verification passes)")
    report["pass_ms"] = {k: 1e3 * v for k, v in measured.items()}
    report["decode"] = rows
    report["batch_1_methods"] = [{k: v for k, v in x.items() if k != "tokens_list"} for x in spec_rows]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
