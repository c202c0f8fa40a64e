"""Greedy collaborative decoding with token-level routing, one KV cache per model for the batch.

Each step the SLM reads one token for every row not waiting for the LLM. A `Policy` reads the
SLM's last hidden state and logits and sends some rows to the LLM; those rows wait while the
others go on. When the `Schedule` says so, the LLM runs once for the whole batch: it catches
every row up on the tokens it has not read (the SLM's tokens since its last call) and gives each
waiting row its token. Routing saves LLM *passes* (each one a read of all its weights, what a
decode step costs in the memory-bound regime); the LLM still reads nearly every token once.

- Each model keeps one `DynamicCache` over the batch's slots; a forward appends columns, each
  row's chunk right-aligned and holes masked; positions are per row (`_KVBatch`).
- A row that ends hands its slot to the next prompt (continuous batching).
- A row may start from states computed elsewhere (`Prefix`: a rollout reuses the teacher-forced
  pass of its example).

Greedy tokens do not depend on batching or scheduling: they must equal those of
`reference_decode`, which recomputes every prefix without a cache, row by row. Tests check this
for every schedule.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel

from pipeline import CiterError
from pipeline.progress import Progress
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
    choice does not depend on batching. `first_row` numbers the rows of a shard of a larger set,
    so that the draws do not depend on sharding either."""

    ratio: float
    seed: int = 0
    first_row: int = 0
    name = "random"

    def __post_init__(self):
        check_threshold(self.ratio, "random routing ratio")

    def route(self, hidden, logits, rows, steps):
        return torch.tensor([_uniform(self.seed, self.first_row + r, s) < self.ratio
                             for r, s in zip(rows, steps, strict=True)], dtype=torch.bool)


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
    `from_llm[i]` says whether the LLM produced `tokens[i]`. The counts say what each model
    really did for this row: forward passes it took part in and tokens it read (prompt, catch-up
    and generated tokens; a prefix whose KV was reused is not read again)."""

    tokens: list[int] = field(default_factory=list)
    from_llm: list[bool] = field(default_factory=list)
    slm_confidence: list[float] = field(default_factory=list)  # SLM top-1 probability per step (when it ran)
    llm_passes: int = 0
    slm_passes: int = 0
    llm_tokens_processed: int = 0
    slm_tokens_processed: int = 0

    @property
    def llm_tokens(self) -> int:
        return sum(self.from_llm)


@dataclass
class Decoding:
    """A decode call's rows and what the hardware did for all of them together. A pass is one
    forward call of a model (one read of its weights) over every row in the batch; `*_positions`
    counts the positions it computed, masked holes included; `*_tokens_processed` only real tokens."""

    generations: list[Generation]
    llm_passes: int = 0
    slm_passes: int = 0
    llm_positions: int = 0
    slm_positions: int = 0
    reused_prefix_tokens: int = 0  # tokens of the rows' `Prefix`es, whose states were copied in

    @property
    def llm_tokens_processed(self) -> int:
        return sum(g.llm_tokens_processed for g in self.generations)

    @property
    def slm_tokens_processed(self) -> int:
        return sum(g.slm_tokens_processed for g in self.generations)

    def counts(self) -> dict[str, int]:
        """The pass and token counts, for eval points and benchmarks."""
        return {"llm_passes": self.llm_passes, "slm_passes": self.slm_passes,
                "llm_tokens_processed": self.llm_tokens_processed,
                "slm_tokens_processed": self.slm_tokens_processed,
                "llm_positions": self.llm_positions, "slm_positions": self.slm_positions,
                "reused_prefix_tokens": self.reused_prefix_tokens}


def llm_call_ratio(generations: list[Generation]) -> float:
    """LLM-produced tokens / all generated tokens, over a set of rows."""
    total = sum(len(g.tokens) for g in generations)
    return sum(g.llm_tokens for g in generations) / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# When the LLM runs


@dataclass(frozen=True)
class Schedule:
    """When a batch calls the LLM. A row the router sends to the LLM waits while the other rows
    go on with the SLM; the LLM then runs once for every waiting row, and catches every other
    row up on the tokens it has not read, once `wait_fraction` of the active rows wait, or a row
    has waited `max_wait` SLM steps, or no row can go on without it. The default, `wait_fraction=0`,
    calls the LLM at once for any waiting row. Greedy tokens do not depend on the schedule; speed
    does: waiting saves LLM passes but costs SLM steps and masked positions in both models."""

    wait_fraction: float = 0.0
    max_wait: int = 0

    def __post_init__(self):
        check_threshold(self.wait_fraction, "decode.llm_wait_fraction")
        if not isinstance(self.max_wait, int) or self.max_wait < 0:
            raise CiterError(f"decode.llm_max_wait must be an integer >= 0, got {self.max_wait!r}")

    @classmethod
    def of(cls, decode_config) -> Schedule:
        """The schedule a config's `decode` section sets."""
        return cls(wait_fraction=decode_config.llm_wait_fraction, max_wait=decode_config.llm_max_wait)

    def call_now(self, waiting: int, active: int, longest_wait: int) -> bool:
        if waiting == 0:
            return False
        return (waiting >= max(1, math.ceil(self.wait_fraction * active)) or longest_wait >= self.max_wait
                or waiting == active)


IMMEDIATE = Schedule(wait_fraction=0.0, max_wait=0)


@dataclass(frozen=True)
class Prefix:
    """Key/value states already computed for a row's first `length` tokens (for example by the
    teacher-forced pass a rollout starts from): per model, one (key, value) pair per layer, each
    (1, heads, >= length, head_dim). The decoder copies them in instead of re-reading the tokens."""

    length: int
    slm: list[tuple[torch.Tensor, torch.Tensor]] | None
    llm: list[tuple[torch.Tensor, torch.Tensor]] | None


# ---------------------------------------------------------------------------------------------
# One KV cache per model over the batch


class _KVBatch:
    """One model's KV cache over the decoder's slots, in one `DynamicCache`. Columns are shared:
    a forward appends as many columns as the longest chunk fed, each slot's chunk right-aligned
    and the rest masked. Each slot keeps its own positions, so masked holes change nothing but
    the work. Slots are emptied (a new row takes them) or dropped, and columns no slot uses are
    removed."""

    def __init__(self, model: PreTrainedModel, n_slots: int, pad_id: int, n_ids: int | None, hidden: bool):
        self.model, self.pad_id, self.n_ids, self.want_hidden = model, pad_id, n_ids, hidden
        self.device = model.device
        self.cache = DynamicCache()
        self.mask = torch.zeros(n_slots, 0, dtype=torch.long, device=self.device)
        self.seen = [0] * n_slots  # tokens of each slot's row the cache holds
        self.greedy: list[int | None] = [None] * n_slots  # the greedy token after each slot's last read token
        self.passes = self.positions = 0

    def forward(self, chunks: list[list[int]]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Read each slot's chunk (empty: nothing for that slot); return the (hidden state, logits
        over the first `n_ids` ids) after each slot's last token (garbage for empty chunks)."""
        n, width = len(chunks), max(map(len, chunks))
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        new = torch.zeros(n, width, dtype=torch.long)
        positions = torch.zeros(n, width, dtype=torch.long)
        for i, chunk in enumerate(chunks):
            if chunk:
                ids[i, width - len(chunk):] = torch.tensor(chunk)
                new[i, width - len(chunk):] = 1
                positions[i, width - len(chunk):] = torch.arange(self.seen[i], self.seen[i] + len(chunk))
                self.seen[i] += len(chunk)
        self.mask = torch.cat([self.mask, new.to(self.device)], dim=1)
        out = self.model(input_ids=ids.to(self.device), attention_mask=self.mask,
                         position_ids=positions.to(self.device), cache=self.cache, use_cache=True,
                         output_hidden_states=self.want_hidden, logits_to_keep=1)
        self.passes += 1
        self.positions += n * width
        hidden, logits = out.hidden_states[-1][:, -1] if self.want_hidden else None, out.logits[:, -1, : self.n_ids]
        for i, token in enumerate(logits.argmax(-1).tolist()):
            if chunks[i]:
                self.greedy[i] = token
        return hidden, logits

    def insert(self, items: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]], int]]) -> None:
        """Give empty slots the states of their rows' first tokens: (slot, layers, length) each, all
        in one copy of the cache, each slot's states right-aligned in the new columns."""
        if not items:
            return
        n, old = self.mask.shape
        width = max(length for _, _, length in items)
        grown = []
        for layer in range(len(items[0][1])):
            k0, v0 = items[0][1][layer]
            # each layer's states stay on its own device (a sharded model's layers differ)
            keys = k0.new_zeros(n, k0.shape[1], old + width, k0.shape[3])
            values = v0.new_zeros(n, v0.shape[1], old + width, v0.shape[3])
            if old:
                keys[:, :, :old], values[:, :, :old] = self.cache.layers[layer].keys, self.cache.layers[layer].values
            for slot, layers, length in items:
                k, v = layers[layer]
                keys[slot, :, old + width - length:] = k[0, :, :length]
                values[slot, :, old + width - length:] = v[0, :, :length]
            grown.append((keys, values))
        self.cache = DynamicCache(ddp_cache_data=grown)
        self.mask = torch.cat([self.mask, self.mask.new_zeros(n, width)], dim=1)
        for slot, _, length in items:
            self.mask[slot, old + width - length:] = 1
            self.seen[slot] = length

    def empty(self, slot: int) -> None:
        """Forget a slot's row so that a new one can take the slot."""
        self.mask[slot] = 0
        self.seen[slot], self.greedy[slot] = 0, None
        self._compact()

    def keep(self, slots: list[int]) -> None:
        """Drop every slot not in `slots` from the batch."""
        index = torch.tensor(slots, dtype=torch.long)  # a CPU index selects on any device
        if self.cache.layers and self.cache.layers[0].is_initialized:
            self.cache.batch_select_indices(index)
        self.mask = self.mask[index.to(self.device)]
        self.seen, self.greedy = [self.seen[s] for s in slots], [self.greedy[s] for s in slots]
        self._compact()

    def _compact(self) -> None:
        """Remove the columns no slot uses, once they are a quarter of the cache."""
        used = self.mask.any(dim=0)
        if int((~used).sum()) * 4 < used.numel():
            return
        columns = used.nonzero().squeeze(-1).cpu()
        self.mask = self.mask[:, columns.to(self.device)]
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[:, :, columns], layer.values[:, :, columns]


# ---------------------------------------------------------------------------------------------
# The decoder


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


@dataclass
class _Row:
    index: int  # the prompt's index in the decode call
    seq: list[int]  # prompt + generated tokens
    gen: Generation
    waiting_since: int | None = None  # the SLM step at which the router sent this row to the LLM
    confidence: float = float("nan")  # the SLM's top-1 probability for the token the row waits for


@torch.no_grad()
def decode(slm: PreTrainedModel | None, llm: PreTrainedModel | None, prompts: list[list[int]], policy: Policy, *,
           eos_ids: Collection[int], pad_id: int, max_new_tokens: int, n_ids: int | None = None,
           batch_size: int = 64, schedule: Schedule = Schedule(), prefixes: list[Prefix | None] | None = None,
           desc: str | None = None) -> Decoding:
    """Greedy decoding of `prompts` under `policy`, `batch_size` rows at a time: a row that ends
    (at any of `eos_ids`, or after `max_new_tokens`) hands its slot to the next prompt. Tokens are
    chosen among the first `n_ids` ids (the tokenizer's; None = every logit). Each step the SLM
    reads one token for every row not waiting for the LLM; the LLM runs as `schedule` says.
    `prefixes[i]`, when given, holds states already computed for the start of prompt i."""
    _check_prompts(prompts)
    if policy.uses_slm and slm is None or policy.uses_llm and llm is None:
        raise CiterError(f"the {policy.name} policy needs both models")
    if prefixes is not None and len(prefixes) != len(prompts):
        raise CiterError(f"{len(prefixes)} prefixes given for {len(prompts)} prompts")
    eos_ids = _as_set(eos_ids)
    queue = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)  # pop() takes the shortest
    n_slots = min(batch_size, len(prompts))
    slm_kv = _KVBatch(slm, n_slots, pad_id, n_ids, hidden=True) if policy.uses_slm else None
    llm_kv = _KVBatch(llm, n_slots, pad_id, n_ids, hidden=False) if policy.uses_llm else None
    out = Decoding([Generation() for _ in prompts])
    slots: list[_Row] = []

    def fill(free: list[int]) -> None:
        """Give each free slot the next prompt, and its prefix states when there are some."""
        inserts: dict[str, list] = {"slm": [], "llm": []}
        for slot in free:
            i = queue.pop()
            row = _Row(i, list(prompts[i]), out.generations[i])
            if slot < len(slots):
                slots[slot] = row
            else:
                slots.append(row)
            prefix = prefixes[i] if prefixes is not None else None
            for name, kv in (("slm", slm_kv), ("llm", llm_kv)):
                if kv is not None:
                    kv.empty(slot)
                    if prefix and getattr(prefix, name):
                        inserts[name].append((slot, getattr(prefix, name), prefix.length))
            out.reused_prefix_tokens += prefix.length if prefix else 0
        for name, kv in (("slm", slm_kv), ("llm", llm_kv)):
            if kv is not None:
                kv.insert(inserts[name])

    fill(list(range(n_slots)))
    bar = Progress(len(prompts), desc, unit="row", leave=False)
    step = 0

    def append(slot: int, token: int, from_llm: bool, confidence: float) -> bool:
        """Add a token to a slot's row; True when the row has ended."""
        row = slots[slot]
        row.gen.tokens.append(token)
        row.gen.from_llm.append(from_llm)
        row.gen.slm_confidence.append(confidence)
        row.seq.append(token)
        row.waiting_since = None
        return token in eos_ids or len(row.gen.tokens) >= max_new_tokens

    def read(kv: _KVBatch, which: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        chunks = [slots[s].seq[kv.seen[s]:] if s in which else [] for s in range(len(slots))]
        for s in which:
            gen = slots[s].gen
            if kv is slm_kv:
                gen.slm_passes, gen.slm_tokens_processed = gen.slm_passes + 1, gen.slm_tokens_processed + len(chunks[s])
            else:
                gen.llm_passes, gen.llm_tokens_processed = gen.llm_passes + 1, gen.llm_tokens_processed + len(chunks[s])
        return kv.forward(chunks)

    while slots:
        ended: list[int] = []
        if slm_kv is not None:
            going = [s for s, row in enumerate(slots) if row.waiting_since is None]
            if going:
                hidden, logits = read(slm_kv, going)
                index = torch.tensor(going, device=logits.device)
                conf, nxt = torch.softmax(logits[index].float(), dim=-1).max(dim=-1)
                to_llm = policy.route(hidden[index], logits[index], [slots[s].index for s in going],
                                      [len(slots[s].gen.tokens) for s in going]).tolist()
                for k, s in enumerate(going):
                    if to_llm[k]:
                        slots[s].waiting_since, slots[s].confidence = step, float(conf[k])
                    elif append(s, int(nxt[k]), False, float(conf[k])):
                        ended.append(s)
                step += 1
        else:  # LLM alone: every row waits for it at once
            for row in slots:
                row.waiting_since = step
        waiting = [s for s, row in enumerate(slots) if row.waiting_since is not None]
        live = len(slots) - len(ended)
        longest = max((step - slots[s].waiting_since for s in waiting), default=0)
        if llm_kv is not None and schedule.call_now(len(waiting), live, longest):
            # The LLM reads every live row's unread tokens; a waiting row it has read to the end
            # already (it caught up on the SLM's token at an earlier call) has its token waiting.
            unread = [s for s in range(len(slots)) if s not in ended and len(slots[s].seq) > llm_kv.seen[s]]
            if unread:
                read(llm_kv, unread)
            for s in waiting:
                if append(s, llm_kv.greedy[s], True, slots[s].confidence):
                    ended.append(s)
        bar.update(len(ended))
        refill = sorted(ended)[: len(queue)]
        fill(refill)
        gone = sorted(set(ended) - set(refill))
        if gone:
            slots = [row for s, row in enumerate(slots) if s not in gone]
            for kv in (slm_kv, llm_kv):
                if kv is not None and slots:
                    kv.keep([s for s in range(len(slots) + len(gone)) if s not in gone])
    bar.close()
    for kv, name in ((slm_kv, "slm"), (llm_kv, "llm")):
        if kv is not None:
            setattr(out, f"{name}_passes", kv.passes)
            setattr(out, f"{name}_positions", kv.positions)
    return out


# ---------------------------------------------------------------------------------------------
# The method a user would pick instead


@torch.no_grad()
def speculative_decode(slm: PreTrainedModel, llm: PreTrainedModel, prompts: list[list[int]], *,
                       eos_ids: Collection[int], pad_id: int, max_new_tokens: int, desc: str | None = None) -> Decoding:
    """Speculative decoding with the SLM as the draft model (transformers' assisted generation),
    one prompt at a time: the output is exactly the LLM's greedy output, every token checked by it.
    Passes and tokens read are counted on each model's forward calls."""
    _check_prompts(prompts)
    eos_ids = _as_set(eos_ids)
    out = Decoding([Generation() for _ in prompts])
    counts = {"slm": [0, 0], "llm": [0, 0]}  # passes, tokens read

    def counter(name: str):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            counts[name][0] += 1
            counts[name][1] += 0 if ids is None else int(ids.numel())
        return hook

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=sorted(eos_ids))
    hooks = [m.register_forward_pre_hook(counter(n), with_kwargs=True) for n, m in (("slm", slm), ("llm", llm))]
    try:
        bar = Progress(len(prompts), desc, unit="row", leave=False)
        for i, prompt in enumerate(prompts):
            before = {n: list(c) for n, c in counts.items()}
            ids = torch.tensor([prompt], device=llm.device)
            new = llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), assistant_model=slm,
                               generation_config=config)[0, len(prompt):].tolist()
            end = next((k + 1 for k, t in enumerate(new) if t in eos_ids), len(new))
            g = out.generations[i]
            g.tokens, g.from_llm = new[:end], [True] * end
            g.slm_confidence = [float("nan")] * end
            g.llm_passes, g.llm_tokens_processed = (counts["llm"][k] - before["llm"][k] for k in (0, 1))
            g.slm_passes, g.slm_tokens_processed = (counts["slm"][k] - before["slm"][k] for k in (0, 1))
            bar.update()
        bar.close()
    finally:
        for h in hooks:
            h.remove()
    out.llm_passes, out.slm_passes = counts["llm"][0], counts["slm"][0]
    out.llm_positions, out.slm_positions = counts["llm"][1], counts["slm"][1]
    return out


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
                g.slm_passes += 1
                g.slm_tokens_processed += len(seq)
                to_llm = bool(policy.route(hidden, logits, [row], [len(g.tokens)])[0]) if policy.uses_llm else False
                tok = int(logits.argmax(-1))
            else:
                to_llm = True
            if to_llm:
                tok = int(llm(input_ids=torch.tensor([seq], device=llm.device)).logits[0, -1, :n_ids].argmax())
                g.llm_passes += 1
                g.llm_tokens_processed += len(seq)
            g.tokens.append(tok)
            g.from_llm.append(to_llm)
            seq.append(tok)
            if tok in eos_ids or len(g.tokens) >= max_new_tokens:
                break
        results.append(g)
    return results
