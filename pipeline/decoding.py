"""Greedy collaborative decoding with token-level routing, keeping a KV cache for each model.

Each step the SLM runs once for every unfinished row. A `Policy` reads the SLM's last hidden
state and logits, and picks the rows whose next token the LLM must produce. Each picked row's LLM
first catches up, in one forward, on the tokens it has not seen yet, then predicts. The SLM takes
in whichever token was chosen at its next step.

- SLM cache: one batched `DynamicCache`, left-padded; rows that finish are dropped from it.
- LLM cache: one per row, because rows call the LLM at different times. A call gathers the
  picked rows' caches into one padded batch, runs one forward, and splits the result back.

The tokens must equal those of `reference_decode`, which recomputes every prefix without a
cache, row by row. A test checks this.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from pipeline import CiterError
from pipeline.router import Router

# ---------------------------------------------------------------------------------------------
# Routing policies


class Policy:
    """Decides, per step, which rows take the LLM's token. `uses_slm`/`uses_llm` let the decoder
    skip a model the policy never needs (the single-model baselines)."""

    name = "policy"
    uses_slm = True
    uses_llm = True

    def route(self, hidden: torch.Tensor, logits: torch.Tensor, rows: list[int], steps: list[int]) -> torch.Tensor:
        """Bool tensor (n,): True where the LLM produces the next token. `hidden`/`logits` are the
        SLM's at the last position; `rows` are row indices in the call, `steps` tokens generated so far."""
        raise NotImplementedError


class SLMOnly(Policy):
    name, uses_llm = "slm", False

    def route(self, hidden, logits, rows, steps):
        return torch.zeros(len(rows), dtype=torch.bool)


class LLMOnly(Policy):
    name, uses_slm = "llm", False

    def route(self, hidden, logits, rows, steps):
        return torch.ones(len(rows), dtype=torch.bool)


@dataclass
class RouterPolicy(Policy):
    """The LLM produces the token where the router's P(SLM is good enough) < threshold."""

    router: Router
    threshold: float
    name = "router"

    def __post_init__(self):
        check_threshold(self.threshold)

    def route(self, hidden, logits, rows, steps):
        return (self.router.prob(hidden.to(next(self.router.parameters()).device)) < self.threshold).cpu()


@dataclass
class ConfidencePolicy(Policy):
    """The LLM produces the token where the SLM's top-1 probability < threshold."""

    threshold: float
    name = "confidence"

    def __post_init__(self):
        check_threshold(self.threshold)

    def route(self, hidden, logits, rows, steps):
        return (torch.softmax(logits.float(), dim=-1).max(dim=-1).values < self.threshold).cpu()


@dataclass
class RandomPolicy(Policy):
    """Each token goes to the LLM with probability `ratio`, drawn from (seed, row, step) so the
    choice does not depend on batching."""

    ratio: float
    seed: int = 0
    name = "random"

    def __post_init__(self):
        check_threshold(self.ratio, "random routing ratio")

    def route(self, hidden, logits, rows, steps):
        return torch.tensor([_uniform(self.seed, r, s) < self.ratio for r, s in zip(rows, steps, strict=True)],
                            dtype=torch.bool)


def _uniform(seed: int, row: int, step: int) -> float:
    """A uniform number in [0, 1) from a splitmix64 hash of (seed, row, step)."""
    x = (seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB + 1) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return ((x ^ (x >> 31)) >> 11) / float(2**53)


def check_threshold(value: float, what: str = "threshold") -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0) or math.isnan(value):
        raise CiterError(f"{what} must be in [0, 1], got {value!r}")


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Generation:
    """One decoded row. `tokens` includes the final end-of-sequence token when one was produced;
    `from_llm[i]` says whether the LLM produced `tokens[i]`."""

    tokens: list[int] = field(default_factory=list)
    from_llm: list[bool] = field(default_factory=list)
    slm_confidence: list[float] = field(default_factory=list)  # SLM top-1 probability per step (when it ran)
    llm_forward_calls: int = 0
    slm_forward_calls: int = 0

    @property
    def llm_tokens(self) -> int:
        return sum(self.from_llm)


def llm_call_ratio(generations: list[Generation]) -> float:
    """LLM-produced tokens / all generated tokens, over a set of rows."""
    total = sum(len(g.tokens) for g in generations)
    return sum(g.llm_tokens for g in generations) / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# The cached, batched decoder


def _as_set(eos_ids: Collection[int] | int) -> frozenset[int]:
    ids = frozenset([eos_ids] if isinstance(eos_ids, int) else eos_ids)
    if not ids:
        raise CiterError("no end-of-sequence id given: a generation could only stop at max_new_tokens")
    return ids


def _check_prompts(prompts: list[list[int]]) -> None:
    if not prompts:
        raise CiterError("no prompts to decode: the prompt list is empty")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise CiterError(f"cannot decode an empty prompt (0 tokens) at row {empty[0]}")


def _step(model: PreTrainedModel, ids, mask, positions, cache, n_ids: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward; returns the last position's (hidden state, logits over the first `n_ids` ids,
    the tokenizer's: rows past them pad the embedding and are never chosen). The hidden state is
    the final layer's output, the vector fed to the LM head: what the router reads."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1][:, -1], out.logits[:, -1, :n_ids]


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


class _BatchedStepper:
    """One model decoding a left-padded batch with one KV cache: prefill, then one token per row
    per step; `keep` drops finished rows from the cache."""

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], pad_id: int, n_ids: int | None):
        self.model, self.n_ids, device = model, n_ids, model.device
        ids, self.mask, positions = _left_pad(prompts, pad_id, device)
        self.cache = DynamicCache()
        self.lengths = torch.tensor([len(p) for p in prompts], device=device)
        self.hidden, self.logits = _step(model, ids, self.mask, positions, self.cache, n_ids)

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.model.device)
        self.cache.batch_select_indices(index)
        self.mask, self.lengths = self.mask[index], self.lengths[index]

    def step(self, tokens: list[int]) -> None:
        ids = torch.tensor(tokens, device=self.model.device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.hidden, self.logits = _step(self.model, ids, self.mask, self.lengths[:, None], self.cache, self.n_ids)
        self.lengths = self.lengths + 1


class _LLMRows:
    """The LLM's per-row KV caches and how many tokens of each row it has seen. With
    `keep_cache=False` every call re-runs the LLM over each row's whole prefix instead (what the
    public CITER code's batched path does; kept to measure against)."""

    def __init__(self, llm: PreTrainedModel, pad_id: int, n_ids: int | None, keep_cache: bool = True):
        self.llm, self.pad_id, self.n_ids, self.keep_cache = llm, pad_id, n_ids, keep_cache
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.seen: dict[int, int] = {}

    @torch.no_grad()
    def predict(self, rows: list[int], seqs: list[list[int]]) -> list[int]:
        """Catch each row's cache up on its unseen tokens in one batched forward; return the
        LLM's greedy next token per row."""
        device = self.llm.device
        if not self.keep_cache:
            ids, mask, positions = _left_pad([seqs[r] for r in rows], self.pad_id, device)
            return _step(self.llm, ids, mask, positions, DynamicCache(), self.n_ids)[1].argmax(-1).tolist()
        past = [self.seen.get(r, 0) for r in rows]
        chunks = [seqs[r][p:] for r, p in zip(rows, past, strict=True)]
        p_max, k_max = max(past), max(map(len, chunks))
        # Row layout: [pad .. past tokens][pad .. new tokens]; holes are masked out.
        mask = torch.zeros(len(rows), p_max + k_max, dtype=torch.long, device=device)
        ids = torch.full((len(rows), k_max), self.pad_id, device=device)
        positions = torch.zeros(len(rows), k_max, dtype=torch.long, device=device)
        for i, (p, chunk) in enumerate(zip(past, chunks, strict=True)):
            mask[i, p_max - p : p_max] = 1
            mask[i, p_max + k_max - len(chunk) :] = 1
            ids[i, k_max - len(chunk) :] = torch.tensor(chunk, device=device)
            positions[i, k_max - len(chunk) :] = torch.arange(p, p + len(chunk), device=device)
        cache = DynamicCache()
        if p_max > 0:
            ref = self.kv[rows[past.index(p_max)]]
            layers = []
            for layer, (ref_k, ref_v) in enumerate(ref):
                ks, vs = [], []
                for r, p in zip(rows, past, strict=True):
                    k, v = self.kv[r][layer] if p else (ref_k[:, :, :0], ref_v[:, :, :0])
                    if p < p_max:  # left-pad this row's cache to the longest one
                        k = torch.cat([k.new_zeros(*k.shape[:2], p_max - p, k.shape[-1]), k], dim=2)
                        v = torch.cat([v.new_zeros(*v.shape[:2], p_max - p, v.shape[-1]), v], dim=2)
                    ks.append(k)
                    vs.append(v)
                layers.append((torch.cat(ks), torch.cat(vs)))
            cache = DynamicCache(ddp_cache_data=layers)
        _, logits = _step(self.llm, ids, mask, positions, cache, self.n_ids)
        for i, (r, p, chunk) in enumerate(zip(rows, past, chunks, strict=True)):
            keep = torch.cat([torch.arange(p_max - p, p_max), torch.arange(p_max + k_max - len(chunk), p_max + k_max)])
            keep = keep.to(device)
            self.kv[r] = [(layer.keys[i : i + 1, :, keep], layer.values[i : i + 1, :, keep]) for layer in cache.layers]
            self.seen[r] = p + len(chunk)
        return logits.argmax(-1).tolist()

    def drop(self, row: int) -> None:
        self.kv.pop(row, None)


@torch.no_grad()
def collaborative_decode(
    slm: PreTrainedModel | None,
    llm: PreTrainedModel | None,
    prompts: list[list[int]],
    policy: Policy,
    *,
    eos_ids: Collection[int],
    pad_id: int,
    max_new_tokens: int,
    n_ids: int | None = None,
    row_ids: list[int] | None = None,
    llm_cache: bool = True,
) -> list[Generation]:
    """Greedy decoding of a batch of prompts under `policy`, with both KV caches (see module doc).
    A row ends at any of `eos_ids` or after `max_new_tokens`; tokens are chosen among the first
    `n_ids` ids (the tokenizer's; None = every logit). `row_ids` name the rows for the policy
    (default 0..n-1); `llm_cache=False` makes every LLM call re-run the whole prefix (benchmarks)."""
    _check_prompts(prompts)
    if policy.uses_slm and slm is None or policy.uses_llm and llm is None:
        raise CiterError(f"the {policy.name} policy needs both models")
    results = [Generation() for _ in prompts]
    seqs = [list(p) for p in prompts]
    if not (policy.uses_slm and policy.uses_llm):  # a single-model baseline
        model = slm if policy.uses_slm else llm
        return _single_model_decode(model, prompts, results, from_llm=not policy.uses_slm, eos_ids=eos_ids,
                                    pad_id=pad_id, n_ids=n_ids, max_new_tokens=max_new_tokens)
    row_ids = list(range(len(prompts))) if row_ids is None else row_ids
    eos_ids = _as_set(eos_ids)
    llm_rows = _LLMRows(llm, pad_id, n_ids, keep_cache=llm_cache)
    active = list(range(len(prompts)))
    slm_rows = _BatchedStepper(slm, prompts, pad_id, n_ids)
    while True:
        for r in active:
            results[r].slm_forward_calls += 1
        conf, slm_next = torch.softmax(slm_rows.logits.float(), dim=-1).max(dim=-1)
        steps = [len(results[r].tokens) for r in active]
        to_llm = policy.route(slm_rows.hidden, slm_rows.logits, [row_ids[r] for r in active], steps).tolist()
        chosen = slm_next.tolist()
        picked = [i for i, go in enumerate(to_llm) if go]
        if picked:
            for i, tok in zip(picked, llm_rows.predict([active[i] for i in picked], seqs), strict=True):
                chosen[i] = tok
                results[active[i]].llm_forward_calls += 1
        keep = []
        for i, r in enumerate(active):
            g = results[r]
            g.tokens.append(chosen[i])
            g.from_llm.append(bool(to_llm[i]))
            g.slm_confidence.append(float(conf[i]))
            seqs[r].append(chosen[i])
            if chosen[i] not in eos_ids and len(g.tokens) < max_new_tokens:
                keep.append(i)
            else:
                llm_rows.drop(r)
        if not keep:
            return results
        if len(keep) < len(active):
            slm_rows.keep(keep)
            active = [active[i] for i in keep]
        slm_rows.step([seqs[r][-1] for r in active])


def _single_model_decode(model: PreTrainedModel, prompts: list[list[int]], results: list[Generation], *,
                         from_llm: bool, eos_ids: Collection[int], pad_id: int, n_ids: int | None,
                         max_new_tokens: int) -> list[Generation]:
    """Greedy decoding by one model with a batched cache (the SLM-only and LLM-only baselines)."""
    eos_ids = _as_set(eos_ids)
    active = list(range(len(prompts)))
    rows = _BatchedStepper(model, prompts, pad_id, n_ids)
    while True:
        conf, nxt = torch.softmax(rows.logits.float(), dim=-1).max(dim=-1)
        keep = []
        for i, r in enumerate(active):
            g = results[r]
            g.tokens.append(int(nxt[i]))
            g.from_llm.append(from_llm)
            g.slm_confidence.append(float("nan") if from_llm else float(conf[i]))
            if from_llm:
                g.llm_forward_calls += 1
            else:
                g.slm_forward_calls += 1
            if g.tokens[-1] not in eos_ids and len(g.tokens) < max_new_tokens:
                keep.append(i)
        if not keep:
            return results
        if len(keep) < len(active):
            rows.keep(keep)
            active = [active[i] for i in keep]
        rows.step([results[r].tokens[-1] for r in active])


def decode(slm, llm, prompts: list[list[int]], policy: Policy, *, eos_ids: Collection[int], pad_id: int,
           max_new_tokens: int, n_ids: int | None = None, batch_size: int = 64,
           desc: str | None = None) -> list[Generation]:
    """`collaborative_decode` over batches of similar-length prompts, with a progress bar."""
    _check_prompts(prompts)
    if not policy.uses_slm:
        slm = None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=True if desc is None else None, leave=False):
        gens = collaborative_decode(slm, llm if policy.uses_llm else None, [prompts[i] for i in batch], policy,
                                    eos_ids=eos_ids, pad_id=pad_id, max_new_tokens=max_new_tokens, n_ids=n_ids,
                                    row_ids=batch)
        for i, g in zip(batch, gens, strict=True):
            out[i] = g
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The cache-free reference


@torch.no_grad()
def reference_decode(slm, llm, prompts: list[list[int]], policy: Policy, *, eos_ids: Collection[int],
                     max_new_tokens: int, n_ids: int | None = None) -> list[Generation]:
    """The simplest correct implementation: each row alone, both models re-run over the full
    prefix at every step. Slow; the definition the cached decoder must match token for token."""
    _check_prompts(prompts)
    eos_ids = _as_set(eos_ids)
    results = []
    for row, prompt in enumerate(prompts):
        g, seq = Generation(), list(prompt)
        while True:
            if policy.uses_slm:
                out = slm(input_ids=torch.tensor([seq], device=slm.device), output_hidden_states=True)
                hidden, logits = out.hidden_states[-1][:, -1], out.logits[:, -1, :n_ids]
                g.slm_forward_calls += 1
                to_llm = bool(policy.route(hidden, logits, [row], [len(g.tokens)])[0]) if policy.uses_llm else False
                tok = int(logits.argmax(-1))
            else:
                to_llm = True
            if to_llm:
                tok = int(llm(input_ids=torch.tensor([seq], device=llm.device)).logits[0, -1, :n_ids].argmax())
                g.llm_forward_calls += 1
            g.tokens.append(tok)
            g.from_llm.append(to_llm)
            seq.append(tok)
            if tok in eos_ids or len(g.tokens) >= max_new_tokens:
                break
        results.append(g)
    return results
