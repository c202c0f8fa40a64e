"""Decoding benchmark: router decoding under each schedule vs the fastest LLM-only decoding, side by side.

  1. Pass costs, measured: one step of each model over B rows x k new tokens after 64 cached
     ones, eager and (on a GPU) replayed from a CUDA graph. They give each batch size's ceiling,
     one for all schedules: LLM-only's step over one SLM step plus r LLM passes of 1/r tokens,
     c_L(B, 1) / (c_S(B, 1) + r * c_L(B, 1/r)), with the fastest measured costs.
  2. A pair of untrained Llamas at batch 1, 8 and 32: LLM-only vs router decoding at ~20% LLM
     tokens under each schedule (immediate; wait: routed rows wait; draft: routed rows go on and
     one LLM pass every K steps checks them). Decisions are seeded random draws at the target ratio,
     while the router still runs every step for its cost: an untrained router makes degenerate
     choices, and the untrained LLM disagrees with the SLM at nearly every routed position, so every
     routed token costs the draft schedule a rollback (the worst case for drafting). Speculative
     decoding (every token checked by the LLM, the SLM drafting K at a time) rides along.
  3. On a CPU, the demo pair with the router `make demo` trained (real disagreement rates).

Every row's tokens are checked equal across schedules and to LLM-only's for speculative decoding
(in float32; in bfloat16 near-ties may move, and agreement is measured instead).

Run: python benchmarks/decode.py [--json out.json]            (CPU: the 256x4 / 768x12 pair, ~6 min)
     python benchmarks/decode.py --device cuda --dtype bfloat16 --pairs smol wide --json out.json
       (SmolLM2-135M / SmolLM2-1.7B shapes, and Qwen2-0.5B / Llama-3-8B shapes, untrained)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.decoding import IMMEDIATE, LLMOnly, RandomPolicy, RouterPolicy, Schedule, Speculative, decode
from pipeline.decoding.runner import ModelRunner
from pipeline.models import count_parameters
from pipeline.router import Router, RouterSpec

ROOT = Path(__file__).resolve().parent.parent
# (hidden, layers, intermediate, heads, kv heads) of SLM and LLM, and the shared vocabulary
PAIRS = {
    "realistic": ((256, 4, 1024, 4, 4), (768, 12, 3072, 12, 12), 8192),
    "smol": ((576, 30, 1536, 9, 3), (2048, 24, 8192, 32, 32), 49152),  # SmolLM2-135M / SmolLM2-1.7B
    "wide": ((896, 24, 4864, 14, 2), (4096, 32, 14336, 32, 8), 128256),  # Qwen2-0.5B / Llama-3-8B
}
SCHEDULES = {"immediate": IMMEDIATE, "wait": Schedule(mode="wait", wait_fraction=0.5, max_wait=4),
             "draft K=2": Schedule(verify_every=2), "draft K=4": Schedule(verify_every=4),
             "draft K=8": Schedule(verify_every=8)}


def llama(shape: tuple, vocab: int, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    hidden, layers, inter, heads, kv = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    with torch.device(device):
        return LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int):
    """Median seconds of `repeats` calls after one untimed call (CUDA graphs are captured there)."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.no_grad()
def pass_cost(model, rows: int, tokens: int, graphs: bool, repeats: int = 7) -> float:
    """Seconds for one engine step of `rows` x `tokens` new tokens after 64 cached ones."""
    vocab = model.config.vocab_size
    runner = ModelRunner(model, n_slots=rows, capacity=96, n_ids=None, pad_id=0, graphs=graphs)
    runner.prefill(list(range(rows)), [random.Random(r).choices(range(2, vocab), k=64) for r in range(rows)],
                   [0] * rows)
    ids = [[5 + j for j in range(tokens)] for _ in range(rows)]
    positions = [list(range(64, 64 + tokens)) for _ in range(rows)]
    seconds, _ = timed(lambda: runner.step(ids, positions), repeats)
    return seconds


class Costs:
    """Measured pass costs, eager and graphed, computed on first use."""

    def __init__(self, models: dict[str, torch.nn.Module], graphs: bool):
        self.models, self.graphs, self.ms = models, graphs, {}

    def __call__(self, model: str, rows: int, tokens: int, graphed: bool | None = None) -> float:
        graphed = self.graphs if graphed is None else graphed
        key = f"{model} {rows}x{tokens} {'graphed' if graphed else 'eager'}"
        if key not in self.ms:
            self.ms[key] = 1e3 * pass_cost(self.models[model], rows, tokens, graphed)
        return self.ms[key] / 1e3


def run_batch(pair: str, slm, llm, prompts, policy, batch: int, args, costs: Costs, exact: bool) -> list[dict]:
    """LLM-only, speculative, and the router under every schedule, at one batch size."""
    kw = dict(eos_ids=[1], pad_id=0, max_new_tokens=args.new_tokens, batch_size=batch, graphs=costs.graphs)
    use = prompts[: max(batch, min(len(prompts), 2 * batch))] if batch > 1 else prompts[:4]
    runs = {"llm-only": lambda: decode(slm, llm, use, LLMOnly(), **kw),
            "speculative K=4": lambda: decode(slm, llm, use, Speculative(), schedule=SCHEDULES["draft K=4"], **kw)}
    runs |= {f"router, {name}": (lambda s=s: decode(slm, llm, use, policy, schedule=s, **kw))
             for name, s in SCHEDULES.items()}
    if costs.graphs:
        runs["llm-only, eager"] = lambda: decode(slm, llm, use, LLMOnly(), **{**kw, "graphs": False})
    done = {label: timed(fn, args.repeats) for label, fn in runs.items()}
    base_seconds, base = done["llm-only"]
    base_tokens = [g.tokens for g in base.generations]
    routed = [[g.tokens for g in d.generations] for label, (_, d) in done.items() if label.startswith("router")]
    agree = sum(x == y for r in routed for a, b in zip(r, routed[0], strict=True) for x, y in zip(a, b, strict=False))
    agree /= max(1, sum(len(a) for r in routed for a in r))
    if exact:
        assert all(r == routed[0] for r in routed), "schedules must give equal tokens"
        assert [g.tokens for g in done["speculative K=4"][1].generations] == base_tokens, "speculative != LLM"
    r = sum(g.llm_tokens for g in done["router, immediate"][1].generations)
    r /= max(1, sum(len(g.tokens) for g in done["router, immediate"][1].generations))
    chunk = max(1, round(1 / r)) if r > 0 else 1
    ceiling = costs("llm", batch, 1) / (costs("slm", batch, 1) + r * costs("llm", batch, chunk))
    rows = []
    for label, (seconds, d) in done.items():
        n = sum(len(g.tokens) for g in d.generations)
        speedup = (base_seconds / sum(map(len, base_tokens))) / (seconds / n)
        rows.append({"pair": pair, "batch": batch, "rows": len(use), "method": label, "seconds": seconds,
                     "tokens": n, "tokens_per_s": n / seconds, "llm_call_ratio": sum(g.llm_tokens for g in
                                                                                    d.generations) / max(1, n),
                     **d.counts(), "speedup_vs_llm_only": speedup,
                     "ceiling": ceiling if label.startswith("router") else None,
                     "share_of_ceiling": speedup / ceiling if label.startswith("router") else None,
                     "schedules_token_agreement": agree})
    return rows


def print_rows(rows: list[dict]) -> None:
    head = (f"{'pair':<10}{'batch':>6}  {'method':<22}{'LLM tok':>8}{'tok/s':>9}{'LLM passes':>11}{'LLM read':>10}"
            f"{'SLM passes':>11}{'rollbacks':>10}{'thrown':>8}{'speed-up':>10}{'ceiling':>9}{'of ceiling':>11}")
    print(head + "\n" + "-" * len(head))
    for x in rows:
        ceiling = "-" if x["ceiling"] is None else f"{x['ceiling']:.2f}x"
        share = "-" if x["share_of_ceiling"] is None else f"{x['share_of_ceiling']:.0%}"
        print(f"{x['pair']:<10}{x['batch']:>6}  {x['method']:<22}{x['llm_call_ratio']:>7.1%}{x['tokens_per_s']:>9.0f}"
              f"{x['llm_passes']:>11,}{x['llm_tokens_processed']:>10,}{x['slm_passes']:>11,}{x['rollbacks']:>10,}"
              f"{x['discarded_tokens']:>8,}{x['speedup_vs_llm_only']:>9.2f}x{ceiling:>9}{share:>11}")


def best_rows(rows: list[dict]) -> list[dict]:
    """Per pair and batch, the fastest router schedule."""
    keys = sorted({(x["pair"], x["batch"]) for x in rows}, key=lambda k: (k[0], k[1]))
    return [max((x for x in rows if (x["pair"], x["batch"]) == k and x["method"].startswith("router")),
                key=lambda x: x["speedup_vs_llm_only"]) for k in keys]


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


def run_demo(args, report: dict, graphs: bool) -> list[dict]:
    from pipeline.worlds.demo import make_problem

    demo = demo_pair(args.demo_run, args.device, args.dtype)
    if demo is None:
        print(f"\n(demo pair skipped: no trained router under {args.demo_run}; run `make demo` first)")
        return []
    pair, router, where = demo
    tok = pair.tokenizer
    prompts = [tok(make_problem(random.Random(10_000 + i), 3)["question"] + "\n", add_special_tokens=False)["input_ids"]
               for i in range(64)]
    policy = RouterPolicy(router, args.demo_threshold)
    costs = Costs({"slm": pair.slm, "llm": pair.llm}, graphs)
    rows = []
    for batch in args.demo_batches:
        kw = dict(eos_ids=pair.eos_ids, pad_id=tok.pad_token_id, n_ids=pair.n_ids, max_new_tokens=48,
                  batch_size=batch, graphs=graphs)
        use = prompts[: max(batch, min(len(prompts), 2 * batch))]
        runs = {"llm-only": lambda u=use, k=kw: decode(pair.slm, pair.llm, u, LLMOnly(), **k)}
        runs |= {f"router, {n}": (lambda u=use, k=kw, s=s: decode(pair.slm, pair.llm, u, policy, schedule=s, **k))
                 for n, s in SCHEDULES.items()}
        done = {label: timed(fn, args.repeats) for label, fn in runs.items()}
        base_seconds, base = done["llm-only"]
        n_base = sum(len(g.tokens) for g in base.generations)
        for label, (seconds, d) in done.items():
            n = sum(len(g.tokens) for g in d.generations)
            ratio = sum(g.llm_tokens for g in d.generations) / max(1, n)
            rows.append({"pair": "demo", "batch": batch, "rows": len(use), "method": label, "seconds": seconds,
                         "tokens": n, "tokens_per_s": n / seconds, "llm_call_ratio": ratio, **d.counts(),
                         "speedup_vs_llm_only": (base_seconds / n_base) / (seconds / n), "ceiling": None,
                         "share_of_ceiling": None})
    report["demo_pair"] = {"router": str(where), "threshold": args.demo_threshold,
                           "pass_ms": {k: v for k, v in costs.ms.items()}}
    print(f"\n3. the demo pair with {where} at threshold {args.demo_threshold} (48 new tokens a row)")
    print_rows(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=None, choices=sorted(PAIRS),
                    help="untrained pairs (default: realistic on a CPU, smol and wide on a GPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--target-ratio", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--demo-run", type=Path, default=ROOT / "runs" / "demo", help="a `make demo` run directory")
    ap.add_argument("--demo-threshold", type=float, default=0.9, help="router threshold on the demo pair")
    ap.add_argument("--demo-batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    graphs = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if graphs else f"{torch.get_num_threads()} CPU threads"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report: dict = {"device": where, "torch": torch.__version__, "commit": commit.strip(),
                    "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()},
                    "pass_ms": {}, "decode": []}
    for name in args.pairs or (["smol", "wide"] if graphs else ["realistic"]):
        slm_shape, llm_shape, vocab = PAIRS[name]
        slm, llm = llama(slm_shape, vocab, args.device, dtype), llama(llm_shape, vocab, args.device, dtype)
        router = Router(RouterSpec(input_size=slm_shape[0])).eval().to(args.device)
        print(f"\n=== pair '{name}': untrained Llamas, SLM {slm_shape[0]} x {slm_shape[1]} "
              f"({count_parameters(slm, True) / 1e6:.0f}M params), LLM {llm_shape[0]} x {llm_shape[1]} "
              f"({count_parameters(llm, True) / 1e6:.0f}M), vocab {vocab}; {args.dtype} on {where}")
        costs = Costs({"slm": slm, "llm": llm}, graphs)
        print("\n1. one step, 64 cached tokens (ms)" + (": eager / graphed" if graphs else ""))
        for label in ("slm", "llm"):
            cells = []
            for rows in args.batches:
                for k in (1, 5):
                    eager = costs(label, rows, k, graphed=False)
                    cells.append(f"{rows}x{k} {1e3 * eager:.1f}" + (f" / {1e3 * costs(label, rows, k):.2f}"
                                                                     if graphs else ""))
            print(f"   {label.upper()}: " + ", ".join(cells))
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(2, vocab, (args.prompt_tokens - (i % 3) * 8,), generator=gen).tolist()
                   for i in range(64)]
        policy = RandomPolicy(args.target_ratio, seed=0, router=router)
        print(f"\n2. router decoding at ~{args.target_ratio:.0%} LLM tokens vs LLM-only"
              f"{' (CUDA graphs)' if graphs else ''}, {args.new_tokens} new tokens a row, median of {args.repeats}")
        rows = []
        for batch in args.batches:
            rows += run_batch(name, slm, llm, prompts, policy, batch, args, costs, exact=args.dtype == "float32")
        print_rows(rows)
        if args.dtype != "float32":
            print("   tokens equal across schedules: "
                  + ", ".join(f"batch {x['batch']} {x['schedules_token_agreement']:.1%}" for x in best_rows(rows)))
        print("\n   best schedule per batch: " + "; ".join(
            f"batch {x['batch']}: {x['method'].split(', ')[1]} {x['speedup_vs_llm_only']:.2f}x "
            f"({x['share_of_ceiling']:.0%} of {x['ceiling']:.2f}x)" for x in best_rows(rows)))
        report["pass_ms"][name] = costs.ms
        report["decode"] += rows
        if args.json:  # after each pair, so that a run cut short keeps what it measured
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        del slm, llm
        if graphs:
            torch.cuda.empty_cache()
    if args.device == "cpu" or args.demo_run.is_dir():
        report["decode"] += run_demo(args, report, graphs)
    report["best"] = best_rows(report["decode"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
