"""The sampler's KV cache layout: one padded batch whose rows join and leave between steps.

Every row is one sequence. Its cached keys and values sit in columns of a shared
`[B, H, L, D]` buffer per layer; `valid_B_L` marks which columns hold real tokens. Columns
need not be contiguous: a row that joined with a reused prefix and a shorter suffix than its
neighbours has a gap of invalid columns between the two. Attention only ever sees valid
columns because every forward pass gets an explicit additive 4-D mask (built here), and
positions are passed explicitly, so rotary embeddings never depend on the column index.

Why not `DynamicCache` as is: it concatenates on every step (copying the whole cache) and
cannot merge or drop rows of different lengths. `GrowingLayer` writes into a buffer with
spare capacity, and `KVBatch.concat` / `select` re-pad on the left when rows join or leave.
Padded query rows attend to themselves only, so no attention row is fully masked (which
would produce NaNs with some kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = tuple[torch.Tensor, torch.Tensor]


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends into a buffer with spare capacity (doubling when full)."""

    def __init__(self, keys_B_H_L_D: torch.Tensor, values_B_H_L_D: torch.Tensor, capacity: int) -> None:
        super().__init__()
        batch, heads, length, dim = keys_B_H_L_D.shape
        capacity = max(capacity, length, 1)
        self._k = keys_B_H_L_D.new_empty((batch, heads, capacity, dim))
        self._v = values_B_H_L_D.new_empty((batch, heads, capacity, values_B_H_L_D.shape[-1]))
        self._k[:, :, :length] = keys_B_H_L_D
        self._v[:, :, :length] = values_B_H_L_D
        self.length = length
        self.device = keys_B_H_L_D.device
        self.dtype = keys_B_H_L_D.dtype
        self.is_initialized = True
        self._set_views()

    def _set_views(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self.length + n > self._k.shape[2]:
            capacity = max(2 * self._k.shape[2], self.length + n)
            k = self._k.new_empty((*self._k.shape[:2], capacity, self._k.shape[3]))
            v = self._v.new_empty((*self._v.shape[:2], capacity, self._v.shape[3]))
            k[:, :, : self.length] = self.keys
            v[:, :, : self.length] = self.values
            self._k, self._v = k, v
        self._k[:, :, self.length: self.length + n] = key_states
        self._v[:, :, self.length: self.length + n] = value_states
        self.length += n
        self._set_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


@dataclass
class KVBatch:
    """Per-layer KV buffers of a batch of rows, and which columns of each row are real tokens."""

    layers: list[GrowingLayer]
    valid_B_L: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.valid_B_L.shape[0])

    @property
    def length(self) -> int:
        return int(self.valid_B_L.shape[1])

    @staticmethod
    def from_kv(kv: Sequence[KV], valid_B_L: torch.Tensor, headroom: int = 64) -> KVBatch:
        """Wrap per-layer `[B, H, L, D]` tensors (copied into buffers with `headroom` spare columns)."""
        return KVBatch([GrowingLayer(k, v, k.shape[2] + headroom) for k, v in kv], valid_B_L)

    def cache(self) -> DynamicCache:
        """A cache object for one forward pass; the model's appends land in these buffers."""
        cache = DynamicCache()
        cache.layers = list(self.layers)
        return cache

    def step_mask(self, valid_in_B_S: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive `[B, 1, S, L+S]` mask for feeding S new columns; marks them valid afterwards.

        A real query attends to valid columns up to its own; a padded query only to itself.
        """
        past = self.length
        steps = valid_in_B_S.shape[1]
        valid_all = torch.cat([self.valid_B_L, valid_in_B_S], dim=1)
        if steps == 1:
            allowed = valid_all[:, None, :]
        else:
            cols = torch.arange(past + steps, device=valid_all.device)
            own = torch.arange(steps, device=valid_all.device) + past
            causal_S_C = cols[None, :] <= own[:, None]
            allowed = valid_all[:, None, :] & causal_S_C[None]
            pad_q = ~valid_in_B_S
            allowed[:, torch.arange(steps), own] |= pad_q
        mask = torch.zeros(allowed.shape, dtype=dtype, device=valid_all.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        self.valid_B_L = valid_all
        return mask[:, None]

    def select(self, rows: Sequence[int]) -> KVBatch:
        """A new batch with only `rows` (in that order), leading all-padding columns dropped."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.valid_B_L.device)
        valid = self.valid_B_L.index_select(0, index)
        used = valid.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else valid.shape[1]
        kv = [(layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:])
              for layer in self.layers]
        return KVBatch.from_kv(kv, valid[:, start:])

    @staticmethod
    def concat(a: KVBatch, b: KVBatch) -> KVBatch:
        """Rows of `a` then rows of `b`, the shorter left-padded with invalid columns."""
        length = max(a.length, b.length)
        kv = []
        for la, lb in zip(a.layers, b.layers, strict=True):
            kv.append((torch.cat([_left_pad(la.keys, length), _left_pad(lb.keys, length)]),
                       torch.cat([_left_pad(la.values, length), _left_pad(lb.values, length)])))
        valid = torch.cat([_left_pad_mask(a.valid_B_L, length), _left_pad_mask(b.valid_B_L, length)])
        return KVBatch.from_kv(kv, valid)

    def row_kv(self, row: int) -> list[KV]:
        """Row `row`'s real tokens as contiguous `[1, H, n, D]` tensors per layer."""
        cols = self.valid_B_L[row].nonzero().squeeze(1)
        return [(layer.keys[row: row + 1, :, cols].clone(), layer.values[row: row + 1, :, cols].clone())
                for layer in self.layers]


def right_aligned(prefixes: Sequence[Sequence[KV] | None]) -> tuple[list[KV], torch.Tensor] | None:
    """Stack per-row prefix KV (`[1, H, n_i, D]` per layer, None for no prefix) right-aligned.

    Returns the per-layer `[B, H, max n_i, D]` tensors and the `[B, max n_i]` validity, or None
    when no row has a prefix.
    """
    first = next((p for p in prefixes if p), None)
    if first is None:
        return None
    length = max(p[0][0].shape[2] if p else 0 for p in prefixes)
    valid = torch.zeros((len(prefixes), length), dtype=torch.bool, device=first[0][0].device)
    kv = []
    for layer in range(len(first)):
        k0, v0 = first[layer]
        k = k0.new_zeros((len(prefixes), k0.shape[1], length, k0.shape[3]))
        v = v0.new_zeros((len(prefixes), v0.shape[1], length, v0.shape[3]))
        for row, prefix in enumerate(prefixes):
            if prefix:
                n = prefix[layer][0].shape[2]
                k[row, :, length - n:] = prefix[layer][0][0]
                v[row, :, length - n:] = prefix[layer][1][0]
                valid[row, length - n:] = True
        kv.append((k, v))
    return kv, valid


def _left_pad(x_B_H_L_D: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - x_B_H_L_D.shape[2]
    if missing == 0:
        return x_B_H_L_D
    pad = x_B_H_L_D.new_zeros((*x_B_H_L_D.shape[:2], missing, x_B_H_L_D.shape[3]))
    return torch.cat([pad, x_B_H_L_D], dim=2)


def _left_pad_mask(valid_B_L: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - valid_B_L.shape[1]
    if missing == 0:
        return valid_B_L
    return torch.cat([valid_B_L.new_zeros((valid_B_L.shape[0], missing)), valid_B_L], dim=1)
