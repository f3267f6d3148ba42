"""The sampler's KV cache layout: slots in preallocated buffers, rows joining and leaving in place.

Every slot holds one sequence. Its cached keys and values sit in columns of a shared
`[R, H, C, D]` buffer per layer (R slots, C columns, both with spare capacity); `valid_R_C`
marks which columns of a slot hold real tokens. All slots write their next token into the same
column `end`, so sequences are right-aligned and the live region is columns `[start, end)`.
Columns of a slot need not be contiguous: a sequence that joined with a reused prefix and a
shorter suffix than its neighbours has a gap of invalid columns. Attention only ever sees valid
columns because every forward pass gets an explicit additive 4-D mask (built here), and
positions are passed explicitly, so rotary embeddings never depend on the column index.

Joining and leaving copy only what changes: `insert` writes a newcomer batch's rows into free
slots (reusing slots of sequences that left, growing the buffers by doubling when they are
full), `release` frees a slot without touching the buffers, and `compact` copies the live slots
into fresh buffers only when at least half the slots are free or half the live region's
columns are padding, so the copy is amortised over many joins and leaves. A free slot still
runs through the model with a pad token that attends only to itself (no attention row is ever
fully masked, which would produce NaNs with some kernels) until a newcomer takes it.

Why not `DynamicCache` as is: it concatenates on every step (copying the whole cache) and
cannot merge or drop rows of different lengths. `SlotLayer` is the `DynamicLayer` the model's
attention appends to: its `update` writes the new columns in place and returns views.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = tuple[torch.Tensor, torch.Tensor]


class SlotLayer(DynamicLayer):
    """One layer's buffers; the model appends at the batch's `end` column, in place."""

    def __init__(self, batch: KVBatch, keys_R_H_C_D: torch.Tensor, values_R_H_C_D: torch.Tensor) -> None:
        super().__init__()
        self.batch = batch
        self.buffer_k, self.buffer_v = keys_R_H_C_D, values_R_H_C_D
        self.device, self.dtype = keys_R_H_C_D.device, keys_R_H_C_D.dtype
        self.is_initialized = True
        self.written = 0
        """Columns this layer wrote in the current forward pass (past `batch.end`)."""

    @property
    def keys(self) -> torch.Tensor:  # type: ignore[override]
        b = self.batch
        return self.buffer_k[: b.rows, :, b.start: b.end + self.written]

    @keys.setter
    def keys(self, value: torch.Tensor) -> None:  # DynamicLayer.__init__ assigns it
        pass

    @property
    def values(self) -> torch.Tensor:  # type: ignore[override]
        b = self.batch
        return self.buffer_v[: b.rows, :, b.start: b.end + self.written]

    @values.setter
    def values(self, value: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = self.batch, key_states.shape[-2]
        at = b.end + self.written
        self.buffer_k[: b.rows, :, at: at + n] = key_states
        self.buffer_v[: b.rows, :, at: at + n] = value_states
        self.written += n
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.batch.end - self.batch.start + self.written


class KVBatch:
    """Per-layer KV buffers of a batch of slots, and which columns of each slot are real tokens."""

    def __init__(self, kv: Sequence[KV], valid_B_L: torch.Tensor, *, headroom: int = 64, left: int = 0,
                 spare_rows: int = 0) -> None:
        """Copy per-layer `[B, H, L, D]` tensors into buffers with `headroom` spare columns on the
        right, `left` on the left and `spare_rows` spare slots. Spare columns are zeros (masked
        columns must hold finite values: attention multiplies them by 0)."""
        rows, length = valid_B_L.shape
        self.start, self.end, self.rows = left, left + length, rows
        cap_rows, cap_cols = rows + spare_rows, left + length + headroom
        self.valid_R_C = valid_B_L.new_zeros((cap_rows, cap_cols))
        self.valid_R_C[:rows, self.start: self.end] = valid_B_L
        self.layers: list[SlotLayer] = []
        for k, v in kv:
            bk = k.new_zeros((cap_rows, k.shape[1], cap_cols, k.shape[3]))
            bv = v.new_zeros((cap_rows, v.shape[1], cap_cols, v.shape[3]))
            bk[:rows, :, self.start: self.end] = k
            bv[:rows, :, self.start: self.end] = v
            self.layers.append(SlotLayer(self, bk, bv))
        self.free: list[int] = []
        """Slots below `rows` whose sequence left (their columns are all invalid)."""

    @staticmethod
    def from_prefixes(prefixes: Sequence[Sequence[KV] | None], headroom: int) -> KVBatch | None:
        """A batch of per-row prefixes (`[1, H, n_i, D]` per layer, None for none), right-aligned
        and written straight into buffers with `headroom` spare columns; None when no row has one."""
        first = next((p for p in prefixes if p), None)
        if first is None:
            return None
        length = max(p[0][0].shape[2] if p else 0 for p in prefixes)
        batch = KVBatch([], first[0][0].new_zeros((len(prefixes), length), dtype=torch.bool), headroom=headroom)
        cols = batch.valid_R_C.shape[1]
        for k0, v0 in first:
            batch.layers.append(SlotLayer(batch, k0.new_zeros((len(prefixes), k0.shape[1], cols, k0.shape[3])),
                                          v0.new_zeros((len(prefixes), v0.shape[1], cols, v0.shape[3]))))
        for row, prefix in enumerate(prefixes):
            if prefix:
                n = prefix[0][0].shape[2]
                batch.valid_R_C[row, batch.end - n: batch.end] = True
                for layer, (k, v) in zip(batch.layers, prefix, strict=True):
                    layer.buffer_k[row, :, batch.end - n: batch.end] = k[0]
                    layer.buffer_v[row, :, batch.end - n: batch.end] = v[0]
        return batch

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def valid_B_L(self) -> torch.Tensor:
        return self.valid_R_C[: self.rows, self.start: self.end]

    def cache(self) -> DynamicCache:
        """A cache object for one forward pass; the model's appends land in these buffers."""
        cache = DynamicCache()
        cache.layers = list(self.layers)
        return cache

    def step_mask(self, valid_in_B_S: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive `[B, 1, S, L+S]` mask for feeding S new columns to every slot; marks them
        valid. Call `advance()` after the forward pass. A real query attends to valid columns
        up to its own; a padded query only to itself."""
        steps = valid_in_B_S.shape[1]
        self._ensure(0, steps)
        past = self.length
        self.valid_R_C[: self.rows, self.end: self.end + steps] = valid_in_B_S
        valid_all = self.valid_R_C[: self.rows, self.start: self.end + steps]
        if steps == 1:
            allowed = valid_all[:, None, :]
        else:
            cols = torch.arange(past + steps, device=valid_all.device)
            own = torch.arange(steps, device=valid_all.device) + past
            allowed = valid_all[:, None, :] & (cols[None, :] <= own[:, None])[None]
            allowed[:, torch.arange(steps), own] |= ~valid_in_B_S
        mask = torch.zeros(allowed.shape, dtype=dtype, device=valid_all.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def advance(self) -> None:
        """After a forward pass: the columns the layers wrote become part of the live region."""
        written = self.layers[0].written if self.layers else 0
        for layer in self.layers:
            layer.written = 0
        if self.free:  # a free slot's pad query attended to itself; it holds no token
            self.valid_R_C[self.free, self.end: self.end + written] = False
        self.end += written

    def insert(self, other: KVBatch, rows: Sequence[int]) -> list[int]:
        """Copy `rows` of `other` into free slots (right-aligned at `end`); their slots."""
        need = other.length
        self._ensure(max(0, need - self.length), 0, extra_rows=max(0, len(rows) - len(self.free)))
        slots = []
        for row in rows:
            slot = self.free.pop() if self.free else self._append_row()
            lo = self.end - need
            self.valid_R_C[slot] = False
            self.valid_R_C[slot, lo: self.end] = other.valid_B_L[row]
            for mine, theirs in zip(self.layers, other.layers, strict=True):
                mine.buffer_k[slot, :, lo: self.end] = theirs.keys[row]
                mine.buffer_v[slot, :, lo: self.end] = theirs.values[row]
            slots.append(slot)
        self.start = min(self.start, self.end - need)
        return slots

    def release(self, slot: int) -> None:
        """The sequence in `slot` left; the slot is reused by the next `insert`."""
        self.valid_R_C[slot] = False
        self.free.append(slot)

    def wants_compaction(self) -> bool:
        """At least half the slots are free, or half the live region is padding on every slot."""
        if not self.rows:
            return False
        if 2 * len(self.free) >= self.rows and self.rows > 1:
            return True
        used = self.valid_B_L.any(dim=0).nonzero()
        return bool(len(used)) and 2 * int(used[0]) >= self.length

    def compact(self, slots: Sequence[int]) -> KVBatch:
        """A new batch with only `slots` (in that order), leading all-padding columns dropped."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.valid_R_C.device)
        valid = self.valid_B_L.index_select(0, index)
        used = valid.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else valid.shape[1]
        kv = [(layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:])
              for layer in self.layers]
        return KVBatch(kv, valid[:, first:], left=64, spare_rows=len(slots))

    def row_kv(self, slot: int) -> list[KV]:
        """Slot `slot`'s real tokens as contiguous `[1, H, n, D]` tensors per layer."""
        cols = self.valid_B_L[slot].nonzero().squeeze(1)
        if len(cols) and int(cols[-1]) - int(cols[0]) + 1 == len(cols):  # no gap (the usual case): one slice
            lo, hi = self.start + int(cols[0]), self.start + int(cols[-1]) + 1
            return [(layer.buffer_k[slot: slot + 1, :, lo:hi].clone(), layer.buffer_v[slot: slot + 1, :, lo:hi].clone())
                    for layer in self.layers]
        return [(layer.keys[slot: slot + 1, :, cols].clone(), layer.values[slot: slot + 1, :, cols].clone())
                for layer in self.layers]

    def _append_row(self) -> int:
        self.rows += 1
        return self.rows - 1

    def _ensure(self, left: int, right: int, extra_rows: int = 0) -> None:
        """Room for `left` more columns before `start`, `right` after `end`, `extra_rows` slots."""
        cap_rows, cap_cols = self.valid_R_C.shape
        if self.start >= left and self.end + right <= cap_cols and self.rows + extra_rows <= cap_rows:
            return
        length = self.length
        new_left = max(self.start, 2 * left, 16) if self.start < left else self.start
        new_right = max(cap_cols - self.end, 2 * right, length) if self.end + right > cap_cols else cap_cols - self.end
        new_rows = max(cap_rows, 2 * (self.rows + extra_rows)) if self.rows + extra_rows > cap_rows else cap_rows
        start = new_left
        valid = self.valid_R_C.new_zeros((new_rows, new_left + length + new_right))
        valid[: self.rows, start: start + length] = self.valid_B_L
        self.valid_R_C = valid
        for layer in self.layers:
            for name in ("buffer_k", "buffer_v"):
                old = getattr(layer, name)
                new = old.new_zeros((new_rows, old.shape[1], valid.shape[1], old.shape[3]))
                new[: self.rows, :, start: start + length] = old[: self.rows, :, self.start: self.end]
                setattr(layer, name, new)
        self.start, self.end = start, start + length
