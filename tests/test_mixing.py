"""Weighted mixing (``pipeline.mix``): exact counts, seeds, union schema, masking, resume."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline import MixSource, make_loader, mix
from pipeline.errors import PipelineError, SchemaError
from pipeline.mixing.plan import apportion, split_counts
from shard_tools.convert import convert
from shard_tools.formats.cifar100mh.synthetic import generate_cifar100, generate_cifar100mh
from shard_tools.formats.vimh.synthetic import generate_vimh

WEIGHTS = (0.6, 0.3, 0.1)
NAMES = ("big", "mid", "small")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """Three real-format sources of very different sizes, all 32x32x3 raw: VIMH (1,200
    samples, 12 shards), the CIFAR-100 python release (240, 4 shards), CIFAR-100-MH (40, 3)."""
    d = tmp_path_factory.mktemp("mix")
    convert("vimh", generate_vimh(d / "src" / "vimh-32x32x3_big", n_train=1200, n_test=20), d / "big",
            max_samples=100)
    convert("cifar100mh", generate_cifar100(d / "src" / "cifar100", n_train=240, n_test=100), d / "mid",
            max_samples=64)
    convert("cifar100mh", generate_cifar100mh(d / "src" / "cmh", n_train=40, n_test=100), d / "small",
            max_samples=16)
    return {"big": d / "big", "mid": d / "mid", "small": d / "small"}


def sources(roots: dict[str, Path], weights=WEIGHTS) -> list[MixSource]:
    return [MixSource(str(roots[n]), weight=w, name=n) for n, w in zip(NAMES, weights, strict=True)]


def epoch(loader) -> list[tuple[int, str]]:
    """(source, key) of every sample of one pass, in order."""
    out = []
    for _, labels, keys in loader:
        out.extend(zip(labels["dataset"].tolist(), keys, strict=True))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_weights_give_exact_counts_every_epoch(roots, workers: int) -> None:
    loader = mix(sources(roots), batch_size=32, epoch_samples=1000, num_workers=workers, with_keys=True,
                 shuffle_buffer=256)
    for _ in range(2):
        samples = epoch(loader)
        counts = collections.Counter(s for s, _ in samples)
        assert [counts[k] for k in range(3)] == [600, 300, 100]
        assert loader.realized == {"big": 600, "mid": 300, "small": 100}
        per_key = collections.Counter(samples)
        assert max(n for (s, _), n in per_key.items() if s == 0) == 1  # the big source: subsampled
        assert {n for (s, _), n in per_key.items() if s == 2} <= {2, 3}  # 40 samples cycled to 100
        assert len({k for s, k in samples if s == 2}) == 40
    assert len(loader) == 32  # ceil(1000 / 32)


def test_choose_repeat_and_weight_together(roots) -> None:
    specs = [MixSource(str(roots["big"]), weight=1.0, name="big"),
             MixSource(str(roots["mid"]), repeat=0.5, name="mid"),
             MixSource(str(roots["small"]), choose=7, name="small")]
    loader = mix(specs, batch_size=50, epoch_samples=500, num_workers=0, with_keys=True)
    counts = collections.Counter(s for s, _ in epoch(loader))
    assert [counts[k] for k in range(3)] == [373, 120, 7]


def test_default_is_every_sample_once(roots) -> None:
    loader = mix([MixSource(str(roots[n]), name=n) for n in NAMES], batch_size=64, num_workers=0,
                 with_keys=True, shuffle=False)
    samples = epoch(loader)
    assert len(samples) == 1480 and len(set(samples)) == 1480


def test_seed_and_epoch_choose_other_shards(roots) -> None:
    def big_keys(seed: int, epochs: int = 1) -> list[set[str]]:
        loader = mix(sources(roots), batch_size=32, epoch_samples=1000, num_workers=0, seed=seed, with_keys=True)
        return [{k for s, k in epoch(loader) if s == 0} for _ in range(epochs)]

    first, second = big_keys(0, epochs=2)
    assert first != second and len(first) == len(second) == 600
    assert big_keys(1)[0] != first
    assert big_keys(0)[0] == first  # the same seed and epoch: the same choice


def test_batches_mix_sources(roots) -> None:
    loader = mix(sources(roots), batch_size=32, epoch_samples=1000, num_workers=2, shuffle_buffer=256)
    mixed = [len(set(labels["dataset"].tolist())) > 1 for _, labels in loader]
    assert sum(mixed) >= 0.9 * len(mixed)


def test_union_schema_namespaces_colliding_heads(roots) -> None:
    loader = mix(sources(roots), batch_size=32, epoch_samples=100, num_workers=0)
    schema = loader.schema
    assert schema.head_names == ("note_number", "note_velocity", "mid_fine", "mid_coarse", "small_fine",
                                 "small_coarse", "dataset")
    assert schema.head("dataset").class_names == NAMES
    assert schema.head("mid_fine").num_classes == 100 and schema.head("mid_coarse").num_classes == 20


def _reference_labels(root: Path) -> dict[str, dict[str, float]]:
    loader = make_loader(str(root), batch_size=64, num_workers=0, shuffle=False, with_keys=True)
    out = {}
    for _, labels, keys in loader:
        for j, key in enumerate(keys):
            out[key] = {name: float(v[j]) for name, v in labels.items()}
    return out


def test_labels_are_each_sources_own_and_missing_heads_are_marked(roots) -> None:
    loader = mix(sources(roots), batch_size=32, epoch_samples=1000, num_workers=0, with_keys=True)
    reference = {k: _reference_labels(roots[n]) for k, n in enumerate(NAMES)}
    owners = {"note_number": 0, "note_velocity": 0, "mid_fine": 1, "mid_coarse": 1, "small_fine": 2,
              "small_coarse": 2}
    own_names = {"mid_fine": "fine", "mid_coarse": "coarse", "small_fine": "fine", "small_coarse": "coarse"}
    checked = 0
    for _, labels, keys in loader:
        for j, key in enumerate(keys):
            source = int(labels["dataset"][j])
            for head, owner in owners.items():
                value = labels[head][j].item()
                if owner == source:
                    assert value == reference[source][key][own_names.get(head, head)]
                else:
                    assert value == -1
            quantized = labels["note_number.value"][j].item()
            assert np.isnan(quantized) == (source != 0)
            if source == 0:
                assert quantized == pytest.approx(reference[0][key]["note_number.value"])
            checked += 1
    assert checked == 1000


def test_resume_mid_epoch_is_exact(roots) -> None:
    def make():
        return mix(sources(roots), batch_size=32, epoch_samples=1000, num_workers=2, with_keys=True, seed=3)

    whole = epoch(make())
    first = make()
    head: list[tuple[int, str]] = []
    for i, (_, labels, keys) in enumerate(first):
        head.extend(zip(labels["dataset"].tolist(), keys, strict=True))
        if i == 6:
            break
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert head + epoch(resumed) == whole


def test_each_rank_gets_exact_equal_shares(roots) -> None:
    per_rank = []
    for rank in range(2):
        loader = mix(sources(roots), batch_size=16, epoch_samples=1001, num_workers=2, world_size=2, rank=rank,
                     with_keys=True)
        per_rank.append(epoch(loader))
    counts = [collections.Counter(s for s, _ in samples) for samples in per_rank]
    assert [counts[0][k] + counts[1][k] for k in range(3)] == [600, 300, 100]  # 1001 rounded down to 1000
    assert all(abs(counts[0][k] - counts[1][k]) <= 1 for k in range(3))
    assert len(per_rank[0]) == len(per_rank[1]) == 500
    big = [{k for s, k in samples if s == 0} for samples in per_rank]
    assert not big[0] & big[1]  # ranks read disjoint samples of a subsampled source


def test_differing_image_specs_need_a_target_size(roots, tmp_path: Path) -> None:
    convert("vimh", generate_vimh(tmp_path / "vimh-8x8x3_small", n_train=40, n_test=4, height=8, width=8),
            tmp_path / "tiny", max_samples=16)
    specs = [MixSource(str(roots["mid"]), weight=1, name="mid"), MixSource(str(tmp_path / "tiny"), weight=1)]
    with pytest.raises(SchemaError, match=r"source 'mid' has images 32x32x3 .*source 'vimh_8x8x3_small' has "
                                          r"images 8x8x3 .*set a target size"):
        mix(specs, batch_size=8, epoch_samples=64, num_workers=0)
    from torchvision.transforms import v2

    loader = mix(specs, batch_size=8, epoch_samples=64, num_workers=0, transform=v2.Resize((16, 16)))
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 16, 16) and set(labels["dataset"].tolist()) <= {0, 1}
    with pytest.raises(SchemaError, match=r"the transform gives images of 2 shapes \(source 'mid' \(32x32 in\): "
                                          r"\[3, 16, 16\]; source 'vimh_8x8x3_small' \(8x8 in\): \[3, 4, 4\]\); it "
                                          r"must give every image one size"):  # at construction, not in a worker
        mix(specs, batch_size=8, epoch_samples=64, num_workers=2, transform=lambda image: image[:, ::2, ::2])


class Fill:
    """A picklable transform: a 3x16x16 image of one value (which source's transform ran)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.full((3, 16, 16), self.value, dtype=torch.uint8)


def plus_one(image: torch.Tensor) -> torch.Tensor:
    return image + 1


@pytest.mark.parametrize("workers", [0, 2])
def test_each_source_has_its_own_transform_before_the_mixs(roots, tmp_path: Path, workers: int) -> None:
    convert("vimh", generate_vimh(tmp_path / "vimh-8x8x3_small", n_train=40, n_test=4, height=8, width=8),
            tmp_path / "tiny", max_samples=16)
    specs = [MixSource(str(roots["mid"]), weight=1, name="mid", transform=Fill(10)),
             MixSource(str(tmp_path / "tiny"), weight=1, name="tiny", transform=Fill(200)),
             MixSource(str(roots["small"]), weight=1, name="small")]  # 32x32: only the mix's transform
    with pytest.raises(SchemaError, match=r"each source's transform \(then the mix's\) gives images of 2 shapes "
                                          r"\(source 'mid' \(32x32 in\): \[3, 16, 16\]; source 'small' \(32x32 "
                                          r"in\): \[3, 32, 32\]\)"):
        mix(specs, batch_size=8, epoch_samples=48, num_workers=workers, transform=plus_one)
    specs[2] = MixSource(str(roots["small"]), weight=1, name="small", transform=Fill(100))
    loader = mix(specs, batch_size=8, epoch_samples=48, num_workers=workers, transform=plus_one)
    assert loader.image_shape == (3, 16, 16)
    seen = collections.Counter()
    for images, labels in loader:
        assert images.shape == (8, 3, 16, 16)
        for image, source in zip(images, labels["dataset"].tolist(), strict=True):
            assert torch.equal(image, torch.full_like(image, (11, 201, 101)[source]))  # source's, then the mix's
            seen[source] += 1
    assert seen == {0: 16, 1: 16, 2: 16}


def test_a_datamodule_keeps_each_sources_transform_for_evaluation(roots, tmp_path: Path) -> None:
    from training.mix_datamodule import MixDataModule

    convert("vimh", generate_vimh(tmp_path / "vimh-8x8x3_small", n_train=40, n_test=4, height=8, width=8),
            tmp_path / "tiny", max_samples=16)
    module = MixDataModule([{"source": str(roots["mid"]), "weight": 0.5, "name": "mid", "transform": Fill(10)},
                            {"source": str(tmp_path / "tiny"), "weight": 0.5, "name": "tiny", "transform": Fill(200)}],
                           epoch_samples=32, batch_size=8, num_workers=0)
    assert (module.input_image.height, module.input_image.width) == (16, 16)  # found, no image_size needed
    for stage in ("val", "test"):
        for images, labels in module.eval_dataloader(stage):
            expected = torch.tensor([(10, 200)[s] for s in labels["dataset"].tolist()], dtype=torch.uint8)
            assert torch.equal(images[:, 0, 0, 0], expected)


def test_bad_mix_settings_are_refused(roots) -> None:
    with pytest.raises(PipelineError, match=r"give at most one of weight, repeat, choose; found \{'weight': 1, "
                                            r"'choose': 5\}"):
        MixSource("x", weight=1, choose=5)
    with pytest.raises(PipelineError, match=r"weight expected a finite number >= 0, found -1"):
        MixSource("x", weight=-1)
    with pytest.raises(PipelineError, match=r"choose/repeat sources take 240 samples, more than the epoch's 100"):
        mix([MixSource(str(roots["mid"]), repeat=1.0), MixSource(str(roots["big"]), weight=1.0)],
            batch_size=8, epoch_samples=100, num_workers=0)
    with pytest.raises(PipelineError, match=r"epoch_samples=100 but the sources' choose/repeat counts sum to 280"):
        mix([MixSource(str(roots["mid"])), MixSource(str(roots["small"]), name="s")], batch_size=8,
            epoch_samples=100, num_workers=0)
    with pytest.raises(SchemaError, match=r"source names must differ, found \['a', 'a'\]"):
        mix([MixSource(str(roots["mid"]), name="a"), MixSource(str(roots["small"]), name="a")], batch_size=8,
            num_workers=0)


@given(st.integers(0, 10_000), st.lists(st.floats(0.01, 100), min_size=1, max_size=8))
def test_apportion_is_exact_and_within_one_of_each_quota(total: int, weights: list[float]) -> None:
    shares = apportion(total, weights)
    assert sum(shares) == total
    for share, weight in zip(shares, weights, strict=True):
        assert abs(share - total * weight / sum(weights)) < 1 + 1e-9


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=6), st.integers(1, 8), st.data())
def test_split_counts_meets_every_row_and_column(rows: list[int], n_cols: int, data) -> None:
    total = sum(rows)
    cuts = sorted(data.draw(st.lists(st.integers(0, total), min_size=n_cols - 1, max_size=n_cols - 1)))
    columns = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    cells = split_counts(rows, columns)
    assert [sum(r) for r in cells] == rows
    assert [sum(c) for c in zip(*cells, strict=True)] == columns
    assert all(c >= 0 for r in cells for c in r)
    for i, r in enumerate(cells):
        for j, c in enumerate(r):
            assert abs(c - rows[i] * columns[j] / max(1, total)) <= len(rows) + len(columns)


def test_missing_heads_do_not_change_the_loss(roots) -> None:
    from training.backbones import SimpleCNN
    from training.module import MultiheadModule

    loader = mix(sources(roots), batch_size=64, epoch_samples=256, num_workers=0)
    images, labels = next(iter(loader))
    model = MultiheadModule(loader.schema, backbone=lambda image: SimpleCNN(image=image, widths=(8, 16)),
                            optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    outputs = model(images)
    base = model.losses(outputs, labels)
    perturbed = {k: v.clone() for k, v in outputs.items()}
    for head, logits in perturbed.items():
        missing = labels[head] < 0
        logits[missing] += 100 * torch.randn_like(logits[missing])
    again = model.losses(perturbed, labels)
    assert all(torch.equal(base[h], again[h]) for h in base)
    assert all(torch.isfinite(loss) for loss in base.values())


def test_realized_counts_are_logged_when_a_trainer_stops_after_len_batches(roots, caplog) -> None:
    """Lightning stops after ``len(loader)`` batches without exhausting the iterator."""
    import itertools
    import logging

    loader = mix(sources(roots), batch_size=32, epoch_samples=1000, num_workers=0)
    with caplog.at_level(logging.INFO, logger="pipeline.loading.loader"):
        list(itertools.islice(iter(loader), len(loader)))
    assert loader.realized == {"big": 600, "mid": 300, "small": 100}
    assert "mix epoch 0 rank 0 realized proportions: big 0.6000 (600/1000, target 0.6000)" in caplog.text


def test_two_sources_over_the_same_shards_keep_their_own_counts(roots) -> None:
    loader = mix([MixSource(str(roots["small"]), choose=100, name="a1"),
                  MixSource(str(roots["small"]), choose=20, name="a2")], batch_size=16, num_workers=0)
    counts = collections.Counter(int(s) for _, labels in loader for s in labels["dataset"].tolist())
    assert counts == {0: 100, 1: 20} and loader.realized == {"a1": 100, "a2": 20}


def test_pad_gives_every_sample_at_least_once_on_every_rank_split(roots) -> None:
    """Evaluation: 240 + 40 samples over 3 ranks pad up to 282 instead of dropping 1."""
    specs = [MixSource(str(roots["mid"]), name="mid"), MixSource(str(roots["small"]), name="small")]
    shares = [epoch(mix(specs, batch_size=16, num_workers=0, shuffle=False, world_size=3, rank=r, uneven="pad",
                        with_keys=True)) for r in range(3)]
    assert [len(s) for s in shares] == [94, 94, 94]
    seen = collections.Counter(sample for share in shares for sample in share)
    assert len(seen) == 280 and sum(seen.values()) == 282


def test_zero_weights(roots) -> None:
    specs = [MixSource(str(roots["mid"]), choose=20, name="mid"), MixSource(str(roots["small"]), weight=0, name="s")]
    loader = mix(specs, batch_size=8, epoch_samples=20, num_workers=0)
    assert loader.stream.config.planner.targets == (20, 0)
    with pytest.raises(PipelineError, match=r"mix: 30 samples of the epoch are left for the weighted sources, but "
                                            r"their weights are all 0"):
        mix(specs, batch_size=8, epoch_samples=50, num_workers=0)


def test_skip_mode_keeps_each_sources_count_when_a_shard_is_short(roots, tmp_path: Path) -> None:
    import os
    import shutil

    short = tmp_path / "short"
    shutil.copytree(roots["mid"], short)
    os.truncate(short / "train" / "train-000001.tar", 20_000)  # the manifest says 64 samples; a few remain
    specs = [MixSource(str(short), weight=0.5, name="short"), MixSource(str(roots["small"]), weight=0.5, name="s")]
    for workers in (0, 2):
        loader = mix(specs, batch_size=8, epoch_samples=400, num_workers=workers, on_error="skip")
        counts = collections.Counter(int(s) for _, labels in loader for s in labels["dataset"].tolist())
        assert counts == {0: 200, 1: 200}


def test_datamodule_plans_for_the_process_group_that_fit_starts(roots, monkeypatch) -> None:
    """The datamodule is built before Lightning starts DDP; its train loader must not keep
    the single-process plan."""
    import pipeline.loading.make_loader
    import training.shard_datamodule
    from training.mix_datamodule import MixDataModule

    module = MixDataModule([{"source": str(roots["mid"]), "weight": 0.5, "name": "mid"},
                            {"source": str(roots["small"]), "weight": 0.5, "name": "small"}],
                           epoch_samples=200, batch_size=10, num_workers=0)
    for where in (training.shard_datamodule, pipeline.loading.make_loader):
        monkeypatch.setattr(where, "default_world", lambda: (2, 1))
    config = module.train_dataloader().loader.stream.config
    assert (config.world_size, config.rank) == (2, 1) and len(module.train_dataloader()) == 10


def test_resume_refuses_other_settings(roots) -> None:
    first = mix(sources(roots), batch_size=32, epoch_samples=1000, num_workers=0, shuffle_buffer=256)
    other = mix(sources(roots), batch_size=32, epoch_samples=1000, num_workers=0, shuffle_buffer=512)
    with pytest.raises(PipelineError, match=r"loader state: shuffle_buffer expected 512 \(this loader\), found 256"):
        other.load_state_dict(first.state_dict())


def test_unknown_uneven_policy_is_refused(roots) -> None:
    with pytest.raises(PipelineError, match=r"uneven: expected one of \('drop', 'pad'\), found 'wrap'"):
        mix(sources(roots), batch_size=8, num_workers=0, uneven="wrap")
