"""Mixing several shard sets by weight with exact per-epoch counts (``docs/mixing.md``).

Each epoch, source ``s`` contributes exactly ``targets[s]`` samples. They are chosen by
shard from its manifest counts: whole passes over a source that is smaller than its target
(cycled, each pass in a new shard order), then shards in a seeded order until the
remainder is reached, the last of them cut to the sample (at a seeded offset). Every
source's chosen samples are split across ranks and then across dataloader workers with
exact integer counts (:func:`split_counts`), so each rank and each worker sees the same
proportions, and each worker's slices are interleaved source by source in rounds of about
one shuffle window, so that the shuffle buffer mixes sources within batches.

Everything here is a pure function of ``(seed, epoch, rank, worker)``: no global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.loading.planning import PlanLayout, Slice, WorkerPlan, epoch_rng, take_range, worker_sample_counts

CHOICE_STREAM = 2  # epoch_rng stream ids: 0 slice order, 1 shuffle windows (see planning.py)


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` by largest remainder (Hamilton's method):
    each share is the floor or the ceiling of its exact quota and the shares sum to ``total``.
    Ties go to the earlier weight."""
    weight_sum = math.fsum(weights)
    if total < 0 or not weights or weight_sum <= 0 or any(w < 0 for w in weights):
        raise ConfigError(f"cannot apportion {total} samples by weights {list(weights)}: expected "
                            "a total >= 0 and weights >= 0 with a positive sum")
    quotas = [total * w / weight_sum for w in weights]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[:total - sum(shares)]:
        shares[i] += 1
    return shares


def split_counts(rows: Sequence[int], columns: Sequence[int]) -> list[list[int]]:
    """An integer matrix whose rows sum to ``rows`` and columns to ``columns`` (equal totals),
    each cell within a few samples of its proportional share ``rows[i] * columns[j] / total``:
    floors first, then the leftovers by the north-west corner rule."""
    total = sum(rows)
    if total != sum(columns) or min([*rows, *columns], default=0) < 0:
        raise ConfigError(f"split_counts: rows {list(rows)} and columns {list(columns)} must be >= 0 "
                            "with equal sums")
    cells = [[rows[i] * columns[j] // total if total else 0 for j in range(len(columns))] for i in range(len(rows))]
    row_left = [rows[i] - sum(cells[i]) for i in range(len(rows))]
    col_left = [columns[j] - sum(cells[i][j] for i in range(len(rows))) for j in range(len(columns))]
    i = j = 0
    while i < len(rows) and j < len(columns):
        take = min(row_left[i], col_left[j])
        cells[i][j] += take
        row_left[i] -= take
        col_left[j] -= take
        if row_left[i] == 0:
            i += 1
        else:
            j += 1
    return cells


def choose_samples(shards: Sequence[Slice], target: int, rng: np.random.Generator | None) -> list[Slice]:
    """``target`` samples of one source as slices: whole passes over its shards (in a new
    order each pass), then shards in a fresh order until the rest is reached, the last one
    cut at a random offset. With ``rng`` None (no shuffle): source order, cut at the start."""
    shards = [s for s in shards if len(s)]
    size = sum(len(s) for s in shards)
    if target and not size:
        raise ConfigError(f"cannot draw {target} samples from a source with no samples")
    chosen: list[Slice] = []
    passes, rest = divmod(target, size) if size else (0, 0)

    def order() -> list[Slice]:
        return list(shards) if rng is None else [shards[int(i)] for i in rng.permutation(len(shards))]

    for _ in range(passes):
        chosen.extend(order())
    for shard in order() if rest else ():
        if len(shard) <= rest:
            chosen.append(shard)
            rest -= len(shard)
        else:
            offset = 0 if rng is None else int(rng.integers(0, len(shard) - rest + 1))
            chosen.append(Slice(shard.url, shard.start + offset, shard.start + offset + rest, shard.source))
            rest = 0
        if not rest:
            break
    return chosen


def interleave(per_source: Sequence[Sequence[Slice]], round_size: int) -> list[list[Slice]]:
    """Rounds of about ``round_size`` samples in which every source has its share; each
    round is one shuffle window, so every window mixes every source."""
    counts = [sum(len(s) for s in slices) for slices in per_source]
    rounds = max(1, math.ceil(sum(counts) / max(1, round_size)))
    out: list[list[Slice]] = []
    for r in range(rounds):
        pieces: list[Slice] = []
        for slices, count in zip(per_source, counts, strict=True):
            begin, end = count * r // rounds, count * (r + 1) // rounds
            if end > begin:
                pieces.extend(take_range(slices, begin, end))
        if pieces:
            out.append(pieces)
    return out


@dataclass(frozen=True)
class MixPlan:
    """The epoch planner of a mix (picklable): each source's shards (``Slice.source`` = its
    position), its samples per epoch (``targets``) and its name."""

    sources: tuple[tuple[Slice, ...], ...]
    targets: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def epoch_samples(self) -> int:
        return sum(self.targets)

    def state(self) -> dict[str, Any]:
        return {"mix_sources": list(self.names), "mix_targets": list(self.targets)}

    def plan(self, epoch: int, layout: PlanLayout) -> list[WorkerPlan]:
        """Per-worker plans of ``layout.rank`` for ``epoch``; the targets must divide evenly by rank."""
        seed, world_size, rank = layout.seed, layout.world_size, layout.rank
        if self.epoch_samples % world_size:
            raise ConfigError(f"a mixed epoch of {self.epoch_samples} samples does not split evenly "
                              f"across {world_size} ranks")
        chosen = [choose_samples(shards, target, epoch_rng(seed, epoch, CHOICE_STREAM, k) if layout.shuffle else None)
                  for k, (shards, target) in enumerate(zip(self.sources, self.targets, strict=True))]
        per_rank = self.epoch_samples // world_size
        by_rank = split_counts(self.targets, [per_rank] * world_size)
        mine = [take_range(c, sum(row[:rank]), sum(row[:rank + 1])) if row[rank] else []
                for c, row in zip(chosen, by_rank, strict=True)]
        worker_counts = worker_sample_counts(per_rank, layout.batch_size, max(1, layout.num_workers), layout.group)
        by_worker = split_counts([row[rank] for row in by_rank], worker_counts)
        plans = []
        for w, count in enumerate(worker_counts):
            pieces = [take_range(m, sum(row[:w]), sum(row[:w + 1])) if row[w] else []
                      for m, row in zip(mine, by_worker, strict=True)]
            rounds = interleave(pieces, layout.shuffle_buffer)
            plans.append(WorkerPlan(slices=tuple(s for r in rounds for s in r), num_samples=count,
                                    num_batches=math.ceil(count / layout.batch_size),
                                    window_seed=(seed, epoch, 1, rank, w), windows=tuple(len(r) for r in rounds)))
        return plans
