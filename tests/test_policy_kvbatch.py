"""KVBatch: slots joining, leaving and compacting keep every sequence's keys, values and validity."""

from __future__ import annotations

import random

import torch

from turnwise.policy.kvbatch import KVBatch


def _batch(rng: random.Random, rows: int, layers: int = 2) -> tuple[KVBatch, list[list[torch.Tensor]]]:
    """A newcomer batch of right-aligned sequences of random lengths; each row's valid keys per layer."""
    lengths = [rng.randint(1, 40) for _ in range(rows)]  # some longer than the left room: the buffers grow
    width = max(lengths)
    valid = torch.zeros((rows, width), dtype=torch.bool)
    kv, expect = [], [[] for _ in range(rows)]
    for _ in range(layers):
        k = torch.randn(rows, 2, width, 3)
        kv.append((k, k + 100))
        for r, n in enumerate(lengths):
            expect[r].append(k[r, :, width - n:])
    for r, n in enumerate(lengths):
        valid[r, width - n:] = True
    return KVBatch(kv, valid, headroom=2), expect


def test_insert_release_step_compact_keep_each_sequence() -> None:
    rng = random.Random(0)
    main, expect = _batch(rng, 3)
    content = {i: e for i, e in enumerate(expect)}  # slot -> per-layer keys of its valid columns
    for round_ in range(60):
        if rng.random() < 0.5 and content:  # a decode step: every slot gets one new column
            mask = main.step_mask(torch.ones((main.rows, 1), dtype=torch.bool), torch.float32)
            assert mask.shape == (main.rows, 1, 1, main.length + 1)
            cache = main.cache()
            new = [torch.randn(main.rows, 2, 1, 3) for _ in main.layers]
            for i, layer in enumerate(cache.layers):
                keys, values = layer.update(new[i], new[i] + 100)
                assert keys.shape[2] == values.shape[2] == main.length + 1
            main.advance()
            for slot in content:
                content[slot] = [torch.cat([c, new[i][slot]], dim=1) for i, c in enumerate(content[slot])]
        elif rng.random() < 0.5 and len(content) > 1:
            slot = rng.choice(sorted(content))
            main.release(slot)
            del content[slot]
        else:
            other, other_expect = _batch(rng, rng.randint(1, 3))
            rows = sorted(rng.sample(range(len(other_expect)), rng.randint(1, len(other_expect))))
            for slot, row in zip(main.insert(other, rows), rows, strict=True):
                assert slot not in content
                content[slot] = other_expect[row]
        if round_ % 7 == 6:
            slots = sorted(content)
            main = main.compact(slots)
            content = {i: content[s] for i, s in enumerate(slots)}
        for slot, layers in content.items():
            got = main.row_kv(slot)
            for (k, v), want in zip(got, layers, strict=True):
                assert torch.equal(k[0], want) and torch.equal(v[0], want + 100), f"slot {slot} round {round_}"
        for slot in set(range(main.rows)) - set(content):
            assert not main.valid_B_L[slot].any()


def test_wants_compaction_when_half_the_slots_are_free() -> None:
    k = torch.randn(4, 2, 5, 3)
    main = KVBatch([(k, k)], torch.ones((4, 5), dtype=torch.bool))  # no padding columns
    main.release(0)
    assert not main.wants_compaction()
    main.release(1)
    assert main.wants_compaction()


def test_wants_compaction_when_half_the_columns_are_padding() -> None:
    k = torch.randn(3, 2, 6, 3)
    valid = torch.ones((3, 6), dtype=torch.bool)
    valid[1:, :3] = False
    main = KVBatch([(k, k)], valid)
    assert not main.wants_compaction()
    main.release(0)  # one slot of three free; the others hold only the last 3 of 6 columns
    assert main.wants_compaction()
