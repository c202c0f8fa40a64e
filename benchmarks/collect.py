"""Collect-stage benchmark: figures side by side, ours vs the baseline, in one run.

  1. labelled tokens/s: one teacher-forced forward per model (ours) vs one greedy `generate` step
     per reference position (the public CITER code), on an untrained Llama pair of realistic
     shape with random token ids and references of GSM8K length;
  2. Ray Data with 2 labelling actors vs 1 on this machine: the demo world's task, labelled by an
     untrained pair of realistic shape saved in the Hugging Face format (the demo pair is so small
     that actor start-up would dominate);
  3. rollout share and rollout time on the demo world (and with the SLM standing in for the LLM,
     which turns every SLM error into a rollout).

Run: python benchmarks/collect.py   (builds the demo world first if it is absent)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import load_config
from pipeline.models import ModelPair
from pipeline.rewards import teacher_forced

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tok:
    """The few tokenizer fields the labelling code reads, for random-id timing runs."""

    pad_token_id, eos_token_id = 0, 1


def llama(hidden: int, layers: int, vocab: int = 8192) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                      eos_token_id=1, pad_token_id=0, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def per_token_generate(pair: ModelPair, prompt: list[int], reference: list[int]) -> int:
    """The public code's way: one `generate` call per model per reference position."""
    for i in range(len(reference)):
        ids = torch.tensor([prompt + reference[:i]])
        for model in (pair.slm, pair.llm):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           pad_token_id=0)
    return len(reference)


def forward_vs_generate(n_examples: int, generate_examples: int) -> None:
    from pipeline.tasks import Example

    torch.manual_seed(0)
    pair = ModelPair(slm=llama(256, 4), llm=llama(768, 12), tokenizer=_Tok())
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n_examples):
        p_len, r_len = int(torch.randint(40, 80, (1,), generator=g)), int(torch.randint(100, 151, (1,), generator=g))
        rows.append((torch.randint(2, 8192, (p_len,), generator=g).tolist(),
                     torch.randint(2, 8192, (r_len,), generator=g).tolist()))
    # teacher_forced takes Examples; feed token ids through a pass-through tokenizer.
    import pipeline.rewards as rewards

    encode = rewards.encode_reference
    rewards.encode_reference = lambda pair, ex, chat, limit: (rows[int(ex.id)][0], rows[int(ex.id)][1] + [1])
    examples = [Example(id=str(i), prompt="", reference="x", answer="") for i in range(n_examples)]
    with torch.no_grad():
        t0 = time.perf_counter()
        tf = teacher_forced(pair, examples, batch_size=8)
        t_ours = time.perf_counter() - t0
        n_ours = sum(len(t.reference_ids) for t in tf)
        t0 = time.perf_counter()
        n_theirs = sum(per_token_generate(pair, p, r) for p, r in rows[:generate_examples])
        t_theirs = time.perf_counter() - t0
    rewards.encode_reference = encode
    ours, theirs = n_ours / t_ours, n_theirs / t_theirs
    print("1. labelled tokens/s, untrained Llama pair (SLM 256 x 4 layers, LLM 768 x 12), references of 100-150 tokens")
    print(f"   {'teacher-forced pass (ours)':<36}{ours:>9.0f} tok/s   ({n_ours} tokens, {n_examples} examples)")
    print(f"   {'generate per position (public code)':<36}{theirs:>9.1f} tok/s   ({n_theirs} tokens, "
          f"{generate_examples} example{'s' if generate_examples > 1 else ''})")
    print(f"   ratio: {ours / theirs:.0f}x\n")


def actors_and_rollouts() -> None:
    import ray

    from pipeline.collect import run_collect
    from pipeline.demo import ensure_demo_world

    os.chdir(ROOT)
    demo = os.path.join(ROOT, "jobs", "configs", "demo.yaml")
    ensure_demo_world(load_config(demo).demo)
    import logging

    from pipeline.demo import build_tokenizer, save_tokenizer

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        tok = build_tokenizer()
        pair_dir = tempfile.mkdtemp(prefix="citer-bench-pair-")
        for name, (hidden, layers) in (("slm", (256, 4)), ("llm", (768, 12))):
            torch.manual_seed(0)
            llama(hidden, layers, vocab=len(tok)).save_pretrained(os.path.join(pair_dir, name))
            save_tokenizer(tok, Path(pair_dir, name))
        models = [f"models.slm={pair_dir}/slm", f"models.llm={pair_dir}/llm", "collect.max_rollouts_per_example=0"]
        n = 256
        print(f"2. Ray Data labelling actors on this machine (2 cores, 1 CPU per actor): {n} demo-task examples in "
              f"{n // 8} shards, untrained Llama pair (SLM 256 x 4 layers, LLM 768 x 12)")
        rates = {}
        for actors in (1, 2):
            cfg = load_config(demo, [f"collect.num_actors={actors}", "collect.shard_size=8", "collect.batch_size=8",
                                     f"collect.n_examples={n}", *models])
            with tempfile.TemporaryDirectory() as run:
                s = run_collect(cfg, run, 0)
            tokens = s["rows"] + s["case3_dropped_by_cap"]  # untrained models: most tokens are case 3, not rolled out
            rates[actors] = tokens / s["seconds"]
            print(f"   {actors} actor{'s' if actors > 1 else ' '}  {rates[actors]:>9.0f} reference tokens/s   "
                  f"({tokens} tokens in {s['seconds']:.1f} s, actor start-up and model loading included)")
        print(f"   ratio 2 actors / 1 actor: {rates[2] / rates[1]:.2f}x\n")

        print("3. rollouts (case 3: both models wrong at a reference token)")
        for label, extra in (("demo pair", []), ("SLM standing in for the LLM", ["models.llm=.citer/demo-world/slm"])):
            cfg = load_config(demo, ["collect.num_actors=2", "collect.shard_size=16", "collect.n_examples=256", *extra])
            with tempfile.TemporaryDirectory() as run:
                s = run_collect(cfg, run, 0)
            with tempfile.TemporaryDirectory() as run:
                s0 = run_collect(load_config(demo, ["collect.num_actors=2", "collect.shard_size=16",
                                                    "collect.n_examples=256", "collect.max_rollouts_per_example=0",
                                                    *extra]), run, 0)
            share = s["cases"]["3"] / s["rows"]
            print(f"   {label:<30} rollout share {share:6.2%} ({s['cases']['3']} of {s['rows']} tokens); "
                  f"stage {s['seconds']:.1f} s with rollouts vs {s0['seconds']:.1f} s without")
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=16, help="examples for the teacher-forced pass")
    ap.add_argument("--generate-examples", type=int, default=1, help="examples for the per-position baseline")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    forward_vs_generate(args.examples, args.generate_examples)
    actors_and_rollouts()


if __name__ == "__main__":
    main()
