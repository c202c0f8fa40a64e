"""A static KV cache over the engine's slots, for any Hugging Face causal LM.

Each layer's keys and values are preallocated once: (slots, kv heads, capacity + 1, head dim).
A slot's row keeps its tokens in columns 0..n-1, column = position, so the attention mask of a
query at position p is simply "columns <= p" and there are no holes to track: cutting a row back
(a rollback) is forgetting its length, and the next forward overwrites the stale columns before
any query can see them. The last column is scratch: padded query slots (rows of a fixed-shape step
with less to read) are given its position, write there, and no real query ever attends to it.

A forward writes the new states of the rows [0, b) at the positions the engine `plan`ned, in place
(`scatter_`), and attends over the first `kv_len` columns. Nothing is allocated or concatenated
per step, so the same call can be captured once in a CUDA graph and replayed.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values, allocated on the device and dtype of the first states it gets
    (each layer of a model spread over devices keeps its states on its own device)."""

    is_sliding = False
    is_compileable = True

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.owner.n_slots, key_states.shape[1], self.owner.capacity + 1)
        self.device = key_states.device
        self.keys = key_states.new_zeros(*shape, key_states.shape[3])
        self.values = value_states.new_zeros(*shape, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pos = self.owner.positions_on(self.device)
        b, heads, w, _ = key_states.shape
        keys, values = self.keys[:b], self.values[:b]
        keys.scatter_(2, pos[:, None, :, None].expand(b, heads, w, keys.shape[3]), key_states)
        values.scatter_(2, pos[:, None, :, None].expand(b, heads, w, values.shape[3]), value_states)
        kv = self.owner.kv_len
        return keys[:, :, :kv], values[:, :, :kv]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        raise NotImplementedError("a SlotCache has one length per row: pass position_ids")

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """The static cache of one model over `n_slots` rows of up to `capacity` tokens each."""

    def __init__(self, n_layers: int, n_slots: int, capacity: int):
        self.n_slots, self.capacity = n_slots, capacity
        super().__init__(layers=[SlotLayer(self) for _ in range(n_layers)])
        self.kv_len = capacity + 1
        self._positions: dict[torch.device, torch.Tensor] = {}

    @property
    def scratch(self) -> int:
        """The column padded query slots write to."""
        return self.capacity

    def plan(self, positions: torch.Tensor, kv_len: int) -> None:
        """The next forward writes row i's j-th new token at column `positions[i, j]` and attends
        over the first `kv_len` columns."""
        self._positions = {positions.device: positions}
        self.kv_len = kv_len

    def positions_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._positions:
            self._positions[device] = next(iter(self._positions.values())).to(device)
        return self._positions[device]

    @property
    def allocated(self) -> bool:
        return all(layer.is_initialized for layer in self.layers)

    def copy_rows(self, source: SlotCache, pairs: list[tuple[int, int]], length: int) -> None:
        """Copy the first `length` columns of `source`'s row s into this cache's row d, for each (s, d)."""
        src_index = torch.tensor([s for s, _ in pairs])
        dst_index = torch.tensor([d for _, d in pairs])
        for mine, theirs in zip(self.layers, source.layers, strict=True):
            if not mine.is_initialized:
                mine.lazy_initialization(theirs.keys, theirs.values)
            for name in ("keys", "values"):
                dst, src = getattr(mine, name), getattr(theirs, name)
                dst[dst_index.to(dst.device), :, :length] = src[src_index.to(src.device), :, :length].to(dst.device)

    def load_prefix(self, slot: int, states: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Put states computed elsewhere (per layer (1, heads, >= length, dim)) in columns 0..length-1 of a row."""
        for layer, (k, v) in zip(self.layers, states, strict=True):
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            layer.keys[slot, :, :length] = k[0, :, :length].to(layer.keys.device, layer.keys.dtype)
            layer.values[slot, :, :length] = v[0, :, :length].to(layer.values.device, layer.values.dtype)

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy row `source`'s first `length` columns to row `target` (the engine keeps rows dense)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[target, :, :length] = layer.keys[source, :, :length]
                layer.values[target, :, :length] = layer.values[source, :, :length]
