"""Router design ablation: which inputs and which shape the router needs.

Each world's training labels are collected once (iteration 0), with every router feature stored:
the SLM's hidden state, its top-k next-token probabilities and the embedding of its greedy token
(R2R's inputs). Every variant then trains on those same labels with the train stage (Ray Train +
DeepSpeed) and is measured:

- label metrics, on the validation tokens: ROC AUC of P(keep the SLM's token) against the label
  (with a 95% interval, bootstrap over validation examples), accuracy and BCE;
- router cost: parameters, weight bytes, activation bytes of one step, and the time of one
  `step_prob` call at batch 64 on one CPU thread (fastest and median of 200 calls);
- on the demo world only, decoding: the held-out curve's AUC and the LLM tokens needed for the
  LLM's accuracy minus 1 point (refined sweep), each with its paired bootstrap interval, and the
  difference from CITER's router (hidden state, Linear(d, 2d) ... ) paired over the same problems.
  The smol world's pair answers no GSM8K problem right, so only its label metrics mean anything;
  its case-3 tokens are labelled "prefer the LLM" (no rollouts: they would take hours on CPU).

Run: python benchmarks/router_ablation.py [--json out.json] [--out runs/router-ablation]
     [--variants citer linear ...] [--skip-smol]   (about 10 minutes on 2 cores with both worlds built)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.rundir import collect_dir, iteration_dir, router_dir

ROOT = Path(__file__).resolve().parents[1]
ALL = "[hidden,topk,token_embedding]"
VARIANTS = {  # name -> config overrides; "citer" is the reference every other variant is compared with
    "citer": ["router.features=[hidden]"],
    "hidden+topk": ["router.features=[hidden,topk]"],
    "hidden+topk+embedding (R2R's inputs)": [f"router.features={ALL}"],
    "topk only": ["router.features=[topk]"],
    "linear": ["router.features=[hidden]", "router.hidden_sizes=[]"],
    "half width": ["router.features=[hidden]", "router.hidden_mults=[0.5]"],
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "half width"]
SMOL_VARIANTS = ("citer", "hidden+topk+embedding (R2R's inputs)", "linear")  # label metrics: the extremes
WORLDS = {
    "demo": ("jobs/configs/demo.yaml", ["collect.audit_rate=0", "router.top_k=10",
                                        "eval.methods=[slm,llm,router]",
                                        "eval.thresholds=[0.9,0.95,0.98,0.99,0.999]",
                                        "eval.refine_steps=2"]),
    "smol": ("jobs/configs/smol-gsm8k.yaml", ["collect.case3_labels=llm", "router.top_k=100",
                                              "train.val_fraction=0.25"]),
}


def collect_labels(world: str, out: Path, overrides: list[str]) -> tuple[Config, Path]:
    """Iteration 0's labels of a world, with every feature stored (reused when already there)."""
    from pipeline.cli import load_job_config
    from pipeline.stages.collect import run_collect

    config, base = WORLDS[world]
    cfg = load_job_config(str(ROOT / config), [*base, *overrides, f"router.features={ALL}"])
    run = out / world / "labels"
    run_collect(cfg, run, 0)
    return cfg, run


def train_variant(world: str, labels: Path, out: Path, name: str, overrides: list[str]) -> tuple[Config, Path, dict]:
    """A run directory holding a copy of the labels; the variant's router trained on them."""
    from pipeline.cli import load_job_config
    from pipeline.stages.train import fit_router

    config, base = WORLDS[world]
    cfg = load_job_config(str(ROOT / config), [*base, *overrides, *VARIANTS[name]])
    run = out / world / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not collect_dir(run, 0).is_dir():
        shutil.copytree(collect_dir(labels, 0), collect_dir(run, 0))
    return cfg, run, fit_router(cfg, run, 0)


def label_metrics(cfg: Config, run: Path, train: dict) -> dict[str, Any]:
    """Validation tokens: ROC AUC with a bootstrap interval over validation examples; accuracy, BCE."""
    import torch

    from pipeline.router import load_router
    from pipeline.shards import feature_columns, is_validation, read_labels, to_arrays
    from pipeline.statistics import Resamples, interval, roc_auc

    features = cfg.router.features
    table = read_labels(run, 0, columns=[*feature_columns(features), "label"])
    val = to_arrays(table, cfg.seed, cfg.train.val_fraction, validation=True, features=features)
    ids = np.array(table.column("example_id").to_pylist())
    ids = ids[[is_validation(i, cfg.seed, cfg.train.val_fraction) for i in ids]]  # to_arrays keeps their order
    scores = load_router(router_dir(run, 0)).router.prob(torch.from_numpy(val["x"].astype(np.float32))).numpy()
    examples, index = np.unique(ids, return_inverse=True)
    boot = Resamples(len(examples), 1000, cfg.seed)
    per_token = boot.counts[:, index]  # an example drawn k times brings its tokens k times
    best = train["best"]
    return {"val_tokens": len(scores), "val_examples": len(examples), "val_auc": roc_auc(scores, val["y"]),
            "val_auc_interval": interval(roc_auc(scores, val["y"], per_token)),
            "val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"],
            "val_majority_rate": best["val_majority_rate"]}


def router_cost(run: Path, batch: int = 64, repeats: int = 200) -> dict[str, Any]:
    """Parameters, bytes and the time of one `step_prob` call at `batch` rows on one CPU thread
    (as in an evaluation actor): the fastest of `repeats` calls after a warm-up (on a shared
    machine the fastest is the call nothing else interrupted) and their median."""
    import torch

    from pipeline.router import load_router

    torch.set_num_threads(1)
    router = load_router(router_dir(run, 0)).router
    spec = router.spec
    torch.manual_seed(0)
    vocab = max(spec.top_k, 2) * 4
    hidden, logits = torch.randn(batch, spec.input_size), torch.randn(batch, vocab)
    embedding = torch.nn.Embedding(vocab, max(spec.embedding_size, 1))
    tokens = logits.argmax(-1)
    times = []
    for k in range(repeats + 20):
        t0 = time.perf_counter()
        router.step_prob(hidden, logits, tokens, embedding)
        if k >= 20:
            times.append(time.perf_counter() - t0)
    widths = [spec.feature_size, *spec.hidden_sizes, 1]
    return {"features": list(spec.features), "input_width": spec.feature_size, "hidden_sizes": spec.hidden_sizes,
            "parameters": sum(p.numel() for p in router.parameters()),
            "weight_bytes": sum(t.numel() * t.element_size() for t in router.state_dict().values()),
            "activation_bytes_per_step": batch * sum(widths) * 4,
            "step_us_at_batch_64": 1e6 * min(times), "step_us_at_batch_64_median": 1e6 * float(np.median(times))}


def decode_metrics(cfg: Config, run: Path, baselines: dict | None) -> dict[str, Any]:
    """The variant's refined sweep on the held-out problems (the first variant also decodes the
    single models, which the others reuse)."""
    from pipeline.stages.evaluate import run_eval

    result = run_eval(cfg, iteration_dir(run, 0), router_dir=router_dir(run, 0), baselines=baselines)
    iv = result["intervals"]
    return {"result": result, "auc": result["auc"]["router"], "auc_interval": iv["auc"]["router"],
            "llm_calls_to_target": result["llm_calls_to_target"]["router"],
            "llm_calls_to_target_interval": iv["llm_calls_to_target"]["router"],
            "target_accuracy": result["target_accuracy"]}


def run_world(world: str, out: Path, variants: list[str], overrides: list[str]) -> dict[str, Any]:
    """Every variant of one world: label metrics and cost, and on the demo world decoding."""
    from pipeline.stages.evidence import compare_runs

    t0 = time.perf_counter()
    cfg, labels = collect_labels(world, out, overrides)
    figures: dict[str, Any] = {"collect_seconds": time.perf_counter() - t0, "variants": {}}
    baselines = None
    for name in variants:
        t1 = time.perf_counter()
        vcfg, run, train = train_variant(world, labels, out, name, overrides)
        row = {**router_cost(run), **label_metrics(vcfg, run, train), "train_seconds": train["fit_seconds"]}
        if world == "demo":
            decoded = decode_metrics(vcfg, run, baselines)
            baselines = baselines or decoded["result"]
            row.update({k: v for k, v in decoded.items() if k != "result"}, eval_json=str(iteration_dir(run, 0)))
        row["seconds"] = time.perf_counter() - t1
        figures["variants"][name] = row
    if world == "demo" and "citer" in figures["variants"]:
        reference = json.loads((Path(figures["variants"]["citer"]["eval_json"]) / "eval.json").read_text())
        for name, row in figures["variants"].items():
            if name != "citer":
                other = json.loads((Path(row["eval_json"]) / "eval.json").read_text())
                row["vs_citer"] = compare_runs(other, reference, "router", cfg.eval.bootstrap_resamples, cfg.eval.seed)
    return figures


def print_world(world: str, figures: dict[str, Any]) -> None:
    from pipeline.stages.evidence import comparison_text, pct, span

    print(f"\n{world} world ({figures['collect_seconds']:.0f} s to label)")
    header = (f"{'variant':<38}{'params':>9}{'us/step':>9}{'val AUC [95%]':>22}{'val acc':>9}"
              + (f"{'curve AUC [95%]':>24}{'LLM tokens at target [95%]':>30}" if world == "demo" else ""))
    print(header + "\n" + "-" * len(header))
    for name, r in figures["variants"].items():
        line = (f"{name:<38}{r['parameters']:>9,}{r['step_us_at_batch_64']:>9.0f}"
                f"{r['val_auc']:>8.3f} {span(r['val_auc_interval'], 1.0, 3):>13}{pct(r['val_accuracy']):>9}")
        if world == "demo":
            line += (f"{r['auc']:>8.3f} {span(r['auc_interval'], 1.0, 3):>15}"
                     f"{pct(r['llm_calls_to_target']):>12} {span(r['llm_calls_to_target_interval']):>17}")
        print(line)
    for name, r in figures["variants"].items():
        if "vs_citer" in r:
            print(comparison_text(f"{name} vs citer", r["vs_citer"], name, "citer"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "router-ablation")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS), metavar="NAME",
                        help=f"of: {', '.join(VARIANTS)} (default: all but 'half width')")
    parser.add_argument("--demo-examples", type=int, default=1000, help="training problems labelled (demo)")
    parser.add_argument("--eval-examples", type=int, default=200, help="held-out problems decoded (demo)")
    parser.add_argument("--smol-examples", type=int, default=32, help="training problems labelled (smol)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--skip-smol", action="store_true")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    os.chdir(ROOT)  # the configs' paths are relative to the repository root
    t0 = time.perf_counter()
    # One training worker with both CPUs: on this scale Ray Train's per-worker start-up, not the
    # arithmetic, is what a fit costs.
    common = [f"train.epochs={args.epochs}", "train.patience=10", "train.num_workers=1", "train.cpus_per_worker=2"]
    figures = {"demo": run_world("demo", args.out, args.variants, [
        *common, f"collect.n_examples={args.demo_examples}", f"eval.n_examples={args.eval_examples}"])}
    if not args.skip_smol and not (ROOT / ".citer" / "smol-world" / "slm").is_dir():
        print("smol world not built (`citer build-smol`): its label metrics are skipped", file=sys.stderr)
    elif not args.skip_smol:
        figures["smol"] = run_world("smol", args.out, [v for v in args.variants if v in SMOL_VARIANTS],
                                    [*common, f"collect.n_examples={args.smol_examples}"])
    for world, f in figures.items():
        print_world(world, f)
    figures["seconds"] = time.perf_counter() - t0
    print(f"\n{figures['seconds']:.0f} s in all; runs in {args.out}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
