"""Serving benchmark: `citer serve`'s application under 1, 8 and 32 concurrent streaming clients on
loopback, against the decoder alone at the same batch.

For each number of clients C and each routing (the router at its threshold, then `"routing": "llm"`
on the same deployment) C clients send the same bounded list of chat requests (greedy, streamed)
as fast as the server answers. Per run: tokens/s, time to first token and latency (p50, p99),
errors, the LLM's share of tokens, and whether every output equals decoding its request alone
(`pipeline.decoding.decode`, batch 1). Then the decoder alone (`decode` on the same prompts, batch
C, as many torch threads as a replica has), run right after each, gives the tokens/s serving is
measured against.

Run (after `make demo`): python benchmarks/serve.py [--json out.json] [--requests 64] [--clients 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def drive(base: str, model: str, questions: list[str], clients: int, routing: dict, max_tokens: int,
                stream: bool = True) -> dict:
    """`clients` concurrent clients through `questions` (each asked once), streaming or not; what they
    saw, and what the replica's engine did meanwhile (its /health counts)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    todo = list(enumerate(questions))
    out: list[dict] = [{} for _ in questions]

    async def one(i: int, question: str) -> None:
        t0 = time.perf_counter()
        first, text, usage = None, [], None
        try:
            ask = dict(model=model, messages=[{"role": "user", "content": question}], temperature=0,
                       max_tokens=max_tokens, extra_body={"citer": routing})
            if stream:
                async for chunk in await client.chat.completions.create(
                        **ask, stream=True, stream_options={"include_usage": True}):
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        text.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        usage = chunk.usage
            else:
                reply = await client.chat.completions.create(**ask)
                text, usage = [reply.choices[0].message.content], reply.usage
            out[i] = {"text": "".join(text), "ttft": None if first is None else first - t0,
                      "latency": time.perf_counter() - t0, "tokens": usage.completion_tokens,
                      "llm_tokens": usage.citer["llm_tokens"]}
        except Exception as e:  # counted, not raised: a benchmark reports its errors
            out[i] = {"error": f"{type(e).__name__}: {e}"}

    async def worker() -> None:
        while todo:
            await one(*todo.pop(0))

    before = httpx.get(f"{base}/health").json()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - t0
    after = httpx.get(f"{base}/health").json()
    await client.close()
    steps, busy = after["steps"] - before["steps"], after["engine_seconds"] - before["engine_seconds"]
    done = [r for r in out if "error" not in r]
    tokens = sum(r["tokens"] for r in done)
    return {"seconds": seconds, "requests": len(questions), "errors": len(questions) - len(done),
            "error_samples": [r["error"] for r in out if "error" in r][:3], "tokens": tokens,
            "tokens_per_s": tokens / seconds, "llm_call_ratio": sum(r["llm_tokens"] for r in done) / max(1, tokens),
            **{f"{x}_p{q}": percentile([r[x] for r in done if r[x] is not None], q)
               for x in ("ttft", "latency") for q in (50, 99)},
            "engine_steps": steps, "engine_seconds": busy, "engine_busy": busy / seconds,
            "texts": [r.get("text") for r in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "demo.yaml"))
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="a run directory with a trained router")
    ap.add_argument("--iteration", type=int, help="the router's iteration (default: the last)")
    ap.add_argument("--threshold", type=float, help="router threshold (default: the config's serve.threshold)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="requests per run (each client level, each routing)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (torch threads) of the replica and of "
                                                                      "the decoder alone")
    ap.add_argument("--no-stream", action="store_true", help="whole responses instead of streams (no TTFT)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("overrides", nargs="*", help="config overrides, KEY=VALUE")
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve

    from pipeline.config import load_config
    from pipeline.decoding import LLMOnly, RouterPolicy, decode, settings
    from pipeline.models import encode_prompts, load_pair
    from pipeline.router import load_router
    from pipeline.serving.app import application
    from pipeline.serving.service import served_name, served_router
    from pipeline.tasks import DEFAULT_PROMPTS
    from pipeline.worlds.demo import make_problem

    os.chdir(ROOT)  # the config's paths are relative to the repository
    cfg = load_config(args.config, [*args.overrides, f"serve.max_batch={max(args.clients)}",
                                    f"serve.max_queue={args.requests}",
                                    f"serve.num_cpus_per_replica={args.replica_cpus}"])
    threshold = cfg.serve.threshold if args.threshold is None else args.threshold
    router_path = served_router(args.run, args.iteration)
    name = served_name(cfg)
    threads = max(1, int(args.replica_cpus))
    torch.set_num_threads(threads)

    rng = random.Random(20_000)
    questions = [make_problem(rng, cfg.demo.digits if cfg.demo else 3)["question"] for _ in range(args.requests)]
    pair = load_pair(cfg.models)
    router = load_router(router_path, expected_input_size=pair.hidden_size, device=pair.device).router
    # as the server builds them: the chat template around the message, or the task's prompt template
    template = cfg.task.prompt_template or DEFAULT_PROMPTS[cfg.task.format]
    texts = questions if cfg.models.chat_template else [template.format(question=q) for q in questions]
    prompts = encode_prompts(pair.tokenizer, texts, cfg.models.chat_template)
    policies = {"router": RouterPolicy(router, threshold), "llm": LLMOnly()}
    kw = dict(**pair.decode_kwargs, max_new_tokens=args.max_tokens, **settings(cfg.decode))

    def text_of(tokens: list[int]) -> str:
        return pair.tokenizer.decode([t for t in tokens if t not in pair.eos_ids], skip_special_tokens=True)

    def decoder_alone(policy, batch: int) -> dict:
        """The decoder on the same prompts at the same batch, in this process (the replica idles)."""
        t0 = time.perf_counter()
        done = decode(pair.slm, pair.llm, prompts, policy, batch_size=batch, **kw)
        seconds = time.perf_counter() - t0
        n = sum(len(g.tokens) for g in done.generations)
        return {"decoder_tokens": n, "decoder_seconds": seconds, "decoder_tokens_per_s": n / seconds}

    print(f"decoding each of {len(prompts)} requests alone (the outputs serving must give) ...", flush=True)
    solo = {r: [text_of(decode(pair.slm, pair.llm, [p], policy, batch_size=1, **kw).generations[0].tokens)
                for p in prompts] for r, policy in policies.items()}

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 2**20, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    rows = []
    try:
        serve.run(application(cfg, router_path, threshold), name="citer", route_prefix="/")
        asyncio.run(drive(base, name, questions[:4], 4, {}, args.max_tokens))  # warm up
        for clients in args.clients:
            for routing, extra in (("router", {"threshold": threshold}), ("llm", {"routing": "llm"})):
                got = asyncio.run(drive(base, name, questions, clients, extra, args.max_tokens, not args.no_stream))
                texts = got.pop("texts")
                got["equal_to_solo"] = sum(t == s for t, s in zip(texts, solo[routing], strict=True))
                got.update(decoder_alone(policies[routing], clients))  # right after: the same machine load
                got["serving_over_decoder"] = got["tokens_per_s"] / got["decoder_tokens_per_s"]
                rows.append({"clients": clients, "routing": routing, **got})
                print(f"  {clients:>3} clients, {routing:<6}: {got['tokens_per_s']:7.0f} tok/s (decoder alone "
                      f"{got['decoder_tokens_per_s']:.0f}), {got['errors']} errors, "
                      f"{got['equal_to_solo']}/{len(texts)} equal to solo", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    head = (f"{'clients':>7} {'routing':<7}{'req':>5}{'err':>5}{'equal':>7}{'LLM tok':>8}{'tok/s':>8}{'decoder':>9}"
            f"{'ratio':>7}{'engine busy':>12}{'TTFT p50':>10}{'p99':>7}{'latency p50':>13}{'p99':>7}{'router/llm':>11}")
    print(f"\n{name}: router {router_path} at threshold {threshold}; {args.max_tokens} tokens at most a request; "
          f"{threads} torch thread(s) for the replica and the decoder\n{head}\n{'-' * len(head)}")
    for row in rows:
        llm = next(r for r in rows if r["clients"] == row["clients"] and r["routing"] == "llm")
        speedup = f"{row['tokens_per_s'] / llm['tokens_per_s']:.2f}x" if row["routing"] == "router" else "-"
        ms = lambda s: "-" if s is None else f"{1e3 * s:.0f}ms"  # noqa: E731
        print(f"{row['clients']:>7} {row['routing']:<7}{row['requests']:>5}{row['errors']:>5}"
              f"{row['equal_to_solo']:>4}/{row['requests']:<2}{row['llm_call_ratio']:>8.1%}{row['tokens_per_s']:>8.0f}"
              f"{row['decoder_tokens_per_s']:>9.0f}{row['serving_over_decoder']:>7.2f}{row['engine_busy']:>12.0%}"
              f"{ms(row['ttft_p50']):>10}"
              f"{ms(row['ttft_p99']):>7}{ms(row['latency_p50']):>13}{ms(row['latency_p99']):>7}{speedup:>11}")
    print("ratio: serving tokens/s over the decoder alone's at the same batch (1.00 = no serving overhead); "
          "engine busy: the share of the run's wall time the replica's engine was computing")
    if args.json:
        report = {"config": args.config, "run": str(args.run), "router": str(router_path), "threshold": threshold,
                  "requests": args.requests, "max_tokens": args.max_tokens, "threads": threads,
                  "stream": not args.no_stream,
                  "cpus": os.cpu_count(), "python": sys.version.split()[0], "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
