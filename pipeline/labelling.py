"""Per-token labels by CITER's shortcut rules, from one teacher-forced forward of each model.

For reference token y_i with prefix y_<i (the reference ends with the end-of-sequence token):

1. the SLM's greedy token equals y_i        -> case 1, label 1 (the SLM suffices);
2. else the LLM's greedy token equals y_i   -> case 2, label 0 (the LLM is needed);
3. else                                      -> case 3, labelled later by a rollout.

One forward of each model over prompt + reference gives the greedy token at every position at
once. The public CITER code instead calls `generate` once per token; a test checks the two agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    # The router's other inputs there, by feature name ("topk", "token_embedding"): (n, width) float16.
    slm_features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def cases(self) -> np.ndarray:
        ref = np.asarray(self.reference_ids)
        return np.where(self.slm_tokens == ref, SLM_ENOUGH, np.where(self.llm_tokens == ref, LLM_NEEDED, NEEDS_ROLLOUT))


def encode_reference(tok, ex: Example, *, chat_template: bool, end_id: int, max_length: int | None = None,
                     system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids + `end_id`), refusing empty or over-long references. `end_id` is
    the token the model writes when its answer is done (`ModelPair.end_of_turn_id`)."""
    if not ex.reference.strip():
        raise CiterError(f"example {ex.id}: the reference is empty, so there is no token to label")
    prompt = encode_prompts(tok, [ex.prompt], chat_template, system_prompt)[0]
    reference = tok(ex.reference, add_special_tokens=False)["input_ids"] + [end_id]
    if max_length is not None and len(prompt) + len(reference) > max_length:
        raise CiterError(
            f"example {ex.id}: prompt + reference is {len(prompt) + len(reference)} tokens, longer than the "
            f"models' context of {max_length}"
        )
    return prompt, reference


def context_length(*configs) -> int | None:
    """The shortest maximum position among model configs, when they state one."""
    lengths = [n for n in (getattr(c, "max_position_embeddings", None) for c in configs) if n]
    return min(lengths) if lengths else None


@torch.no_grad()
def teacher_forced(pair: ModelPair, examples: list[Example], *, chat_template: bool = False,
                   system_prompt: str | None = None, batch_size: int = 16, features: tuple[str, ...] = (),
                   top_k: int = 0) -> list[TeacherForced]:
    """Both models' greedy tokens (over the tokenizer's ids) and the SLM's hidden states at every
    reference position, and the router's other `features` there (`Router.step_features`'s, from
    the same logits and greedy tokens the decoder's SLM step has)."""
    from pipeline.router import step_features

    limit = context_length(pair.slm.config, pair.llm.config)
    encoded = [encode_reference(pair.tokenizer, ex, chat_template=chat_template, end_id=pair.end_of_turn_id,
                                max_length=limit, system_prompt=system_prompt) for ex in examples]
    out: list[TeacherForced] = []
    pad, n_ids = pair.tokenizer.pad_token_id, pair.n_ids
    for start in range(0, len(examples), batch_size):
        chunk = encoded[start : start + batch_size]
        seqs = [p + r[:-1] for p, r in chunk]  # the last reference token is predicted, never read
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=pair.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=pair.device)
        slm_out = pair.slm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        llm_logits = pair.llm(input_ids=ids, attention_mask=mask).logits
        slm_tok, llm_tok = slm_out.logits[..., :n_ids].argmax(-1).cpu(), llm_logits[..., :n_ids].argmax(-1).cpu()
        extra = [f for f in features if f != "hidden"]
        extras = {f: v.float().cpu() for f, v in step_features(
            extra, top_k, None, slm_out.logits[..., :n_ids], slm_tok.to(pair.device),
            pair.slm.get_input_embeddings()).items()}
        hidden = slm_out.hidden_states[-1].float().cpu()
        del slm_out, llm_logits
        for i, ((prompt, reference), ex) in enumerate(zip(chunk, examples[start : start + batch_size], strict=True)):
            pos = slice(len(prompt) - 1, len(prompt) - 1 + len(reference))
            out.append(TeacherForced(
                example_id=ex.id, prompt_ids=prompt, reference_ids=reference,
                slm_tokens=slm_tok[i, pos].numpy(), llm_tokens=llm_tok[i, pos].numpy(),
                slm_hidden=hidden[i, pos].numpy().astype(np.float16),
                slm_features={f: v[i, pos].numpy().astype(np.float16) for f, v in extras.items()},
            ))
    return out


# ---------------------------------------------------------------------------------------------
# Case 3: rollouts


@dataclass
class TokenLabel:
    """One labelled reference token: the row the collect stage writes."""

    example_id: str
    position: int  # index in the reference (0 = first response token)
    token_id: int
    slm_token: int
    llm_token: int
    slm_hidden: np.ndarray  # (d,) float16
    case: int  # 1, 2 or 3
    label: int  # 1 = the SLM suffices, 0 = the LLM is needed
    rollout_correct: bool | None  # case 3 only
    slm_features: dict[str, np.ndarray] = field(default_factory=dict)  # the router's other inputs
    # The shortcut audit (sampled case-1/2 tokens only): whether the rollout from the SLM's token,
    # and from the LLM's, reached the gold answer.
    audit_slm_correct: bool | None = None
    audit_llm_correct: bool | None = None


def rollout_positions(tf: TeacherForced, max_rollouts: int) -> list[int]:
    """The case-3 positions to roll out: all of them, or a deterministic sample of `max_rollouts`
    (by a hash of example id and position, so reruns and other machines pick the same ones)."""
    import hashlib

    positions = [int(i) for i in np.flatnonzero(tf.cases == NEEDS_ROLLOUT)]
    if len(positions) <= max_rollouts:
        return positions
    key = lambda i: hashlib.sha256(f"{tf.example_id}:{i}".encode()).digest()  # noqa: E731
    return sorted(sorted(positions, key=key)[:max_rollouts])


@dataclass(frozen=True)
class Rollout:
    """One case-3 rollout: it continues from prompt + reference prefix + the SLM's token there."""

    prompt_ids: list[int]
    reference_ids: list[int]
    position: int
    slm_token: int  # the continuation's first token: the SLM's (case 3; the audit also starts from the LLM's)
    answer: str
    labels: list[str] | None = None  # the example's choice labels (multiple choice)

    @property
    def start(self) -> list[int]:
        return self.prompt_ids + self.reference_ids[: self.position] + [self.slm_token]


@torch.no_grad()
def prefix_states(model, seqs: list[list[int]], pad_id: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """One right-padded forward over `seqs`; each sequence's (key, value) states per layer, views
    of the batch's cache whose first len(seq) positions are that sequence's own."""
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=model.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
    cache = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).cache
    return [[(layer.keys[i : i + 1], layer.values[i : i + 1]) for layer in cache.layers] for i in range(len(seqs))]


def run_rollouts(pair: ModelPair, rollouts: list[Rollout], *, task_format: str, policy, max_new_tokens: int,
                 batch_size: int, decoding: dict | None = None,
                 on_examples: Callable[[int], Any] | None = None) -> tuple[list[bool], int]:
    """Finish every rollout under `policy` and score it. Returns the outcomes and the number of
    rollouts cut off by `max_new_tokens` before an end id (scored wrong: no answer).

    Rollouts are decoded `batch_size` examples at a time: one forward of each model over an
    example's prompt + reference gives the states every rollout of that example starts from
    (cropped to its position), instead of one prefill per rollout. `decoding`: `decode`'s schedule
    and graph settings (`pipeline.decoding.settings`). `on_examples(n)` hears of each batch's
    examples as their rollouts finish.

    A rollout is scored on the response (the reference prefix and the rollout's own tokens, never
    the prompt), and is correct only when the decisive answer lies in its own text (`score_rollout`)."""
    from pipeline.decoding import Prefix, decode
    from pipeline.tasks import score_rollout

    tok, eos = pair.tokenizer, set(pair.eos_ids)
    live = [k for k, r in enumerate(rollouts) if r.slm_token not in eos]  # an end id ends the response already
    by_example: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for k in live:
        by_example.setdefault((tuple(rollouts[k].prompt_ids), tuple(rollouts[k].reference_ids)), []).append(k)
    groups = list(by_example.items())
    continuations: dict[int, list[int]] = {}
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        # Up to the furthest position a rollout of the example starts from: no state is computed twice.
        seqs = [list(prompt) + list(reference[: max(rollouts[k].position for k in members)])
                for (prompt, reference), members in chunk]
        states = {name: prefix_states(model, seqs, tok.pad_token_id) if used else [None] * len(seqs)
                  for name, model, used in (("slm", pair.slm, policy.uses_slm), ("llm", pair.llm, policy.uses_llm))}
        ks = [k for _, members in chunk for k in members]
        prefixes = [Prefix(length=len(prompt) + rollouts[k].position, slm=states["slm"][g], llm=states["llm"][g])
                    for g, ((prompt, _), members) in enumerate(chunk) for k in members]
        done = decode(pair.slm, pair.llm, [rollouts[k].start for k in ks], policy, **pair.decode_kwargs,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, prefixes=prefixes,
                      **(decoding or {}))
        continuations.update({k: g.tokens for k, g in zip(ks, done.generations, strict=True)})
        del states, prefixes
        if on_examples is not None:
            on_examples(len(chunk))
    outcomes, unfinished = [], 0
    for k, r in enumerate(rollouts):
        own = [r.slm_token, *continuations.get(k, [])]
        if own[-1] not in eos:
            unfinished += 1
            outcomes.append(False)
            continue
        prefix = tok.decode(r.reference_ids[: r.position], skip_special_tokens=True)
        full = tok.decode(r.reference_ids[: r.position] + own, skip_special_tokens=True)
        cut = len(prefix) if full.startswith(prefix) else len(os.path.commonprefix([prefix, full]))
        outcomes.append(score_rollout(task_format, full[:cut], full[cut:], r.answer, labels=r.labels))
    return outcomes, unfinished


def label_examples(pair: ModelPair, examples: list[Example], tf: list[TeacherForced], *, task_format: str,
                   policy, max_rollouts: int, max_new_tokens: int, batch_size: int,
                   case3_labels: str = "rollout", decoding: dict | None = None, audit_rate: float = 0.0,
                   audit_seed: int = 0, on_examples: Callable[[int], Any] | None = None,
                   ) -> tuple[list[TokenLabel], dict[str, int]]:
    """Labels for every reference token of `examples`: cases 1-2 from the teacher-forced pass,
    case 3 from rollouts under `policy` (or, with `case3_labels="llm"`, the myopic rule: "prefer
    the LLM" without a rollout), and the shortcut audit of `audit_rate` of the case-1/2 tokens
    (`audit_positions`, `audit_rollouts`). Returns the labels and counts: `case3_dropped` (case-3
    tokens the `max_rollouts` cap left out), `rollouts_unfinished` (case 3) and
    `audit_rollouts_unfinished`. `on_examples`: as `run_rollouts`'s, for the case-3 rollouts."""
    jobs, dropped = [], 0
    for e, t in enumerate(tf):
        chosen = rollout_positions(t, max_rollouts)
        dropped += int((t.cases == NEEDS_ROLLOUT).sum()) - len(chosen)
        jobs += [(e, i) for i in chosen]
    results, unfinished = [False] * len(jobs), 0
    kw = dict(task_format=task_format, policy=policy, max_new_tokens=max_new_tokens, batch_size=batch_size,
              decoding=decoding)
    if case3_labels == "rollout":
        rollouts = [Rollout(tf[e].prompt_ids, tf[e].reference_ids, i, int(tf[e].slm_tokens[i]), examples[e].answer,
                            examples[e].labels) for e, i in jobs]
        results, unfinished = run_rollouts(pair, rollouts, **kw, on_examples=on_examples)
    elif case3_labels != "llm":
        raise CiterError(f"collect.case3_labels must be 'rollout' or 'llm', got {case3_labels!r}")
    outcome = dict(zip(jobs, results, strict=True))
    audited = [(e, i) for e, t in enumerate(tf) for i in audit_positions(t.example_id, t.cases, audit_rate, audit_seed)]
    audits, audit_unfinished = audit_rollouts(pair, [AuditToken(
        tf[e].prompt_ids, tf[e].reference_ids, i, int(tf[e].slm_tokens[i]), int(tf[e].llm_tokens[i]),
        examples[e].answer, examples[e].labels) for e, i in audited], **kw)
    audit = dict(zip(audited, audits, strict=True))
    labels = []
    for e, t in enumerate(tf):
        for i, case in enumerate(t.cases.tolist()):
            if case == NEEDS_ROLLOUT and (e, i) not in outcome:
                continue
            correct = outcome.get((e, i)) if case3_labels == "rollout" else None
            slm_ok, llm_ok = audit.get((e, i), (None, None))
            labels.append(TokenLabel(
                example_id=t.example_id, position=i, token_id=t.reference_ids[i], slm_token=int(t.slm_tokens[i]),
                llm_token=int(t.llm_tokens[i]), slm_hidden=t.slm_hidden[i], case=case,
                label=1 if case == SLM_ENOUGH else 0 if case == LLM_NEEDED else int(bool(correct)),
                rollout_correct=correct, slm_features={f: v[i] for f, v in t.slm_features.items()},
                audit_slm_correct=slm_ok, audit_llm_correct=llm_ok,
            ))
    return labels, {"case3_dropped": dropped, "rollouts_unfinished": unfinished,
                    "audit_rollouts_unfinished": audit_unfinished}


# ---------------------------------------------------------------------------------------------
# The shortcut audit


def audit_positions(example_id: str, cases: np.ndarray, rate: float, seed: int) -> list[int]:
    """The case-1 and case-2 positions of an example the shortcut audit rolls out: those whose
    seeded hash of (example id, position) falls below `rate`, so reruns, later iterations and
    other machines audit the same tokens."""
    from pipeline.shards import seeded_unit

    if rate <= 0:
        return []
    return [i for i, case in enumerate(np.asarray(cases).tolist())
            if case in (SLM_ENOUGH, LLM_NEEDED) and seeded_unit(seed, f"audit:{example_id}:{i}") < rate]


@dataclass(frozen=True)
class AuditToken:
    """A case-1/2 token to audit: where it is, both models' greedy tokens there, and the gold answer."""

    prompt_ids: list[int]
    reference_ids: list[int]
    position: int
    slm_token: int
    llm_token: int
    answer: str
    labels: list[str] | None = None


def audit_rollouts(pair: ModelPair, tokens: list[AuditToken], **rollout_kw) -> tuple[list[tuple[bool, bool]], int]:
    """Per token, (the rollout from the SLM's token reached the gold answer, the rollout from the
    LLM's did), both finished under the policy in `rollout_kw` (`run_rollouts`'s arguments); where
    the two tokens are the same one rollout serves both. Also the number of rollouts cut off."""
    rollouts, slots = [], []
    for t in tokens:
        first = len(rollouts)
        rollouts.append(Rollout(t.prompt_ids, t.reference_ids, t.position, t.slm_token, t.answer, t.labels))
        if t.llm_token != t.slm_token:
            rollouts.append(Rollout(t.prompt_ids, t.reference_ids, t.position, t.llm_token, t.answer, t.labels))
        slots.append((first, len(rollouts) - 1))
    if not rollouts:
        return [], 0
    outcomes, unfinished = run_rollouts(pair, rollouts, **rollout_kw)
    return [(outcomes[a], outcomes[b]) for a, b in slots], unfinished
