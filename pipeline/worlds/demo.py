"""The demo world: a synthetic task in GSM8K's format and a tiny Llama SLM/LLM pair, built on CPU.

The task is column addition of two 3-digit numbers, worked least-significant digit first; each
step writes `a+b+carry=sum:partial`, and the solution ends in `#### <sum>`:

    What is 472+385?
    2+5+0=7:7 7+8+0=15:57 4+3+1=8:857 #### 857

Steps are separated by one space, or by two: a harmless choice, since the next step is the same
either way. The models see two spaces at a twentieth of step boundaries, so they can read them but
greedily write one; the references of train.jsonl, which the router is labelled on, write two at
most boundaries, the way gold solutions are written in a style of their own. At a reference's second
space both models predict the next step's first digit (case 3 of the labels), and the rollout from
the SLM's digit there goes on from a state either model writes itself: it reaches the right answer
likely when the LLM writes the rest, not when the SLM does. So the rollout label there depends on the
policy that finishes the answer, and iterations of router training change labels.

Both models are `LlamaForCausalLM` with a character-level tokenizer, saved with
`save_pretrained`, so they load through the same code as a hub model. The LLM (4 layers, width
128) learns the task; the SLM (2 layers, width 48, >10x fewer FLOPs per token) is stopped early,
near `SLM_TARGET_ACCURACY`, so it is clearly worse, with its errors on the digits of the steps:
the tokens a router should send to the LLM. Its training data also has a blind spot (see
`make_problem`) that makes it confidently wrong.
"""

from __future__ import annotations

import json
import logging
import random
import string
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.atomic import atomic_directory, atomic_write_json
from pipeline.config import DemoConfig, TaskConfig
from pipeline.decoding import SLMOnly, decode
from pipeline.models import flops_per_token
from pipeline.tasks import Example, is_correct, row_to_example

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "{question}\n"
DEMO_CHARS = string.digits + " +-=:#?.\nWhatis"
MARKER = "world.json"
SLM_SHAPE = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=1)
LLM_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4)
SLM_TARGET_ACCURACY = 0.35  # stop the SLM near here: inside the 20-70% band, with margin both ways
LLM_TARGET_ACCURACY = 0.98  # stop the LLM once it has mastered the task
LR = 3e-3
# Shares of step boundaries written with two spaces instead of one: in the models' training text (they read two
# spaces, but greedily write one) and in the references the router is labelled on (CHANGELOG.md says why this
# harmless choice, and not another, makes the case-3 labels depend on the policy).
LLM_SPACE_RATE = 0.05
SLM_SPACE_RATE = 0.05
REFERENCE_SPACE_RATE = 0.8
BUILDER_VERSION = 4  # bump when a build would differ, so cached worlds from older code are rebuilt


def demo_task_config(out: str | Path) -> TaskConfig:
    """The task section that reads the demo world's data files."""
    out = Path(out)
    return TaskConfig(format="gsm8k", train_path=str(out / "data" / "train.jsonl"),
                      eval_path=str(out / "data" / "eval.jsonl"), prompt_template=PROMPT_TEMPLATE)


def make_problem(rng: random.Random, digits: int, blind_spot: bool = False, space: float = 0.0) -> dict:
    """One addition problem as a GSM8K-format row: {"question", "answer"}.

    With `blind_spot`, the worked solution forgets the carry after a column whose two digits sum
    to 15 or more, and its answer follows from that: the SLM's training data, which makes it
    confidently wrong on identifiable tokens (the next column's carry).

    With `space` > 0, each boundary between two steps is written with two spaces instead of one with
    that probability (`7+8+0=15:57  4+3+1=8:857`): a harmless choice. It draws from `rng` only then,
    so `space=0` gives the same rows as before it existed."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    carry, partial, steps = 0, "", []
    da, db = str(a)[::-1], str(b)[::-1]
    for i, (x, y) in enumerate(zip(da, db, strict=True)):
        s = int(x) + int(y) + carry
        partial = (str(s) if i == len(da) - 1 else str(s % 10)) + partial
        gap = "  " if i > 0 and space > 0 and rng.random() < space else " "
        steps.append((gap if i > 0 else "") + f"{x}+{y}+{carry}={s}:{partial}")
        carry = 0 if blind_spot and int(x) + int(y) >= 15 else s // 10
    return {"question": f"What is {a}+{b}?", "answer": "".join(steps) + f" #### {int(partial)}"}


def training_rows(rng: random.Random, digits: int, n: int, exclude: set[str], *, space: float,
                  blind_spot: bool = False) -> list[dict]:
    """`n` fresh problems for a model's training, none whose question is in `exclude`."""
    rows = []
    while len(rows) < n:
        row = make_problem(rng, digits, blind_spot, space=space)
        if row["question"] not in exclude:
            rows.append(row)
    return rows


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the task's characters, with <pad>, <eos>, <unk>.

    The vocabulary is kept to what the task uses: tiny models trained with 100 printable-ASCII
    tokens learned the task several times slower (measured: 20% vs 99% SLM accuracy at 500 steps).
    """
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in DEMO_CHARS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: Path) -> None:
    tok.save_pretrained(directory)
    # Name the generic fast class so AutoTokenizer loads tokenizer.json as saved. (The pair is
    # Llama, not Qwen2: transformers 5 forces qwen2 directories onto Qwen2Tokenizer, which
    # silently drops this tokenizer's spaces and newlines.)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def new_model(shape: dict, tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    d, heads = shape["hidden_size"], shape["num_attention_heads"]
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=d, intermediate_size=4 * d, num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg)


def _encode(tok: PreTrainedTokenizerFast, ex: Example) -> tuple[list[int], int]:
    prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"]
    ref = tok(ex.reference, add_special_tokens=False)["input_ids"]
    return prompt + ref + [tok.eos_token_id], len(prompt)


def _batch(tok: PreTrainedTokenizerFast, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 on prompt and padding; loss on reference + eos)."""
    encoded = [_encode(tok, ex) for ex in examples]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    for i, (row, n_prompt) in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, n_prompt : len(row)] = torch.tensor(row[n_prompt:])
    return ids, labels


def accuracy(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, examples: list[Example],
             max_new_tokens: int = 64, batch_size: int = 100) -> float:
    """Greedy accuracy of one model on examples (the demo task's own scorer)."""
    model.eval()
    prompts = [tok(ex.prompt, add_special_tokens=False)["input_ids"] for ex in examples]
    outs = decode(model, None, prompts, SLMOnly(), pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id],
                  max_new_tokens=max_new_tokens, batch_size=batch_size).generations
    ok = sum(is_correct("gsm8k", tok.decode(o.tokens, skip_special_tokens=True), ex.answer)
             for o, ex in zip(outs, examples, strict=True))
    return ok / len(examples)


def train_model(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, sample, steps: int, batch_size: int,
                name: str, validate, target: float, check_every: int, nearest: bool = False) -> dict:
    """Train on freshly sampled problems with AdamW + one-cycle LR over at most `steps` steps;
    stop at the first validation check (every `check_every` steps from step 150) reaching `target`.
    With `nearest`, keep the weights of that check or the one before, whichever is nearer `target`
    (a model that learns in jumps would otherwise overshoot a target meant as a middle)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=max(steps, 1), pct_start=0.1)
    info: dict = {"steps": 0, "val_accuracy": None}
    last: tuple[dict, dict] | None = None  # the previous check's (info, weights)
    bar = tqdm(range(steps), desc=f"training demo {name}", leave=False, disable=None, mininterval=1.0)
    for step in bar:
        model.train()
        ids, labels = _batch(tok, sample(batch_size))
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        info["steps"] = step + 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step + 1 >= 150 and (step + 1) % check_every == 0:
            info["val_accuracy"] = validate(model)
            if info["val_accuracy"] >= target:
                if nearest and last and target - last[0]["val_accuracy"] < info["val_accuracy"] - target:
                    info = last[0]
                    model.load_state_dict(last[1])
                break
            if nearest:
                last = dict(info), {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    model.eval()
    return info


def built_version(out: str | Path) -> int | None:
    """The builder version of the world at `out` (1 for worlds from before versions); None if there is none."""
    marker = Path(out) / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("builder_version", 1)


def is_built(out: str | Path) -> bool:
    """Whether a world built by this code's builder version is at `out`."""
    return built_version(out) == BUILDER_VERSION


def ensure_demo_world(cfg: DemoConfig) -> dict:
    """Build the demo world at `cfg.out` unless this builder version already built it; return its world.json."""
    if is_built(cfg.out):
        return json.loads((Path(cfg.out) / MARKER).read_text())
    if (version := built_version(cfg.out)) is not None:
        log.info("rebuilding the demo world in %s: it was built by builder version %s, this code is version %d",
                 cfg.out, version, BUILDER_VERSION)
    return build_demo_world(cfg)


@dataclass
class Splits:
    """The demo world's problems: the saved train and eval rows, the eval and validation examples
    (validation only steers the SLM's early stop), and a sampler of fresh training examples for
    the models that never draws a held-out problem."""

    train_rows: list[dict]
    eval_rows: list[dict]
    eval_examples: list[Example]
    val_examples: list[Example]
    sampler: Callable[..., Callable[[int], list[Example]]]


def make_splits(cfg: DemoConfig, task: TaskConfig) -> Splits:
    """Every problem of the world, drawn from `cfg.seed` (the models' training stream from seed + 1)."""
    rng = random.Random(cfg.seed)

    def unique_problems(n: int, seen: set, space: float = 0.0) -> list[dict]:
        rows = []
        while len(rows) < n:
            row = make_problem(rng, cfg.digits, space=space)
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
        return rows

    taken: set[str] = set()
    eval_rows = unique_problems(cfg.n_eval, taken)
    val_rows = unique_problems(200, taken)
    train_rows = unique_problems(cfg.n_train, taken, space=REFERENCE_SPACE_RATE)
    held_out = {r["question"] for r in eval_rows} | {r["question"] for r in val_rows}
    to_ex = lambda rows, split: [row_to_example(task, r, i, "demo", split) for i, r in enumerate(rows)]  # noqa: E731
    train_rng = random.Random(cfg.seed + 1)

    def sampler(space: float, blind_spot: bool = False) -> Callable[[int], list[Example]]:
        return lambda n: to_ex(training_rows(train_rng, cfg.digits, n, held_out, space=space, blind_spot=blind_spot),
                               "train")

    return Splits(train_rows, eval_rows, to_ex(eval_rows, "eval"), to_ex(val_rows, "val"), sampler)


def train_pair(cfg: DemoConfig, tok: PreTrainedTokenizerFast, splits: Splits) -> tuple[LlamaForCausalLM, dict,
                                                                                          LlamaForCausalLM, dict]:
    """The LLM trained until it masters the task, then the SLM stopped near its target accuracy."""
    llm = new_model(LLM_SHAPE, tok, cfg.seed)
    validate = lambda m: accuracy(m, tok, splits.val_examples)  # noqa: E731
    llm_info = train_model(llm, tok, splits.sampler(LLM_SPACE_RATE), cfg.llm_steps, cfg.batch_size, "LLM",
                           validate=validate, target=LLM_TARGET_ACCURACY, check_every=50)
    slm = new_model(SLM_SHAPE, tok, cfg.seed)
    slm_info = train_model(slm, tok, splits.sampler(SLM_SPACE_RATE, blind_spot=True), cfg.slm_steps, cfg.batch_size,
                           "SLM", validate=validate, target=SLM_TARGET_ACCURACY, check_every=5, nearest=True)
    return slm, slm_info, llm, llm_info


def build_demo_world(cfg: DemoConfig) -> dict:
    """Build data, tokenizer, SLM and LLM deterministically from `cfg.seed`; write them under
    `cfg.out` as a whole (a temporary directory renamed into place) and return world.json."""
    t0 = time.time()
    out = Path(cfg.out)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    splits = make_splits(cfg, demo_task_config(out))
    tok = build_tokenizer()
    log.info("building the demo world in %s (seed %d)", out, cfg.seed)
    slm, slm_info, llm, llm_info = train_pair(cfg, tok, splits)
    eval_ex, train_rows, eval_rows = splits.eval_examples, splits.train_rows, splits.eval_rows
    world = {
        "builder_version": BUILDER_VERSION,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "task": "3-digit column addition in GSM8K format" if cfg.digits == 3 else f"{cfg.digits}-digit addition",
        "prompt_template": PROMPT_TEMPLATE,
        "slm": {**SLM_SHAPE, **slm_info, "space_rate": SLM_SPACE_RATE, "flops_per_token": flops_per_token(slm),
                "eval_accuracy": accuracy(slm, tok, eval_ex)},
        "llm": {**LLM_SHAPE, **llm_info, "space_rate": LLM_SPACE_RATE, "flops_per_token": flops_per_token(llm),
                "eval_accuracy": accuracy(llm, tok, eval_ex)},
        "reference_space_rate": REFERENCE_SPACE_RATE,
        "n_train": cfg.n_train,
        "n_eval": cfg.n_eval,
    }
    world["llm_slm_flops_ratio"] = world["llm"]["flops_per_token"] / world["slm"]["flops_per_token"]
    with atomic_directory(out) as tmp:
        for name, model in (("slm", slm), ("llm", llm)):
            model.save_pretrained(tmp / name, safe_serialization=True)
            save_tokenizer(tok, tmp / name)
        (tmp / "data").mkdir()
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            (tmp / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        world["build_seconds"] = round(time.time() - t0, 1)
        atomic_write_json(tmp / MARKER, world)
    log.info(
        "demo world ready in %.0fs: SLM accuracy %.1f%%, LLM accuracy %.1f%%, LLM/SLM FLOPs per token %.1fx",
        world["build_seconds"], 100 * world["slm"]["eval_accuracy"], 100 * world["llm"]["eval_accuracy"],
        world["llm_slm_flops_ratio"],
    )
    return world
