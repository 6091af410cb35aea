"""Hand-off buffers between dataloader workers and the main process
(``pipeline.loading.hand_off``): reused once the main process has let go of a batch, never
while it holds one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import make_loader
from pipeline.loading.hand_off import HandOffBuffers, Recycler
from tests.fakes import vimh_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return vimh_shards(tmp_path_factory.mktemp("hand_off"), n_train=256, n_test=8)


def recorded_slots(loader, monkeypatch: pytest.MonkeyPatch) -> list:
    seen = []
    real = Recycler.watch

    def watch(self, buffer, slot):
        seen.append(None if slot is None else tuple(slot))
        real(self, buffer, slot)

    monkeypatch.setattr(Recycler, "watch", watch)
    return seen


def test_batches_the_consumer_keeps_are_never_overwritten(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = make_loader(str(shards), batch_size=8, num_workers=2, seed=1)
    loader.stream.config = type(loader.stream.config)(**{**loader.stream.config.__dict__, "batches_per_hand_off": 1})
    slots = recorded_slots(loader, monkeypatch)
    kept = [(images, labels, images.clone(), {k: v.clone() for k, v in labels.items()}) for images, labels in loader]
    for _ in range(3):  # more epochs through the same buffers while the first epoch's batches are held
        for _images, _labels in loader:
            pass
    for images, labels, images_then, labels_then in kept:
        assert torch.equal(images, images_then)
        assert all(torch.equal(labels[k], labels_then[k]) for k in labels)
    first_epoch = slots[:len(kept)]
    assert len(set(s for s in first_epoch if s is not None)) == 2 * loader.stream.assembler.buffers.slots
    assert first_epoch.count(None) == len(kept) - 2 * loader.stream.assembler.buffers.slots  # fresh when all held


def test_buffers_are_reused_once_the_consumer_lets_go(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = make_loader(str(shards), batch_size=8, num_workers=2, seed=1)
    slots = recorded_slots(loader, monkeypatch)
    reference = [(images.clone(), labels["note_number"].clone()) for images, labels in loader]
    for _ in range(2):
        loader.set_epoch(0)
        again = [(images.clone(), labels["note_number"].clone()) for images, labels in loader]
        assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(again, reference, strict=True))
    used = [s for s in slots if s is not None]
    assert len(used) >= 0.9 * len(slots) and len(set(used)) <= 2 * loader.stream.assembler.buffers.slots


def test_without_workers_batches_are_plain_memory() -> None:
    buffer, slot = HandOffBuffers(0, 3).take(100)
    assert slot is None and buffer.numel() == 100 and not buffer.is_shared()


def test_every_buffer_is_free_after_a_pass_whose_batches_were_let_go(shards: Path) -> None:
    loader = make_loader(str(shards), batch_size=8, num_workers=2, seed=1)
    for _ in range(2):
        for _n in map(len, loader):  # each batch dropped as soon as it is counted
            pass
        assert not loader._recycler.busy.any() and not loader._recycler.pending
    loader.close()
    assert not loader._recycler.kept


def test_torch_storage_use_count_says_when_only_the_kept_reference_is_left() -> None:
    """The recycler keeps each buffer's storage and frees the buffer when that is its only
    reference (a private torch API: this pins what it relies on)."""
    kept = torch.empty(64, dtype=torch.uint8).untyped_storage()
    count = torch._C._storage_Use_Count
    assert count(kept._cdata) == 1
    view = torch.empty(0, dtype=torch.uint8).set_(kept)[8:16].view(torch.int32)
    assert count(kept._cdata) > 1
    del view
    assert count(kept._cdata) == 1
