"""Typed configuration: one frozen dataclass per stage, loaded from YAML with dotted overrides.

Every field is checked on load: an unknown key, a value of the wrong type, a value outside its
allowed set or range, or a missing required value raises `CiterError` naming the key and where
it came from (the YAML file or the command line).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import CiterError


def _f(default: Any = dataclasses.MISSING, *, choices: tuple | None = None,
       range: tuple | None = None, factory: Any = None, unit_items: bool = False,
       item_choices: tuple | None = None, key_choices: tuple | None = None, item_range: tuple | None = None,
       distinct: bool = False) -> Any:
    """A dataclass field with validation metadata: allowed choices, inclusive numeric range,
    a list whose items must all lie in [0, 1] (`unit_items`), in `item_range`, or be among
    `item_choices`; `distinct`: a non-empty list without repeated items."""
    meta = {"choices": choices, "range": range, "unit_items": unit_items, "item_choices": item_choices,
            "key_choices": key_choices, "item_range": item_range, "distinct": distinct}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class ModelsConfig:
    """The SLM/LLM pair. Names are hub ids or local directories in the Hugging Face format."""

    slm: str  # the small model: a hub id or a local directory
    llm: str  # the large model: a hub id or a local directory
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))  # both models' weights and activations
    device: str = _f("cpu", choices=("cpu", "cuda", "auto"))  # auto: cuda when a GPU is visible
    trust_remote_code: bool = False  # only ever on when the user asks for it
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template
    # Extra tokens that end a generation, besides the tokenizer's eos and the generation config's
    # eos_token_id list (e.g. ["<|eot_id|>"] for a model whose generation config lacks it).
    eos_tokens: list[str] = _f(factory=list)
    # Spread the LLM over several devices (accelerate's big-model loading): "auto", "balanced",
    # "balanced_low_0", "sequential", or an explicit {module name: device} map, where a device is a
    # GPU index, "cpu" or "disk". The SLM stays whole on `device` (the first GPU). Unset: the LLM
    # sits whole on `device`.
    llm_device_map: str | dict[str, str | int] | None = None
    llm_max_memory: dict[str, str | int] | None = None  # per device, e.g. {0: "30GiB", 1: "70GiB"}
    llm_offload_folder: str | None = None  # where "disk" modules' weights are kept


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """Where the examples come from and how they are scored.

    `train_path`/`eval_path` are local .json/.jsonl/.parquet files, or a `datasets` name (hub id
    or local dataset folder) read with `subset` and the split names.
    """

    format: str = _f("gsm8k", choices=("gsm8k", "math", "mcq"))  # how answers are extracted and compared
    train_path: str  # the examples tokens are labelled on
    eval_path: str  # the held-out examples evaluation decodes
    subset: str | None = None  # a `datasets` configuration name
    train_split: str = "train"
    eval_split: str = "test"
    fields: dict[str, str] = _f(factory=dict)  # canonical field -> column name in the data
    prompt_template: str | None = None  # default per format; `{question}` is filled in
    system_prompt: str | None = None  # the system turn, with models.chat_template only
    strip_calculator: bool = True  # drop GSM8K's `<<48/2=24>>` annotations from references


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The demo world: a synthetic addition task and a tiny Llama SLM/LLM pair built locally."""

    out: str = ".citer/demo-world"  # directory to build into
    seed: int = 0  # seed of the problems and of both models' initialisation and training
    digits: int = _f(3, range=(1, 6))  # digits of the numbers the problems add
    n_train: int = _f(2000, range=(1, None))  # training problems (the pair's and the router's)
    n_eval: int = _f(500, range=(1, None))  # held-out problems
    slm_steps: int = _f(900, range=(0, None))  # SLM training steps at most; it stops early at its target accuracy
    llm_steps: int = _f(600, range=(0, None))  # LLM training steps
    batch_size: int = _f(64, range=(1, None))  # problems per training step


@dataclass(frozen=True, kw_only=True)
class SmolConfig:
    """The smol world (`citer build-smol`): SmolLM2-135M-Instruct as the LLM and its first
    `slm_layers` layers as the SLM. `data` is a folder with GSM8K's train.jsonl/test.jsonl (relative
    to the working directory); without it a few built-in problems stand in."""

    out: str = ".citer/smol-world"  # directory to build into
    slm_layers: int = _f(10, range=(1, 29))  # layers the SLM keeps, of the LLM's 30
    seed: int = 0  # seed of the choice of re-fit problems
    # GSM8K training problems the SLM's last layer is re-fitted on (0: a plain cut)
    fit_examples: int = _f(24, range=(0, None))
    eval_examples: int = _f(8, range=(1, None))  # held-out GSM8K test problems for the SLM/LLM top-1 agreement figure
    # folder with GSM8K's train.jsonl and test.jsonl; built-in problems stand in when it is absent
    data: str = "../shared/data/gsm8k"


ROUTER_FEATURES = ("hidden", "topk", "token_embedding")  # in the order the router reads them


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """The router MLP: Linear(f, m1*d) -> BN -> ReLU -> Dropout -> ... -> Linear(., 1), d the SLM's
    hidden size and f the width of its inputs.

    `features`: what it reads at each step: `hidden` (the SLM's last hidden state, CITER's input),
    `topk` (the SLM's `top_k` largest next-token probabilities, at most its vocabulary) and
    `token_embedding` (the SLM's input embedding of its greedy token); the last two are R2R's
    extra inputs. `hidden_sizes`, when set, gives the hidden layers' widths and replaces
    `hidden_mults` ([] is a linear router)."""

    hidden_mults: list[float] = _f(factory=lambda: [2.0, 1.0])
    hidden_sizes: list[int] | None = _f(None, item_range=(1, None))
    dropout: float = _f(0.1, range=(0.0, 1.0))
    features: list[str] = _f(factory=lambda: ["hidden"], item_choices=ROUTER_FEATURES, distinct=True)
    top_k: int = _f(100, range=(1, None))


EVAL_METHODS = ("slm", "llm", "router", "random", "confidence", "query", "speculative")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation: which methods, at which thresholds, on how many examples.

    Methods: `slm` and `llm` alone; `router` at each of `thresholds`; `random` routing at each of
    `random_ratios`; `confidence` routing (LLM where the SLM's top-1 probability is below each of
    `confidence_thresholds`); `query` routing (the `query_fractions` of queries with the lowest
    SLM mean confidence answered wholly by the LLM); and, when listed, `speculative` decoding (the
    SLM drafts, the LLM checks every token: the LLM's accuracy, for its wall-clock and passes).
    """

    n_examples: int = _f(500, range=(1, None))  # held-out examples decoded (the first ones)
    # Examples an evaluation actor decodes in one task; a multiple of batch_size leaves no short batch.
    shard_size: int = _f(128, range=(1, None))
    batch_size: int = _f(64, range=(1, None))  # rows decoded together
    max_new_tokens: int = _f(128, range=(1, None))  # generation limit per example
    methods: list[str] = _f(item_choices=EVAL_METHODS, factory=lambda: list(EVAL_METHODS[:-1]))
    thresholds: list[float] = _f(unit_items=True, factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    random_ratios: list[float] = _f(unit_items=True, factory=lambda: [0.1, 0.2, 0.3, 0.5, 0.7])
    confidence_thresholds: list[float] = _f(unit_items=True, factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    query_fractions: list[float] = _f(unit_items=True, factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    seed: int = 0  # random routing draws and the bootstrap's resamples
    # The router's and confidence routing's sweeps refine themselves around the target accuracy (the
    # LLM's minus 1 point): up to `refine_steps` extra decodes each, bisecting the threshold between
    # the two points that bracket the target, until their LLM-call ratios are within `refine_tolerance`.
    refine_steps: int = _f(4, range=(0, None))
    refine_tolerance: float = _f(0.01, range=(0.0, 1.0))
    bootstrap_resamples: int = _f(2000, range=(100, None))  # paired bootstrap over held-out problems
    length_buckets: int = _f(4, range=(1, None))  # quantile buckets of prompt and generation length


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """When collaborative decoding (rollouts, evaluation, serving) runs the LLM. Greedy tokens do
    not depend on any of these; speed does (docs/performance.md).

    `draft`: rows never wait; a routed row keeps the SLM's token provisionally, and one LLM pass
    every `verify_every` steps (or once a row has `max_pending` routed tokens pending; 0: no bound)
    checks them all, cutting a row back where the LLM disagrees. `immediate`: the LLM runs in the
    step a row routes. `wait`: routed rows wait while the others go on, until `llm_wait_fraction`
    of the rows wait or one has waited `llm_max_wait` steps. `cuda_graphs`: on a GPU, capture each
    step shape once and replay it."""

    schedule: str = _f("draft", choices=("draft", "immediate", "wait"))
    verify_every: int = _f(4, range=(1, None))
    max_pending: int = _f(0, range=(0, None))
    llm_wait_fraction: float = _f(0.5, range=(0.0, 1.0))
    llm_max_wait: int = _f(4, range=(0, None))
    cuda_graphs: bool = True


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """`citer serve`: one engine per Ray Serve replica behind OpenAI's API (docs/serving.md).

    A replica decodes up to `max_batch` requests at once (the engine's slots, each holding
    `max_model_len` tokens of prompt and completion) and holds up to `max_queue` more waiting for a
    slot; past that a request gets HTTP 429. `max_tokens` is a request's completion limit when it
    sets none. A request routes with the router at `threshold` unless it asks otherwise. Each
    replica reserves `num_cpus_per_replica` CPUs (its torch threads) and `num_gpus_per_replica`
    GPUs (null: the collect actors' `collect.num_gpus_per_actor`, which hold the same pair)."""

    model_name: str | None = None  # the model id clients send; null: the config's `name`
    threshold: float = _f(0.9, range=(0.0, 1.0))
    max_batch: int = _f(32, range=(1, None))
    max_queue: int = _f(256, range=(0, None))
    max_model_len: int = _f(1024, range=(2, None))
    max_tokens: int = _f(256, range=(1, None))
    num_replicas: int = _f(1, range=(1, None))
    num_cpus_per_replica: float = _f(1.0, range=(0.0, None))
    num_gpus_per_replica: float | None = _f(None, range=(0.0, None))


@dataclass(frozen=True, kw_only=True)
class CollectConfig:
    """The labelling stage (Ray Data actors holding both models)."""

    threshold: float = _f(0.9, range=(0.0, 1.0))  # router threshold for rollouts, iteration >= 1
    # How case-3 tokens (both models wrong) are labelled: `rollout` (CITER: finish the answer from
    # the SLM's token under the current policy and score it) or `llm` (the paper's myopic ablation:
    # "prefer the LLM", no rollout).
    case3_labels: str = _f("rollout", choices=("rollout", "llm"))
    max_rollouts_per_example: int = _f(32, range=(0, None))  # case-3 tokens rolled out per example; the rest dropped
    max_new_tokens: int = _f(128, range=(1, None))  # a rollout's generation limit
    batch_size: int = _f(16, range=(1, None))  # examples per forward / rollouts per decode batch
    shard_size: int = _f(64, range=(1, None))  # examples per Parquet shard (one actor call)
    num_actors: int = _f(1, range=(1, None))  # Ray Data actors, each holding both models
    num_cpus_per_actor: float = _f(1.0, range=(0.0, None))
    num_gpus_per_actor: float = _f(0.0, range=(0.0, None))  # with models.llm_device_map, the GPUs the LLM spreads over
    n_examples: int | None = None  # cap on training examples; None = all
    # Shortcut audit: this share of case-1 and case-2 tokens (a seeded sample) is also labelled by
    # rollouts, from the SLM's token and from the LLM's, under the iteration's policy.
    audit_rate: float = _f(0.0, range=(0.0, 1.0))


# Top-level keys of a DeepSpeed config (its JSON reference). DeepSpeed ignores unknown top-level
# keys silently, so a typo would otherwise change nothing; the sections' own keys are checked by
# DeepSpeed when the train stage builds the engine config.
DEEPSPEED_KEYS = (
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compression_training", "csv_monitor", "curriculum_learning", "data_efficiency",
    "data_types", "dataloader_drop_last", "disable_allgather", "dump_state", "eigenvalue", "elasticity",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_clipping", "gradient_predivide_factor",
    "memory_breakdown", "optimizer", "prescale_gradients", "progressive_layer_drop", "scheduler",
    "seq_parallel_communication_data_type", "sparse_gradients", "steps_per_print", "tensorboard",
    "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu", "wall_clock_breakdown", "wandb",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
)


@dataclass(frozen=True, kw_only=True)
class DeepSpeedConfig:
    """The parts of the DeepSpeed config citer sets; `extra` is merged in verbatim."""

    zero_stage: int = _f(0, range=(0, 3))
    bf16: bool = False
    grad_clip: float = _f(1.0, range=(0.0, None))
    extra: dict[str, Any] = _f(factory=dict, key_choices=DEEPSPEED_KEYS)  # merged over the generated config


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The router-training stage (Ray Train + DeepSpeed)."""

    num_workers: int = _f(2, range=(1, None))  # Ray Train workers (data-parallel DeepSpeed ranks)
    cpus_per_worker: float = _f(1.0, range=(0.0, None))
    gpus_per_worker: float = _f(0.0, range=(0.0, None))
    batch_size_per_worker: int = _f(256, range=(1, None))
    epochs: int = _f(10, range=(1, None))  # at most; training stops after `patience` epochs without a better val loss
    lr: float = _f(1e-3, range=(0.0, None))
    weight_decay: float = _f(0.01, range=(0.0, None))
    patience: int = _f(3, range=(1, None))
    val_fraction: float = _f(0.1, range=(0.0, 1.0))
    class_weight: float | None = None  # weight of the minority class in the BCE; None = 1
    warm_start: bool = False  # start from the previous iteration's router
    max_failures: int = _f(2, range=(0, None))  # worker failures Ray Train recovers from (from the last checkpoint)


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """The driver: how many collect -> train -> evaluate iterations."""

    iterations: int = _f(2, range=(1, None))


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Weights & Biases. Each key left null defers to its WANDB_* variable (WANDB_PROJECT,
    WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_MODE); the project defaults to "citer", the mode to offline."""

    project: str | None = None
    entity: str | None = None
    group: str | None = None
    mode: str | None = _f(None, choices=(None, "online", "offline", "disabled"))


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole citer job."""

    name: str = "citer-run"  # the run's name: its directory under `storage`, its W&B run name
    seed: int = 0  # seed of data splits, sampling and router initialisation
    storage: str = "runs"  # parent of run dirs: a local path, or s3://, gs://, any pyarrow URI; run = STORAGE/NAME
    models: ModelsConfig
    task: TaskConfig
    demo: DemoConfig | None = None  # when set, commands build the demo world first if absent
    router: RouterConfig = _f(factory=RouterConfig)
    eval: EvalConfig = _f(factory=EvalConfig)
    decode: DecodeConfig = _f(factory=DecodeConfig)
    collect: CollectConfig = _f(factory=CollectConfig)
    train: TrainConfig = _f(factory=TrainConfig)
    deepspeed: DeepSpeedConfig = _f(factory=DeepSpeedConfig)
    loop: LoopConfig = _f(factory=LoopConfig)
    tracking: TrackingConfig = _f(factory=TrackingConfig)
    serve: ServeConfig = _f(factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in `cls`'s source: the comment lines right above it, then the one at
    the end of its line. The CLI's help and docs/configuration.md are made from these."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[: tok.start[1]].strip())
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in comments and comments[line][1]:
                above.insert(0, comments[line][0])
                line -= 1
            trailing = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            docs[node.target.id] = " ".join(above + trailing)
    return docs


# ---------------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `a.b=value` overrides, and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise CiterError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CiterError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise CiterError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    overridden = set()
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value, path)
        overridden.add(key)
    cfg = from_dict(Config, data, source=str(path), overridden=overridden)
    keys = ("collect.num_gpus_per_actor", "models.llm_device_map", "models.device")
    check_llm_gpus(cfg, max((_origin(str(path), k, overridden) for k in keys), key=len))
    return cfg


def check_llm_gpus(cfg: Config, source: str) -> None:
    """Refuse an LLM device map that does not match the GPUs each collect and evaluation actor
    reserves (`collect.num_gpus_per_actor`): Ray shows an actor only its own GPUs, numbered from 0,
    so a map naming GPU n needs n + 1 of them, and a reserved GPU the map leaves empty (GPU 0 holds
    the SLM) is paid for and idle. Whether the LLM fits the GPUs is checked where it loads
    (`models.load_model` refuses layers left on the CPU that the map did not ask for)."""
    m, gpus = cfg.models, cfg.collect.num_gpus_per_actor
    if m.device == "cpu" and not gpus:
        return
    if m.llm_device_map is None:
        if gpus >= 2:
            raise CiterError(f"{source}: collect.num_gpus_per_actor={gpus:g}, but models.llm_device_map is unset: "
                             f"both models sit on the actor's first GPU and the other {gpus - 1:g} are reserved for "
                             "nothing; set models.llm_device_map (e.g. balanced) or reserve 1 GPU")
        return
    if gpus < 1 or gpus != int(gpus):
        raise CiterError(f"{source}: models.llm_device_map spreads the LLM over an actor's GPUs, but "
                         f"collect.num_gpus_per_actor={gpus:g} is not a whole number of GPUs, at least 1")
    if isinstance(m.llm_device_map, dict):
        used = {int(d) for d in m.llm_device_map.values() if str(d).isdigit()}
        if beyond := sorted(d for d in used if d >= gpus):
            raise CiterError(f"{source}: models.llm_device_map puts modules on GPU {beyond[0]}, but an actor reserves "
                             f"{gpus:g} GPUs (collect.num_gpus_per_actor), which it sees as GPUs 0-{int(gpus) - 1}")
        if idle := sorted(set(range(1, int(gpus))) - used):
            raise CiterError(f"{source}: collect.num_gpus_per_actor={gpus:g}, but models.llm_device_map puts no "
                             f"module on GPU {', '.join(map(str, idle))}: reserve {int(gpus) - len(idle)} GPUs or "
                             "place modules there")


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as YAML (so `3`, `0.5`, `null`, `[1, 2]` work)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise CiterError(f"override {item!r}: expected KEY.SUB=VALUE, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: dict, key: str, value: Any, path: Path) -> None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise CiterError(f"override {key}={value!r}: '{prefix}' in {path} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: Any, *, source: str, prefix: str = "", overridden: set[str] = frozenset()) -> Any:
    """Build dataclass `cls` from a plain mapping, checking keys, types, choices and ranges."""
    where = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
    if not isinstance(data, dict):
        raise CiterError(f"{source}: {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise CiterError(
                f"{_origin(source, prefix + str(key), overridden)}: unknown key '{prefix}{key}'{hint}; "
                f"keys allowed under {where}: {', '.join(sorted(known))}"
            )
    kwargs = {}
    for name, f in known.items():
        key = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CiterError(f"{source}: missing required key '{key}' ({_type_name(hints[name])})")
            continue
        kwargs[name] = _check(hints[name], data[name], key, _origin(source, key, overridden), overridden)
        _check_meta(f, kwargs[name], key, _origin(source, key, overridden))
    return cls(**kwargs)


def _origin(source: str, key: str, overridden: set[str]) -> str:
    if any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overridden):
        return f"{source} (with command-line override)"
    return source


def _check(tp: Any, value: Any, key: str, source: str, overridden: set[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(arg, value, key, source, overridden)
            except CiterError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise CiterError(f"{source}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, source=source.split(" (")[0],
                         prefix=key + ".", overridden=overridden)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise CiterError(f"{source}: key '{key}': expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_check(item_tp, v, f"{key}[{i}]", source, overridden) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise CiterError(f"{source}: key '{key}': expected a mapping, got {value!r}")
        return {str(k): _check(val_tp, v, f"{key}.{k}", source, overridden) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise CiterError(f"{source}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    return value


def _check_meta(f: dataclasses.Field, value: Any, key: str, source: str) -> None:
    if f.metadata.get("key_choices"):
        for k in value:
            if k not in f.metadata["key_choices"]:
                close = difflib.get_close_matches(str(k), f.metadata["key_choices"], n=1)
                hint = f" (did you mean '{key}.{close[0]}'?)" if close else ""
                raise CiterError(f"{source}: key '{key}.{k}': not a DeepSpeed config key{hint}")
    if f.metadata.get("distinct") and (not value or len(set(value)) != len(value)):
        raise CiterError(f"{source}: key '{key}': expected distinct items, at least one, got {value!r}")
    if f.metadata.get("item_range") and value is not None:
        lo, hi = f.metadata["item_range"]
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        for i, v in enumerate(value):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise CiterError(f"{source}: key '{key}[{i}]': {v!r} must be {want}")
    if f.metadata.get("unit_items") or f.metadata.get("item_choices"):
        for i, v in enumerate(value):
            if f.metadata.get("item_choices") and v not in f.metadata["item_choices"]:
                raise CiterError(f"{source}: key '{key}[{i}]': {v!r} is not one of: "
                                 f"{', '.join(f.metadata['item_choices'])}")
            if f.metadata.get("unit_items") and not 0.0 <= v <= 1.0:
                raise CiterError(f"{source}: key '{key}[{i}]': {v!r} must be in [0, 1]")
    choices, bounds = f.metadata.get("choices"), f.metadata.get("range")
    if choices is not None and value not in choices:
        allowed = ", ".join("null" if c is None else str(c) for c in choices)
        raise CiterError(f"{source}: key '{key}': {value!r} is not one of: {allowed}")
    if bounds is not None and value is not None:
        lo, hi = bounds
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise CiterError(f"{source}: key '{key}': {value!r} must be {want}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))
