"""The streaming loader on local shards: exact epochs, determinism, resume, labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import make_loader
from pipeline.errors import PipelineError, ShardFormatError
from shard_tools.convert import convert
from tests.conftest import read_vimh_source

N_TRAIN = 75


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    """75 train samples in uneven shards (16, 16, 16, 16, 11), and the source they came from."""
    from shard_tools.formats.vimh.synthetic import generate_vimh

    root = tmp_path_factory.mktemp("loader")
    src = generate_vimh(root / "vimh-8x6x3_l", n_train=N_TRAIN, n_test=10, height=8, width=6,
                        channels=3, n_heads=3)
    convert("vimh", src, root / "out", max_samples=16)
    return src, root / "out"


def keys_of(loader) -> list[str]:
    return [k for _, _, keys in loader for k in keys]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_is_every_sample_once_with_exact_labels(shards, workers: int) -> None:
    src, out = shards
    source = read_vimh_source(src, "train")
    loader = make_loader(str(out), batch_size=8, num_workers=workers, with_keys=True)
    assert len(loader) == 10 and loader.num_samples == N_TRAIN
    schema = loader.schema
    seen = []
    for images, labels, keys in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 8, 6)
        for row, key in enumerate(keys):
            pixels, qs = source[int(key)]
            assert images[row].numpy().tobytes() == pixels
            for head in schema.heads:
                q = qs[head.source_id]
                assert labels[head.name][row].item() == head.class_of_quantized(q)
                assert labels[f"{head.name}.value"][row].item() == pytest.approx(head.real_value(q), rel=1e-6)
        seen += keys
    assert sorted(seen) == sorted(f"{i:08d}" for i in source)


def test_order_is_seeded_and_changes_every_epoch(shards) -> None:
    _, out = shards
    a = make_loader(str(out), batch_size=8, num_workers=0, seed=3, with_keys=True)
    b = make_loader(str(out), batch_size=8, num_workers=0, seed=3, with_keys=True)
    c = make_loader(str(out), batch_size=8, num_workers=0, seed=4, with_keys=True)
    first, again, other = keys_of(a), keys_of(b), keys_of(c)
    assert first == again and first != other
    second_epoch = keys_of(a)
    assert second_epoch != first and sorted(second_epoch) == sorted(first)
    b.set_epoch(1)
    assert keys_of(b) == second_epoch


def test_no_shuffle_reads_in_shard_order(shards) -> None:
    _, out = shards
    keys = keys_of(make_loader(str(out), batch_size=10, num_workers=0, shuffle=False, with_keys=True))
    manifest_order = [k for _, _, ks in make_loader(str(out), batch_size=75, num_workers=0, shuffle=False,
                                                    with_keys=True) for k in ks]
    assert keys == manifest_order and len(keys) == N_TRAIN


@pytest.mark.parametrize(("uneven", "expected_each"), [("drop", 25), ("pad", 25)])
def test_ranks_get_equal_disjoint_shares(shards, uneven: str, expected_each: int) -> None:
    _, out = shards
    loaders = [make_loader(str(out), batch_size=4, num_workers=2, world_size=3, rank=r, uneven=uneven,
                           with_keys=True) for r in range(3)]
    per_rank = [keys_of(loader) for loader in loaders]
    assert [len(k) for k in per_rank] == [expected_each] * 3
    assert len({len(loader) for loader in loaders}) == 1
    union = [k for keys in per_rank for k in keys]
    assert len(set(union)) == len(union) == N_TRAIN


def test_uneven_totals_drop_or_pad(shards) -> None:
    _, out = shards
    drop = [keys_of(make_loader(str(out), batch_size=5, num_workers=0, world_size=2, rank=r, with_keys=True))
            for r in range(2)]
    assert [len(k) for k in drop] == [37, 37] and len(set(drop[0]) | set(drop[1])) == 74
    pad = [keys_of(make_loader(str(out), batch_size=5, num_workers=0, world_size=2, rank=r, uneven="pad",
                               with_keys=True)) for r in range(2)]
    assert [len(k) for k in pad] == [38, 38] and len(set(pad[0]) | set(pad[1])) == N_TRAIN


def test_drop_last_leaves_out_the_partial_batch(shards) -> None:
    _, out = shards
    loader = make_loader(str(out), batch_size=8, num_workers=2, drop_last=True, with_keys=True)
    sizes = [len(keys) for _, _, keys in loader]
    assert sizes == [8] * 9 and len(loader) == 9


@pytest.mark.parametrize(("workers", "stop_after"), [(0, 3), (2, 1), (2, 4), (2, 9)])
def test_resume_mid_epoch_continues_exactly(shards, workers: int, stop_after: int) -> None:
    _, out = shards

    def loader():
        return make_loader(str(out), batch_size=8, num_workers=workers, seed=7, with_keys=True)

    whole = loader()
    keys_of(whole)  # epoch 0
    uninterrupted = keys_of(whole)  # epoch 1
    first = loader()
    keys_of(first)
    head = []
    for n, (_, _, keys) in enumerate(first, start=1):
        head += keys
        if n == stop_after:
            break
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches_done"] == stop_after
    resumed = loader()
    resumed.load_state_dict(state)
    tail = keys_of(resumed)
    assert head + tail == uninterrupted
    assert resumed.epoch == 2 and resumed.state_dict()["batches_done"] == 0


def test_state_from_other_settings_is_refused(shards) -> None:
    _, out = shards
    state = make_loader(str(out), batch_size=8, num_workers=0).state_dict()
    other = make_loader(str(out), batch_size=16, num_workers=0)
    with pytest.raises(PipelineError, match=r"loader state: batch_size expected 16 \(this loader\), found 8"):
        other.load_state_dict(state)


def test_transform_runs_per_sample(shards) -> None:
    _, out = shards
    loader = make_loader(str(out), batch_size=8, num_workers=0, transform=lambda x: x.float() / 255)
    images, _ = next(iter(loader))
    assert images.dtype == torch.float32 and float(images.max()) <= 1.0


def test_sources_without_manifest_and_brace_patterns(shards) -> None:
    _, out = shards
    pattern = str(out / "train" / "train-{000000..000004}.tar")
    loader = make_loader(pattern, batch_size=8, num_workers=0, with_keys=True)
    assert loader.num_samples == N_TRAIN and len(set(keys_of(loader))) == N_TRAIN


def test_pipe_urls_are_refused_unless_allowed(shards) -> None:
    _, out = shards
    url = f"pipe:cat {out}/train/train-000000.tar"
    with pytest.raises(ShardFormatError, match=r"pipe: URLs run shell commands; pass allow_pipe=True"):
        make_loader([url], batch_size=4, num_workers=0)
    allowed = make_loader([url], batch_size=4, num_workers=0, allow_pipe=True, with_keys=True)
    assert allowed.num_samples == 16 and len({k for _, _, ks in allowed for k in ks}) == 16


def test_bad_arguments_fail_at_construction(shards) -> None:
    _, out = shards
    with pytest.raises(PipelineError, match=r"expected batch_size >= 1"):
        make_loader(str(out), batch_size=0)
    with pytest.raises(PipelineError, match=r"uneven: expected one of \('drop', 'pad'\), found 'x'"):
        make_loader(str(out), batch_size=4, uneven="x")
    with pytest.raises(PipelineError, match=r"rank: expected 0..1, found 2"):
        make_loader(str(out), batch_size=4, world_size=2, rank=2)
    with pytest.raises(ShardFormatError, match=r"no split 'val' found"):
        make_loader(str(out), split="val", batch_size=4)
