"""Per-token labels by CITER's shortcut rules, from one teacher-forced forward of each model.

For reference token y_i with prefix y_<i (the reference ends with the end-of-sequence token):

1. the SLM's greedy token equals y_i        -> case 1, label 1 (the SLM suffices);
2. else the LLM's greedy token equals y_i   -> case 2, label 0 (the LLM is needed);
3. else                                      -> case 3, labelled later by a rollout.

One forward of each model over prompt + reference gives the greedy token at every position at
once. The public CITER code instead calls `generate` once per token; a test checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline import CiterError
from pipeline.models import ModelPair, encode_prompts
from pipeline.tasks import Example

SLM_ENOUGH, LLM_NEEDED, NEEDS_ROLLOUT = 1, 2, 3


@dataclass
class TeacherForced:
    """One example's reference tokens with both models' greedy predictions and the SLM's states."""

    example_id: str
    prompt_ids: list[int]
    reference_ids: list[int]  # ends with the end-of-sequence token
    slm_tokens: np.ndarray  # (n,) greedy SLM token at each reference position
    llm_tokens: np.ndarray  # (n,)
    slm_hidden: np.ndarray  # (n, d) float16: the SLM's last hidden state the router reads there

    @property
    def cases(self) -> np.ndarray:
        ref = np.asarray(self.reference_ids)
        return np.where(self.slm_tokens == ref, SLM_ENOUGH, np.where(self.llm_tokens == ref, LLM_NEEDED, NEEDS_ROLLOUT))


def encode_reference(pair: ModelPair, ex: Example, chat_template: bool, max_length: int | None) -> tuple[list, list]:
    """(prompt ids, reference ids + eos), refusing empty or over-long references."""
    tok = pair.tokenizer
    if not ex.reference.strip():
        raise CiterError(f"example {ex.id}: the reference is empty, so there is no token to label")
    prompt = encode_prompts(tok, [ex.prompt], chat_template)[0]
    reference = tok(ex.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if max_length is not None and len(prompt) + len(reference) > max_length:
        raise CiterError(
            f"example {ex.id}: prompt + reference is {len(prompt) + len(reference)} tokens, longer than the "
            f"models' context of {max_length}"
        )
    return prompt, reference


def context_length(pair: ModelPair) -> int | None:
    """The shorter of the two models' maximum positions, when their configs state one."""
    lengths = [getattr(m.config, "max_position_embeddings", None) for m in (pair.slm, pair.llm)]
    lengths = [n for n in lengths if n]
    return min(lengths) if lengths else None


@torch.no_grad()
def teacher_forced(pair: ModelPair, examples: list[Example], *, chat_template: bool = False,
                   batch_size: int = 16) -> list[TeacherForced]:
    """Both models' greedy tokens and the SLM's hidden states at every reference position."""
    limit = context_length(pair)
    encoded = [encode_reference(pair, ex, chat_template, limit) for ex in examples]
    out: list[TeacherForced] = []
    pad = pair.tokenizer.pad_token_id
    for start in range(0, len(examples), batch_size):
        chunk = encoded[start : start + batch_size]
        seqs = [p + r[:-1] for p, r in chunk]  # the last reference token is predicted, never read
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=pair.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=pair.device)
        slm_out = pair.slm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        llm_logits = pair.llm(input_ids=ids, attention_mask=mask).logits
        slm_tok, llm_tok = slm_out.logits.argmax(-1).cpu(), llm_logits.argmax(-1).cpu()
        hidden = slm_out.hidden_states[-1].float().cpu()
        for i, ((prompt, reference), ex) in enumerate(zip(chunk, examples[start : start + batch_size], strict=True)):
            pos = slice(len(prompt) - 1, len(prompt) - 1 + len(reference))
            out.append(TeacherForced(
                example_id=ex.id, prompt_ids=prompt, reference_ids=reference,
                slm_tokens=slm_tok[i, pos].numpy(), llm_tokens=llm_tok[i, pos].numpy(),
                slm_hidden=hidden[i, pos].numpy().astype(np.float16),
            ))
    return out
