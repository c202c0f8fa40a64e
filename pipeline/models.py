"""Load an SLM/LLM pair (hub name or local Hugging Face directory) that shares one tokenizer."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline import CiterError
from pipeline.config import ModelsConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelPair:
    """The two causal LMs and their shared tokenizer, in eval mode.

    `n_ids` is the number of token ids the tokenizer maps: logits past it are padding rows of an
    embedding rounded up (Qwen2-72B has 152,064 rows for a 151,646-id tokenizer) and are never
    chosen. `eos_ids` are every id that ends a generation; `end_of_turn_id` is the one the model
    writes at the end of an answer (the reference for teacher forcing ends with it)."""

    slm: PreTrainedModel
    llm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    eos_ids: tuple[int, ...] = ()
    end_of_turn_id: int | None = None

    @property
    def hidden_size(self) -> int:
        """Size of the SLM's last hidden state: the router's input size."""
        return self.slm.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.slm.device

    @property
    def n_ids(self) -> int:
        return token_id_count(self.tokenizer)

    @property
    def decode_kwargs(self) -> dict:
        """The tokenizer facts every decoder call takes: end ids, padding id, valid id count."""
        return {"eos_ids": self.eos_ids, "pad_id": self.tokenizer.pad_token_id, "n_ids": self.n_ids}


def token_id_count(tokenizer: PreTrainedTokenizerBase) -> int:
    """1 + the largest id the tokenizer maps (added tokens included)."""
    return max(tokenizer.get_vocab().values()) + 1


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CiterError("models.device is 'cuda' but no CUDA device is visible; use models.device=cpu or auto")
    return torch.device(device)


def check_model_name(name: str) -> None:
    """Refuse a name that is neither an existing local directory nor a valid hub id, saying so
    (transformers' own message for a mistyped local path is about repo-id syntax)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name).expanduser().is_dir():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CiterError(f"model {name!r}: no directory {name}; not a hub id either (a hub id is 'org/name', "
                         "a local model a directory with config.json)") from None


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    check_model_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CiterError(f"could not load the tokenizer of {name!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # batched generation appends on the right
    return tok


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def load_model(name: str, cfg: ModelsConfig, device_map: str | dict | None = None) -> PreTrainedModel:
    """One causal LM in eval mode; safetensors weights only, no remote code unless configured. With
    `device_map` (the LLM's `models.llm_device_map`) its modules are spread over devices by
    accelerate, which moves each module's inputs to its device, so callers feed `model.device`."""
    check_model_name(name)
    if not sys.stderr.isatty():  # a "Loading weights" bar per model is noise in a log (an actor's, a job's)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    placement = {}
    if device_map is not None:
        placement = llm_placement(cfg, device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            **placement,
        )
    except (OSError, ValueError) as e:
        raise CiterError(f"could not load model {name!r}: {e}") from None
    if placement:
        # transformers sets no hf_device_map when the whole model landed on one device
        placed = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
        log.info("%s spread over %s", name, ", ".join(sorted({str(d) for d in placed.values()})))
        check_offload(name, cfg, device_map, placed)
        return model.eval()
    return model.to(resolve_device(cfg.device)).eval()


def check_offload(name: str, cfg: ModelsConfig, device_map: str | dict, placed: dict) -> None:
    """Refuse an LLM that accelerate had to leave partly in host memory or on disk because the GPUs
    this process sees (an actor's `collect.num_gpus_per_actor`) do not hold it, unless the map or
    `models.llm_max_memory` asked for that: every LLM pass would then copy those layers in."""
    if cfg.device == "cpu":
        return
    asked = set(device_map.values()) if isinstance(device_map, dict) else set()
    asked |= {str(k) for k in (cfg.llm_max_memory or {})}
    offloaded = [m for m, d in placed.items() if str(d) in ("cpu", "disk") and str(d) not in asked]
    if offloaded:
        raise CiterError(f"models.llm_device_map={device_map!r} left {len(offloaded)} of {name}'s modules in host "
                         f"memory or on disk ({offloaded[0] or 'the whole model'}, ...): the "
                         f"{torch.cuda.device_count()} GPUs this actor reserves (collect.num_gpus_per_actor) do not "
                         "hold it. Reserve more GPUs per actor, or name 'cpu' or 'disk' in an explicit map (or in "
                         "models.llm_max_memory) to offload on purpose")


def check_pair(cfg: ModelsConfig) -> PreTrainedTokenizerBase:
    """What can be checked of a pair without loading either model: both names, one shared
    tokenizer, the LLM's placement settings. A driver checks this before its actors load the pair,
    so that a bad pair is one clear error and not an actor's failure. Returns the shared tokenizer."""
    tok = load_tokenizer(cfg.slm, cfg.trust_remote_code)
    check_same_tokenizer(tok, load_tokenizer(cfg.llm, cfg.trust_remote_code), (cfg.slm, cfg.llm))
    if cfg.llm_device_map is not None:
        llm_placement(cfg, cfg.llm_device_map, here=False)
    return tok


def llm_placement(cfg: ModelsConfig, device_map: str | dict, here: bool = True) -> dict:
    """from_pretrained's placement arguments for `models.llm_device_map`, checked (GPU indices
    against the GPUs visible `here`, unless the check runs elsewhere than the loading)."""
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise CiterError(f"models.llm_device_map: {device_map!r} is not one of {', '.join(DEVICE_MAPS)} "
                         "or a {module: device} mapping")
    if isinstance(device_map, dict):
        device_map = {module: int(d) if str(d).isdigit() else d for module, d in device_map.items()}
        for module, d in device_map.items():
            if not (isinstance(d, int) or d in ("cpu", "disk")):
                raise CiterError(f"models.llm_device_map.{module}: {d!r} is not a GPU index, 'cpu' or 'disk'")
            if here and isinstance(d, int) and d >= torch.cuda.device_count():
                raise CiterError(f"models.llm_device_map.{module}: GPU {d} is not visible "
                                 f"({torch.cuda.device_count()} GPUs here)")
        if "disk" in device_map.values() and not cfg.llm_offload_folder:
            raise CiterError("models.llm_device_map puts modules on 'disk': set models.llm_offload_folder")
    placement = {"device_map": device_map}
    if cfg.llm_max_memory:
        placement["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in cfg.llm_max_memory.items()}
    if cfg.llm_offload_folder:
        placement["offload_folder"] = cfg.llm_offload_folder
    return placement


def check_same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, names: tuple[str, str]) -> None:
    """Refuse two tokenizers that map any token to a different id, saying how they differ."""
    va, vb = a.get_vocab(), b.get_vocab()
    problems = []
    if len(va) != len(vb):
        problems.append(f"vocabulary sizes differ ({len(va)} vs {len(vb)})")
    only_a, only_b = va.keys() - vb.keys(), vb.keys() - va.keys()
    if only_a or only_b:
        sample = sorted(only_a)[:3] + sorted(only_b)[:3]
        problems.append(f"{len(only_a)} tokens only in the SLM's and {len(only_b)} only in the LLM's (e.g. {sample})")
    moved = sorted(t for t in va.keys() & vb.keys() if va[t] != vb[t])
    if moved:
        t = moved[0]
        problems.append(f"{len(moved)} tokens map to different ids (e.g. {t!r}: {va[t]} vs {vb[t]})")
    if a.eos_token_id != b.eos_token_id:
        problems.append(f"end-of-sequence ids differ ({a.eos_token_id} vs {b.eos_token_id})")
    if problems:
        raise CiterError(
            f"the SLM {names[0]!r} and the LLM {names[1]!r} do not share a tokenizer: "
            + "; ".join(problems)
            + ". CITER routes single tokens between the models, so both must use the same vocabulary."
        )


def load_pair(cfg: ModelsConfig) -> ModelPair:
    """Load SLM, LLM and the shared tokenizer, refusing mismatched tokenizers. The models may have
    more embedding rows than the tokenizer has ids (padding); never fewer."""
    tok_s = load_tokenizer(cfg.slm, cfg.trust_remote_code)
    tok_l = load_tokenizer(cfg.llm, cfg.trust_remote_code)
    check_same_tokenizer(tok_s, tok_l, (cfg.slm, cfg.llm))
    log.info("loading SLM %s and LLM %s (%s on %s)", cfg.slm, cfg.llm, cfg.dtype,
             cfg.device if cfg.llm_device_map is None else f"{cfg.device}; LLM device map {cfg.llm_device_map}")
    slm, llm = load_model(cfg.slm, cfg), load_model(cfg.llm, cfg, cfg.llm_device_map)
    n_ids = token_id_count(tok_s)
    for role, name, model in (("SLM", cfg.slm, slm), ("LLM", cfg.llm, llm)):
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < n_ids:
            raise CiterError(f"the {role} {name!r} has {rows} output logits but its tokenizer maps {n_ids} token ids: "
                             "the model and tokenizer do not belong together")
    return ModelPair(slm=slm, llm=llm, tokenizer=tok_s, eos_ids=end_ids(tok_s, (slm, llm), cfg.eos_tokens),
                     end_of_turn_id=end_of_turn_id(tok_s, cfg.chat_template))


def end_ids(tokenizer: PreTrainedTokenizerBase, models: tuple = (), extra_tokens: list[str] = ()) -> tuple[int, ...]:
    """Every id that ends a generation: the tokenizer's eos, each model's generation-config
    `eos_token_id` (an int or a list), and `extra_tokens` (`models.eos_tokens`), sorted."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for model in models:
        gen = getattr(model, "generation_config", None)
        value = getattr(gen, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else value or [])
    vocab = tokenizer.get_vocab()
    for token in extra_tokens:
        if token not in vocab:
            raise CiterError(f"models.eos_tokens: {token!r} is not a token of the tokenizer")
        ids.add(vocab[token])
    if not ids:
        raise CiterError("the tokenizer has no eos token and the models' generation configs name none: "
                         "set models.eos_tokens")
    return tuple(sorted(ids))


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> int | None:
    """The token a model writes when its answer is done: under the chat template, the special token
    that closes an assistant turn (`<|im_end|>`, `<|eot_id|>`); otherwise the tokenizer's eos."""
    if chat_template:
        marker = "XyZzY"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
        if marker in text:
            after = tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids)
            closing = [i for i in after if i in special]
            if closing:
                return closing[0]
    return tokenizer.eos_token_id


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat_template: bool,
                   system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each prompt: through the chat template (with `system_prompt` as the system
    turn, when given) and the assistant-turn opening, or else as plain text after the tokenizer's
    BOS when it has one."""
    if not prompts:
        raise CiterError("no prompts to encode: the prompt list is empty")
    if chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise CiterError("models.chat_template is true but the tokenizer has no chat template")
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return [
            list(tokenizer.apply_chat_template([*system, {"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
            for p in prompts
        ]
    if system_prompt:
        raise CiterError("task.system_prompt needs models.chat_template: true (a plain prompt has no system turn)")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def count_parameters(model: torch.nn.Module, include_embeddings: bool = False) -> int:
    """Parameters that cost FLOPs per token (the input embedding is a lookup, not a matmul)."""
    total = sum(p.numel() for p in model.parameters())
    if not include_embeddings and hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        tied = out is not None and out.weight is emb
        total -= 0 if tied else emb.numel()
    return total


def flops_per_token(model: PreTrainedModel) -> int:
    """Forward FLOPs per token, estimated as 2 x the parameters a token goes through."""
    return 2 * count_parameters(model)
