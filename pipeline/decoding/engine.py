"""The collaborative decoding engine: a batch of rows, both models' static caches, one step at a time.

Every step the SLM reads one token for each row that can go on and proposes the next; the row's
policy decides whether the LLM writes it instead. When the LLM runs is the `Schedule`:

- **draft** (the default): rows never wait. A routed row keeps the SLM's token provisionally and
  goes on; every `verify_every` steps (or once a row has `max_pending` routed positions pending)
  one LLM pass reads every row's new tokens, in one fixed shape for the batch, and checks each
  pending position: where the LLM's token agrees nothing changes; where it differs, it replaces
  the SLM's and the row is cut back to just after it (both caches forget the rest). This is
  speculative decoding whose checks the router restricts to the positions it routes.
- **immediate**: a routed row waits for the LLM, which runs in the same step (one pass whenever
  some row routes).
- **wait**: routed rows wait while the others go on, until `wait_fraction` of the rows wait or a
  row has waited `max_wait` steps.

Where the LLM has already read a row to its end, its next token is known: a routed position there
is decided at once, with no pass and nothing provisional.

Greedy output does not depend on the schedule, the batch or the slots: it is exactly that of
`reference_decode`. Requests join free slots between steps and leave when they end (continuous
batching); rows are kept dense in slots [0, n) so that a step's shape is the number of live rows.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from pipeline import CiterError
from pipeline.decoding.policies import Policy, check_threshold
from pipeline.decoding.runner import ModelRunner
from pipeline.decoding.sampling import GREEDY, Sampling, sample
from pipeline.progress import Progress

SCHEDULES = ("draft", "immediate", "wait")


@dataclass(frozen=True)
class Schedule:
    """When the LLM runs (see the module's docstring)."""

    mode: str = "draft"
    verify_every: int = 4
    max_pending: int = 0
    wait_fraction: float = 0.0
    max_wait: int = 0

    def __post_init__(self):
        if self.mode not in SCHEDULES:
            raise CiterError(f"decode.schedule must be one of {', '.join(SCHEDULES)}, got {self.mode!r}")
        for name in ("verify_every", "max_pending", "max_wait"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "verify_every" else 0):
                raise CiterError(f"decode.{name} must be an integer >= {1 if name == 'verify_every' else 0}, "
                                 f"got {value!r}")
        check_threshold(self.wait_fraction, "decode.llm_wait_fraction")

    @property
    def waits(self) -> bool:
        """Whether routed rows wait for the LLM (immediate, wait) rather than drafting on."""
        return self.mode != "draft"

    @classmethod
    def of(cls, decode_config) -> Schedule:
        """The schedule a config's `decode` section sets."""
        d = decode_config
        if d.schedule == "immediate":
            return IMMEDIATE
        return cls(mode=d.schedule, verify_every=d.verify_every, max_pending=d.max_pending,
                   wait_fraction=d.llm_wait_fraction, max_wait=d.llm_max_wait)


IMMEDIATE = Schedule(mode="immediate")
DRAFT = Schedule()


def settings(decode_config) -> dict:
    """The keyword arguments of `decode` that a config's `decode` section sets."""
    return {"schedule": Schedule.of(decode_config), "graphs": decode_config.cuda_graphs}


@dataclass(frozen=True)
class Prefix:
    """Key/value states already computed for a row's first `length` tokens (for example by the
    teacher-forced pass a rollout starts from): per model, one (key, value) pair per layer, each
    (1, heads, >= length, head_dim). The engine copies them in instead of reading the tokens."""

    length: int
    slm: list[tuple[torch.Tensor, torch.Tensor]] | None
    llm: list[tuple[torch.Tensor, torch.Tensor]] | None


@dataclass
class Generation:
    """One decoded row. `tokens` ends with the end-of-sequence token when one was produced;
    `from_llm[i]` says whether the LLM wrote `tokens[i]` (the policy routed it). The counts say
    what each model did for this row: passes it took part in, tokens it read (prompt, catch-up,
    generated and drafted tokens; a reused prefix is not read), rollbacks, and SLM tokens thrown
    away by them."""

    tokens: list[int] = field(default_factory=list)
    from_llm: list[bool] = field(default_factory=list)
    slm_confidence: list[float] = field(default_factory=list)  # SLM top-1 probability per token (nan where none)
    llm_passes: int = 0
    slm_passes: int = 0
    llm_tokens_processed: int = 0
    slm_tokens_processed: int = 0
    rollbacks: int = 0
    discarded_tokens: int = 0

    @property
    def llm_tokens(self) -> int:
        return sum(self.from_llm)


@dataclass
class Decoding:
    """A decode call's rows and what the hardware did for all of them. A pass is one forward of a
    model (one read of its weights) over the batch; `*_positions` counts the positions it
    computed, padding included; `*_tokens_processed` real tokens only."""

    generations: list[Generation]
    llm_passes: int = 0
    slm_passes: int = 0
    llm_positions: int = 0
    slm_positions: int = 0
    reused_prefix_tokens: int = 0
    graph_replays: int = 0

    @property
    def llm_tokens_processed(self) -> int:
        return sum(g.llm_tokens_processed for g in self.generations)

    @property
    def slm_tokens_processed(self) -> int:
        return sum(g.slm_tokens_processed for g in self.generations)

    @property
    def rollbacks(self) -> int:
        return sum(g.rollbacks for g in self.generations)

    @property
    def discarded_tokens(self) -> int:
        return sum(g.discarded_tokens for g in self.generations)

    def counts(self) -> dict[str, int]:
        """The pass and token counts, for eval points and benchmarks."""
        return {"llm_passes": self.llm_passes, "slm_passes": self.slm_passes,
                "llm_tokens_processed": self.llm_tokens_processed, "slm_tokens_processed": self.slm_tokens_processed,
                "llm_positions": self.llm_positions, "slm_positions": self.slm_positions,
                "reused_prefix_tokens": self.reused_prefix_tokens, "rollbacks": self.rollbacks,
                "discarded_tokens": self.discarded_tokens, "graph_replays": self.graph_replays}


def llm_call_ratio(generations: list[Generation]) -> float:
    """LLM-written tokens / all generated tokens, over a set of rows."""
    total = sum(len(g.tokens) for g in generations)
    return sum(g.llm_tokens for g in generations) / total if total else 0.0


@dataclass
class Request:
    """One row to decode: its prompt, policy, limit and sampling; `index` numbers it for the
    policy's draws; `prefix`, states already computed for the start of its prompt."""

    prompt: list[int]
    policy: Policy
    max_new_tokens: int
    index: int = 0
    sampling: Sampling = GREEDY
    prefix: Prefix | None = None


@dataclass
class Update:
    """What a step settled for one request: tokens that became final (never to be rolled back),
    and whether the request has ended."""

    request: Request
    tokens: list[int]
    finished: bool


@dataclass
class _Row:
    request: Request
    seq: list[int]  # prompt + generated tokens, provisional ones included
    gen: Generation = field(default_factory=Generation)
    slm_len: int = 0  # tokens the SLM's cache holds (it has read seq[:slm_len])
    llm_len: int = 0
    llm_next: int | None = None  # the LLM's token for position llm_len, once it has read seq to its end
    pending: list[int] = field(default_factory=list)  # positions of provisional routed tokens
    waiting_since: int | None = None  # the step at which the row began waiting for the LLM's token
    wait_confidence: float = float("nan")
    final: int = 0  # generated tokens already reported final

    @property
    def n_prompt(self) -> int:
        return len(self.request.prompt)

    @property
    def caught_up(self) -> bool:
        return self.llm_len == len(self.seq) and self.llm_next is not None


class Engine:
    """Both models' runners and the rows in their slots. `admit` requests into free slots, call
    `step` until `active` is empty; each step returns what it settled."""

    def __init__(self, slm: PreTrainedModel | None, llm: PreTrainedModel | None, *, eos_ids: Collection[int],
                 pad_id: int, n_ids: int | None, n_slots: int, capacity: int, schedule: Schedule = DRAFT,
                 router=None, graphs: bool = True, reuse: bool = False):
        """`reuse`: take the models' runners (caches, CUDA graphs) from earlier engines of the same
        settings, for an engine that is the only one alive (`decode`'s)."""
        self.eos_ids = _as_set(eos_ids)
        self.schedule, self.n_slots = schedule, n_slots
        kw = dict(n_slots=n_slots, capacity=capacity, n_ids=n_ids, pad_id=pad_id, graphs=graphs)
        make = ModelRunner.shared if reuse else ModelRunner
        self.slm = make(slm, router=router, summarize=True, **kw) if slm is not None else None
        self.llm = make(llm, router=None, summarize=False, **kw) if llm is not None else None
        self.counted = {name: (r.passes, r.positions, r.replays) for name, r in (("slm", self.slm), ("llm", self.llm))
                        if r is not None}  # the runners' counts before this engine
        if router is not None and self.slm is not None:
            router.to(self.slm.device)
        self.router = router
        self.rows: list[_Row] = []
        self.steps = self.steps_since_pass = 0

    @property
    def free_slots(self) -> int:
        return self.n_slots - len(self.rows)

    @property
    def active(self) -> list[Request]:
        return [r.request for r in self.rows]

    # -----------------------------------------------------------------------------------------
    # Admission and departure

    def admit(self, requests: list[Request]) -> None:
        """Give each request a free slot; each model reads the prompt (all but its last token,
        which the first step reads), or takes its prefix's states."""
        if len(requests) > self.free_slots:
            raise CiterError(f"{len(requests)} requests for {self.free_slots} free slots")
        prefills: dict[str, list[tuple[int, list[int], int]]] = {"slm": [], "llm": []}
        for request in requests:
            self._check(request)
            row, slot = _Row(request, list(request.prompt)), len(self.rows)
            self.rows.append(row)
            for name, runner, used in (("slm", self.slm, request.policy.uses_slm),
                                       ("llm", self.llm, request.policy.uses_llm)):
                if not used:
                    continue
                length, states = 0, getattr(request.prefix, name, None) if request.prefix else None
                if states:
                    length = request.prefix.length
                    runner.cache.load_prefix(slot, states, length)
                setattr(row, f"{name}_len", length)
                if len(row.seq) - 1 > length:
                    prefills[name].append((slot, row.seq[length:-1], length))
                    setattr(row, f"{name}_len", len(row.seq) - 1)
        for name, runner in (("slm", self.slm), ("llm", self.llm)):
            if prefills[name]:
                runner.prefill(*(list(column) for column in zip(*prefills[name], strict=True)))
                for slot, chunk, _ in prefills[name]:
                    gen = self.rows[slot].gen
                    setattr(gen, f"{name}_passes", getattr(gen, f"{name}_passes") + 1)
                    setattr(gen, f"{name}_tokens_processed", getattr(gen, f"{name}_tokens_processed") + len(chunk))

    def _check(self, request: Request) -> None:
        policy = request.policy
        if not request.prompt:
            raise CiterError(f"cannot decode an empty prompt (0 tokens) at row {request.index}")
        if policy.uses_slm and self.slm is None or policy.uses_llm and self.llm is None:
            raise CiterError(f"the {policy.name} policy needs both models")
        if policy.router is not None and policy.router is not self.router:
            raise CiterError(f"the {policy.name} policy's router is not the one this engine runs")
        room = (self.slm or self.llm).capacity
        if len(request.prompt) + request.max_new_tokens > room:
            raise CiterError(f"row {request.index}: {len(request.prompt)} prompt tokens + {request.max_new_tokens} new "
                             f"tokens do not fit the engine's {room} tokens a row")

    def cancel(self, request: Request) -> None:
        """Drop a request now (its client went away); its slot is free for the next admit."""
        self._leave([i for i, r in enumerate(self.rows) if r.request is request])

    def _leave(self, slots: list[int]) -> None:
        """Free `slots`, moving the last rows into them so that the live rows stay in [0, n)."""
        for slot in sorted(slots, reverse=True):
            last = len(self.rows) - 1
            if slot != last:
                moved = self.rows[last]
                for runner in (self.slm, self.llm):
                    if runner is not None:
                        runner.cache.move_row(last, slot, len(moved.seq))
                self.rows[slot] = moved
            self.rows.pop()

    # -----------------------------------------------------------------------------------------
    # One step

    @torch.no_grad()
    def step(self) -> list[Update]:
        """One SLM step for the rows that can go on, then an LLM pass if the schedule says so;
        return what became final, and which requests ended (they have left their slots)."""
        self.steps += 1
        going = [i for i, r in enumerate(self.rows) if r.request.policy.uses_slm and self._can_go(r)]
        if going:
            self._slm_step(going)
        for row in self.rows:
            if not row.request.policy.uses_slm and not self._ended(row) and row.waiting_since is None:
                row.waiting_since = self.steps  # the LLM alone: every token comes from a pass
        if self.llm is not None and self._pass_now(bool(going)):
            self._llm_pass()
            self.steps_since_pass = 0
        else:
            self.steps_since_pass += 1
        return self._settle()

    def _can_go(self, row: _Row) -> bool:
        return row.waiting_since is None and not self._ended(row)

    def _ended(self, row: _Row) -> bool:
        tokens = row.gen.tokens
        return bool(tokens) and (tokens[-1] in self.eos_ids or len(tokens) >= row.request.max_new_tokens)

    def _slm_step(self, going: list[int]) -> None:
        ids = [[r.seq[-1]] if i in going else [] for i, r in enumerate(self.rows)]
        out = self.slm.step(ids, [[len(r.seq) - 1] if i in going else [] for i, r in enumerate(self.rows)])
        for i in going:
            row = self.rows[i]
            row.slm_len = len(row.seq)
            row.gen.slm_passes += 1
            row.gen.slm_tokens_processed += 1
            token = out.tokens[i][0]
            if not row.request.sampling.greedy:
                token = sample(out.logits[i, 0], row.request.sampling, len(row.seq))
            confidence = out.confidence[i]
            if not row.request.policy.route(out.prob[i], confidence, row.request.index, len(row.gen.tokens)):
                self._append(row, token, False, confidence)
            elif row.caught_up:
                self._append(row, row.llm_next, True, confidence)
            elif self.schedule.waits:
                row.waiting_since, row.wait_confidence = self.steps, confidence
            else:
                row.pending.append(len(row.seq))
                self._append(row, token, True, confidence)

    def _append(self, row: _Row, token: int, from_llm: bool, confidence: float) -> None:
        row.seq.append(token)
        row.gen.tokens.append(token)
        row.gen.from_llm.append(from_llm)
        row.gen.slm_confidence.append(confidence)
        row.waiting_since, row.llm_next = None, None

    def _pass_now(self, slm_went: bool) -> bool:
        """Whether the LLM runs this step."""
        waiting = [r for r in self.rows if r.waiting_since is not None]
        pending = [r for r in self.rows if r.pending]
        if not waiting and not pending:
            return False
        if not any(self._can_go(r) and r.request.policy.uses_slm for r in self.rows):
            return True  # no row can go on without it
        if waiting and (self.schedule.mode != "wait" or any(not r.request.policy.uses_slm for r in waiting)):
            return True
        s = self.schedule
        if s.mode == "wait":
            longest = max(self.steps - r.waiting_since for r in waiting)
            live = sum(not self._ended(r) for r in self.rows)
            return len(waiting) >= max(1, math.ceil(s.wait_fraction * live)) or longest >= s.max_wait
        return (self.steps_since_pass + 1 >= s.verify_every
                or bool(s.max_pending) and max(len(r.pending) for r in pending) >= s.max_pending)

    def _llm_pass(self) -> None:
        """One LLM pass: rows that need it (waiting, or with pending positions) read all they have
        not read; the others read as many tokens, at most, so that no row pads the pass much."""
        needs = [bool(r.pending) or r.waiting_since is not None for r in self.rows]
        width = max(len(r.seq) - r.llm_len for r, n in zip(self.rows, needs, strict=True) if n)
        spans = [(r.llm_len, r.llm_len if not r.request.policy.uses_llm else len(r.seq) if n
                  else min(len(r.seq), r.llm_len + width)) for r, n in zip(self.rows, needs, strict=True)]
        out = self.llm.step([r.seq[a:b] for r, (a, b) in zip(self.rows, spans, strict=True)],
                            [list(range(a, b)) for a, b in spans])
        for i, (row, (a, b)) in enumerate(zip(self.rows, spans, strict=True)):
            if b == a:
                continue
            row.gen.llm_passes += 1
            row.gen.llm_tokens_processed += b - a
            predicted = {}
            for j, position in enumerate(range(a, b)):
                token = out.tokens[i][j]
                if not row.request.sampling.greedy:
                    token = sample(out.logits[i, j], row.request.sampling, position + 1)
                predicted[position + 1] = token
            self._verify(row, b, predicted)

    def _verify(self, row: _Row, read_to: int, predicted: dict[int, int]) -> None:
        """Check the row's pending positions the pass predicted; cut the row back at the first the
        LLM disagrees with; give a waiting row the LLM's token."""
        for position in [p for p in row.pending if p in predicted]:
            if predicted[position] != row.seq[position]:
                self._roll_back(row, position, predicted[position])
                return
            row.pending.remove(position)
        row.llm_len = read_to
        row.llm_next = predicted.get(len(row.seq)) if read_to == len(row.seq) else None
        if row.waiting_since is not None and row.caught_up:
            self._append(row, row.llm_next, True, row.wait_confidence)

    def _roll_back(self, row: _Row, position: int, token: int) -> None:
        """Replace the provisional token at `position` with the LLM's and forget everything after it."""
        keep = position - row.n_prompt
        row.gen.discarded_tokens += len(row.seq) - position
        row.gen.rollbacks += 1
        row.seq = row.seq[:position] + [token]
        row.gen.tokens = row.gen.tokens[:keep] + [token]
        row.gen.from_llm = row.gen.from_llm[: keep + 1]
        row.gen.slm_confidence = row.gen.slm_confidence[: keep + 1]
        row.pending, row.llm_next = [], None
        row.llm_len, row.slm_len = position, min(row.slm_len, position)

    def _settle(self) -> list[Update]:
        """What became final this step; rows that ended leave their slots."""
        updates, gone = [], []
        for slot, row in enumerate(self.rows):
            final = (row.pending[0] - row.n_prompt) if row.pending else len(row.gen.tokens)
            finished = not row.pending and row.waiting_since is None and self._ended(row)
            if final > row.final or finished:
                updates.append(Update(row.request, row.gen.tokens[row.final:final], finished))
                row.final = final
            if finished:
                gone.append(slot)
        self._leave(gone)
        return updates

    def generation(self, request: Request) -> Generation | None:
        """The live row of `request` (its tokens so far), or None when it is not in a slot."""
        return next((r.gen for r in self.rows if r.request is request), None)


def _as_set(eos_ids: Collection[int] | int) -> frozenset[int]:
    ids = frozenset([eos_ids] if isinstance(eos_ids, int) else eos_ids)
    if not ids:
        raise CiterError("no end-of-sequence id given: a generation could only stop at max_new_tokens")
    return ids


def check_prompts(prompts: list[list[int]]) -> None:
    if not prompts:
        raise CiterError("no prompts to decode: the prompt list is empty")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise CiterError(f"cannot decode an empty prompt (0 tokens) at row {empty[0]}")


@torch.no_grad()
def decode(slm: PreTrainedModel | None, llm: PreTrainedModel | None, prompts: list[list[int]], policy: Policy, *,
           eos_ids: Collection[int], pad_id: int, max_new_tokens: int, n_ids: int | None = None, batch_size: int = 64,
           schedule: Schedule = DRAFT, prefixes: list[Prefix | None] | None = None, desc: str | None = None,
           graphs: bool = True) -> Decoding:
    """Decode `prompts` under `policy`, `batch_size` rows at a time: a row that ends (at any of
    `eos_ids`, or after `max_new_tokens`) hands its slot to the next prompt. Tokens are chosen among
    the first `n_ids` ids (the tokenizer's; None = every logit). `prefixes[i]`, when given, holds
    states already computed for the start of prompt i."""
    check_prompts(prompts)
    if policy.uses_slm and slm is None or policy.uses_llm and llm is None:
        raise CiterError(f"the {policy.name} policy needs both models")
    if prefixes is not None and len(prefixes) != len(prompts):
        raise CiterError(f"{len(prefixes)} prefixes given for {len(prompts)} prompts")
    engine = Engine(slm if policy.uses_slm else None, llm if policy.uses_llm else None, eos_ids=eos_ids,
                    pad_id=pad_id, n_ids=n_ids, n_slots=min(batch_size, len(prompts)),
                    capacity=max(map(len, prompts)) + max_new_tokens, schedule=schedule, router=policy.router,
                    graphs=graphs, reuse=True)
    requests = [Request(p, policy, max_new_tokens, index=i, prefix=prefixes[i] if prefixes else None)
                for i, p in enumerate(prompts)]
    queue = sorted(requests, key=lambda r: len(r.prompt), reverse=True)  # pop() takes the shortest
    out = Decoding([Generation() for _ in prompts])
    with Progress(len(prompts), desc, unit="row", leave=False) as bar:
        while queue or engine.rows:
            if queue and engine.free_slots:
                admitted = [queue.pop() for _ in range(min(engine.free_slots, len(queue)))]
                engine.admit(admitted)
                for request in admitted:
                    out.generations[request.index] = engine.generation(request)
                    out.reused_prefix_tokens += request.prefix.length if request.prefix else 0
            bar.update(sum(u.finished for u in engine.step()))
    for name, runner in (("slm", engine.slm), ("llm", engine.llm)):
        if runner is not None:
            passes, positions, replays = engine.counted[name]
            setattr(out, f"{name}_passes", runner.passes - passes)
            setattr(out, f"{name}_positions", runner.positions - positions)
            out.graph_replays += runner.replays - replays
    return out
