"""Load an SLM/LLM pair (hub name or local Hugging Face directory) that shares one tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline import CiterError
from pipeline.config import ModelsConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelPair:
    """The two causal LMs and their shared tokenizer, in eval mode."""

    slm: PreTrainedModel
    llm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def hidden_size(self) -> int:
        """Size of the SLM's last hidden state: the router's input size."""
        return self.slm.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.slm.device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CiterError("models.device is 'cuda' but no CUDA device is visible; use models.device=cpu or auto")
    return torch.device(device)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CiterError(f"could not load the tokenizer of {name!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # batched generation appends on the right
    return tok


def load_model(name: str, cfg: ModelsConfig) -> PreTrainedModel:
    """One causal LM in eval mode; safetensors weights only, no remote code unless configured."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as e:
        raise CiterError(f"could not load model {name!r}: {e}") from None
    return model.to(resolve_device(cfg.device)).eval()


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
    """Load SLM, LLM and the shared tokenizer, refusing mismatched tokenizers."""
    tok_s = load_tokenizer(cfg.slm, cfg.trust_remote_code)
    tok_l = load_tokenizer(cfg.llm, cfg.trust_remote_code)
    check_same_tokenizer(tok_s, tok_l, (cfg.slm, cfg.llm))
    log.info("loading SLM %s and LLM %s (%s on %s)", cfg.slm, cfg.llm, cfg.dtype, cfg.device)
    pair = ModelPair(slm=load_model(cfg.slm, cfg), llm=load_model(cfg.llm, cfg), tokenizer=tok_s)
    if pair.slm.config.vocab_size != pair.llm.config.vocab_size:
        raise CiterError(
            f"the SLM {cfg.slm!r} has {pair.slm.config.vocab_size} output logits and the LLM {cfg.llm!r} "
            f"{pair.llm.config.vocab_size}: their vocabularies must line up"
        )
    return pair


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt, through the chat template when the config asks for it."""
    if not prompts:
        raise CiterError("no prompts to encode: the prompt list is empty")
    if chat_template:
        return [
            list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
            for p in prompts
        ]
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


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
