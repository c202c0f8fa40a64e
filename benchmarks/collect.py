"""Collect-stage benchmark: labelling throughput, ours vs the baseline, side by side, in one run.

On the real pretrained pair (`citer build-smol`: SmolLM2-135M-Instruct and its 10-layer cut) and
real GSM8K training problems (calculator annotations stripped), in the chat template:

  1. labelled tokens/s: one teacher-forced forward per model over prompt + reference (ours) vs
     one greedy `generate` step per model per reference position (the public CITER code);
  2. rollout tokens/s on the case-3 positions of those problems, under the SLM alone (iteration 0)
     and under routing at ~20% LLM tokens (a later iteration): rollouts started from their
     example's shared prefix states under the config's decode schedule (ours: `decode.schedule`,
     draft by default) vs a prefill per rollout with the LLM called at once (the decoder without
     either). Greedy tokens are the same either way (tests/test_decoding.py checks it).

Run: python benchmarks/collect.py [--json out.json]   (needs `citer build-smol` and GSM8K files)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.decoding import IMMEDIATE, RandomPolicy, SLMOnly, decode, settings
from pipeline.labelling import NEEDS_ROLLOUT, Rollout, rollout_positions, run_rollouts, teacher_forced
from pipeline.models import load_pair
from pipeline.tasks import load_examples

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "jobs" / "configs" / "smol-gsm8k.yaml"


def per_token_generate(pair, prompt: list[int], reference: list[int]) -> int:
    """The public code's way: one `generate` call per model per reference position."""
    for i in range(len(reference)):
        ids = torch.tensor([prompt + reference[:i]])
        for model in (pair.slm, pair.llm):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           pad_token_id=pair.tokenizer.pad_token_id)
    return len(reference)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=12, help="GSM8K training problems")
    ap.add_argument("--rollouts-per-example", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="per rollout")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    os.chdir(ROOT)
    cfg = load_config(CONFIG)
    if not Path(cfg.models.llm).is_dir():
        raise SystemExit(f"no real pair at {cfg.models.llm}: run `citer build-smol` first")
    pair = load_pair(cfg.models)
    examples = load_examples(cfg.task, "train", limit=args.examples)
    report: dict = {"threads": torch.get_num_threads(), "examples": len(examples), "pair": str(cfg.models.llm)}
    tf_kw = dict(chat_template=cfg.models.chat_template, system_prompt=cfg.task.system_prompt)

    with torch.no_grad():
        t0 = time.perf_counter()
        tf = teacher_forced(pair, examples, batch_size=args.batch, **tf_kw)
        t_ours = time.perf_counter() - t0
        n_ours = sum(len(t.reference_ids) for t in tf)
        t0 = time.perf_counter()
        n_theirs = per_token_generate(pair, tf[0].prompt_ids, tf[0].reference_ids[:40])
        t_theirs = time.perf_counter() - t0
    ours, theirs = n_ours / t_ours, n_theirs / t_theirs
    report["labelling"] = {"teacher_forced_tok_s": ours, "generate_per_position_tok_s": theirs, "ratio": ours / theirs,
                           "teacher_forced_tokens": n_ours, "generate_tokens": n_theirs}
    print(f"real pair {cfg.models.slm} / {cfg.models.llm}, {len(examples)} GSM8K problems, "
          f"{torch.get_num_threads()} threads\n")
    print("1. labelled tokens/s")
    print(f"   {'teacher-forced pass (ours)':<40}{ours:>9.1f} tok/s   ({n_ours} reference tokens)")
    print(f"   {'generate per position (public code)':<40}{theirs:>9.2f} tok/s   ({n_theirs} positions of one problem)")
    print(f"   ratio: {ours / theirs:.0f}x\n")

    rollouts = []
    for t, ex in zip(tf, examples, strict=True):
        for i in rollout_positions(t, args.rollouts_per_example):
            assert t.cases[i] == NEEDS_ROLLOUT
            rollouts.append(Rollout(t.prompt_ids, t.reference_ids, i, int(t.slm_tokens[i]), ex.answer))
    print(f"2. rollouts: {len(rollouts)} case-3 positions ({args.rollouts_per_example} at most per problem), "
          f"up to {args.max_new_tokens} new tokens each, {args.batch} rows a batch")
    report["rollouts"] = []
    for label, policy in (("SLM alone (iteration 0)", SLMOnly()), ("routing at ~20%", RandomPolicy(0.2, seed=0))):
        t0 = time.perf_counter()
        baseline = decode(pair.slm, pair.llm, [r.start for r in rollouts], policy, **pair.decode_kwargs,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch, schedule=IMMEDIATE)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_rollouts(pair, rollouts, task_format="gsm8k", policy=policy, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch, decoding=settings(cfg.decode))
        t_ours = time.perf_counter() - t0
        n = sum(len(g.tokens) for g in baseline.generations)
        prefill = sum(len(r.start) for r in rollouts)
        row = {"policy": label, "rollout_tokens": n, "baseline_s": t_base, "ours_s": t_ours,
               "baseline_tok_s": n / t_base, "ours_tok_s": n / t_ours, "ratio": t_base / t_ours,
               "baseline_slm_tokens_read": baseline.slm_tokens_processed, "prefill_tokens_per_rollout_start": prefill}
        report["rollouts"].append(row)
        print(f"   {label:<26} ours {n / t_ours:7.1f} tok/s   baseline {n / t_base:7.1f} tok/s   "
              f"ratio {t_base / t_ours:.2f}x   ({n} rollout tokens; the baseline prefills {prefill:,} tokens)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
