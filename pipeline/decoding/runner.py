"""One model's forward passes over the engine's slots: prefills, and fixed-shape steps that a GPU
replays as CUDA graphs.

A step reads `w` new tokens for each of the rows [0, b) (rows with fewer pad with the cache's
scratch column) and returns each position's greedy token; for the SLM also its confidence (top-1
probability) and the router's probability, computed on the device in the same call. On a CUDA
device a step's shape is rounded up to a bucket (rows, new tokens, attended columns) and its
kernels captured once per bucket into a CUDA graph, then replayed: one launch instead of one per
kernel, which is what an eager step of a small model costs on a GPU. Elsewhere (a CPU, an LLM
spread over several devices, a width beyond the largest bucket) the same code runs eagerly on the
exact shape. Prefills (a new row's prompt) always run eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from pipeline import CiterError
from pipeline.decoding.cache import SlotCache
from pipeline.router import Router

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
WIDTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_KV_BUCKET = 64


def bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding `value`, or None past the largest."""
    return next((b for b in buckets if b >= value), None)


@dataclass
class StepOutput:
    """What one step gives the host: greedy tokens (b x w), and for an SLM step (w = 1) its
    confidence and the router's probability per row (nan without a router). `logits` stays on the
    device (b x w x ids) and is valid until the model's next step."""

    tokens: list[list[int]]
    confidence: list[float] | None
    prob: list[float] | None
    logits: torch.Tensor


class ModelRunner:
    """Forward passes of `model` over a `SlotCache` of `n_slots` rows of up to `capacity` tokens."""

    @classmethod
    def shared(cls, model: PreTrainedModel, **kw) -> ModelRunner:
        """A runner of `model` with these settings kept between calls (its cache and CUDA graphs
        are made once, not once per `decode`): for one caller at a time. The last few are kept."""
        kw["capacity"] = -(-kw["capacity"] // 64) * 64  # calls of similar sizes share one
        key = tuple(sorted((k, id(v) if isinstance(v, torch.nn.Module) else v) for k, v in kw.items()))
        runners = model.__dict__.setdefault("_citer_runners", {})  # freed with the model
        if key not in runners:
            while len(runners) >= 4:
                runners.pop(next(iter(runners)))
            runners[key] = cls(model, **kw)
        runners[key] = runners.pop(key)  # the most recently used last
        return runners[key]

    def __init__(self, model: PreTrainedModel, *, n_slots: int, capacity: int, n_ids: int | None, pad_id: int,
                 router: Router | None = None, summarize: bool = False, graphs: bool = False):
        window = getattr(model.config, "sliding_window", None)
        if window and getattr(model.config, "use_sliding_window", True) and capacity > window:
            raise CiterError(f"{model.config.name_or_path}: sliding-window attention ({window} tokens) is not "
                             f"supported by citer's decoder for rows of up to {capacity} tokens")
        self.model, self.n_ids, self.pad_id = model, n_ids, pad_id
        self.base, self.head = model.base_model, model.get_output_embeddings()
        self.router, self.summarize = router, summarize
        self.device = model.device
        spread = len({str(d) for d in getattr(model, "hf_device_map", {}).values()}) > 1
        self.graphs = graphs and self.device.type == "cuda" and not spread
        rows = (bucket(n_slots, BATCH_BUCKETS) or n_slots) if self.graphs else n_slots  # room for padded rows
        self.cache = SlotCache(model.config.num_hidden_layers, rows, capacity)
        self.columns = torch.arange(capacity + 1, device=self.device)
        self._graphs: dict[tuple[int, int, int], tuple] = {}
        self._pool = None
        self.passes = self.positions = self.replays = 0

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    # -----------------------------------------------------------------------------------------
    # Prefill

    @torch.no_grad()
    def prefill(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> None:
        """Read each chunk into its slot at positions start, start + 1, ... (after the states the
        row holds already, a reused prefix). One eager pass over these rows alone, through a cache
        of their size; no logits are computed."""
        n, width = len(slots), max(map(len, chunks))
        room = max(s + len(c) for s, c in zip(starts, chunks, strict=True))
        scratch = SlotCache(len(self.cache.layers), n, room)
        if max(starts):
            scratch.copy_rows(self.cache, list(zip(slots, range(n), strict=True)), max(starts))
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        pos = torch.full((n, width), room, dtype=torch.long)
        for i, (chunk, start) in enumerate(zip(chunks, starts, strict=True)):
            ids[i, : len(chunk)] = torch.tensor(chunk)
            pos[i, : len(chunk)] = torch.arange(start, start + len(chunk))
        pos = pos.to(self.device)
        scratch.plan(pos, room)
        mask = self.columns[None, None, None, :room] <= pos[:, None, :, None]
        self.base(input_ids=ids.to(self.device), position_ids=pos, attention_mask=mask, cache=scratch, use_cache=True)
        self.cache.copy_rows(scratch, list(zip(range(n), slots, strict=True)), room)
        self.passes += 1
        self.positions += n * width

    # -----------------------------------------------------------------------------------------
    # Steps

    @torch.no_grad()
    def step(self, ids: list[list[int]], positions: list[list[int]]) -> StepOutput:
        """Read row i's tokens `ids[i]` at `positions[i]` for the rows [0, len(ids)); rows may read
        different numbers of tokens (0 included: a row with nothing to read computes padding)."""
        b, w = len(ids), max(1, max(map(len, ids)))
        kv = 1 + max((row[-1] for row in positions if row), default=0)
        shape = self._graph_shape(b, w, kv) if self.graphs else None
        rows, width = shape[:2] if shape else (b, w)
        ids_np = np.full((rows, width), self.pad_id, dtype=np.int64)
        pos_np = np.full((rows, width), self.cache.scratch, dtype=np.int64)
        for i, (row_ids, row_pos) in enumerate(zip(ids, positions, strict=True)):
            ids_np[i, : len(row_ids)] = row_ids
            pos_np[i, : len(row_pos)] = row_pos
        ids_t, pos_t = torch.from_numpy(ids_np), torch.from_numpy(pos_np)
        if shape is None:
            out = self._run(ids_t.to(self.device), pos_t.to(self.device), kv)
        else:
            out = self._replay(shape, ids_t, pos_t)
        self.passes += 1
        self.positions += b * w
        return self._to_host(out, b, w)

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, kv_len: int) -> dict[str, torch.Tensor]:
        """The step itself, on device tensors: forward, greedy tokens, and the SLM's summary."""
        mask = self.columns[None, None, None, :kv_len] <= pos[:, None, :, None]
        self.cache.plan(pos, kv_len)
        hidden = self.base(input_ids=ids, position_ids=pos, attention_mask=mask, cache=self.cache,
                           use_cache=True).last_hidden_state
        logits = self.head(hidden)[..., : self.n_ids]
        out = {"tokens": logits.argmax(-1), "logits": logits}
        if self.summarize:  # token, confidence and router probability, packed for one copy to the host
            confidence = torch.softmax(logits[:, -1].float(), dim=-1).max(dim=-1).values
            prob = (self.router.step_prob(hidden[:, -1], logits[:, -1], out["tokens"][:, -1],
                                          self.model.get_input_embeddings())
                    if self.router is not None else torch.full_like(confidence, float("nan")))
            out["summary"] = torch.stack([out["tokens"][:, -1].float(), confidence, prob.float()], -1)
        return out

    def _to_host(self, out: dict[str, torch.Tensor], b: int, w: int) -> StepOutput:
        """One device-to-host copy for everything the host reads."""
        if not self.summarize:
            return StepOutput(out["tokens"][:b, :w].cpu().tolist(), None, None, out["logits"][:b, :w])
        host = out["summary"][:b].cpu().tolist()
        return StepOutput([[int(t)] for t, _, _ in host], [c for _, c, _ in host], [p for _, _, p in host],
                          out["logits"][:b, :w])

    # -----------------------------------------------------------------------------------------
    # CUDA graphs

    def _graph_shape(self, b: int, w: int, kv: int) -> tuple[int, int, int] | None:
        rows, width = bucket(b, BATCH_BUCKETS), bucket(w, WIDTH_BUCKETS)
        if rows is None or width is None or rows > self.cache.n_slots:
            return None
        columns = MIN_KV_BUCKET
        while columns < kv:
            columns *= 2
        return rows, width, min(columns, self.capacity + 1)

    def _replay(self, shape: tuple[int, int, int], ids: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        if shape not in self._graphs:
            self._graphs[shape] = self._capture(*shape)
        graph, static_ids, static_pos, out = self._graphs[shape]
        static_ids.copy_(ids, non_blocking=True)
        static_pos.copy_(pos, non_blocking=True)
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, rows: int, width: int, kv: int) -> tuple:
        """Warm a shape up on a side stream, then capture it (inputs: padding at the scratch column,
        so warm-up writes touch no row's states)."""
        static_ids = torch.full((rows, width), self.pad_id, dtype=torch.long, device=self.device)
        static_pos = torch.full((rows, width), self.cache.scratch, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(static_ids, static_pos, kv)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._run(static_ids, static_pos, kv)
        log.debug("captured a CUDA graph for %d rows x %d tokens over %d columns", rows, width, kv)
        return graph, static_ids, static_pos, out
