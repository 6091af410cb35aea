"""Conversion across nodes: shares by shard index, then one merged manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConversionError
from shard_tools.cli import main
from shard_tools.conversion.nodes import merge_manifests
from shard_tools.convert import convert
from shard_tools.validate import validate
from tests.test_conversion import digests


@pytest.fixture
def source(vimh_source) -> Path:
    return vimh_source(n_train=300, n_test=70)


def test_nodes_then_merge_equals_one_machine(tmp_path: Path, source: Path) -> None:
    single = tmp_path / "single"
    convert("vimh", source, single, max_samples=40, max_bytes=None)
    nodes = tmp_path / "nodes"
    for rank in (2, 0, 1):  # in any order, as a scheduler may run them
        assert convert("vimh", source, nodes, max_samples=40, max_bytes=None, num_nodes=3, node_rank=rank) == {}
    assert not (nodes / "train" / "manifest.json").exists()
    merged = merge_manifests(nodes)
    assert merged["train"].num_samples == 300 and len(merged["train"].shards) == 8
    assert digests(nodes) == digests(single)
    assert validate(str(nodes), progress=False).ok


def test_cli_nodes_and_manifest(tmp_path: Path, source: Path, capsys) -> None:
    for rank in (0, 1):
        assert main(["convert", "vimh", str(source), str(tmp_path / "o"), "--max-samples", "50", "--max-bytes", "0",
                     "--num-nodes", "2", "--node-rank", str(rank)]) == 0
    assert "when every node is, run: shards manifest" in capsys.readouterr().out
    assert main(["manifest", str(tmp_path / "o")]) == 0
    assert "train: 300 samples in 6 shards, manifest written" in capsys.readouterr().out


def test_merge_names_what_is_missing(tmp_path: Path, source: Path) -> None:
    convert("vimh", source, tmp_path / "o", max_samples=40, max_bytes=None, num_nodes=3, node_rank=0)
    convert("vimh", source, tmp_path / "o", max_samples=40, max_bytes=None, num_nodes=3, node_rank=2)
    with pytest.raises(ConversionError, match=r"train: incomplete: 3 of 8 shards missing or not as recorded "
                                              r"\['train-000001.tar', 'train-000004.tar', 'train-000007.tar'\]; "
                                              r"node manifests missing for node ranks \[1\]"):
        merge_manifests(tmp_path / "o")
    assert not (tmp_path / "o" / "train" / "manifest.json").exists()


def test_node_settings_are_checked(tmp_path: Path, source: Path) -> None:
    with pytest.raises(ConversionError, match=r"node_rank: expected 0..1, found 2"):
        convert("vimh", source, tmp_path / "o", max_samples=40, max_bytes=None, num_nodes=2, node_rank=2)
    with pytest.raises(ConversionError, match=r"plans shards by sample count .* found max_samples=40, max_bytes=100"):
        convert("vimh", source, tmp_path / "o", max_samples=40, max_bytes=100, num_nodes=2, node_rank=0)
    with pytest.raises(ConversionError, match=r"no node manifests"):
        merge_manifests(tmp_path)


def test_interrupted_node_share_keeps_its_sound_shards(tmp_path: Path, source: Path, monkeypatch) -> None:
    import shard_tools.conversion.slices as parallel

    real, calls = parallel.prepare_blocks, []

    def counted(src, schema, samples):  # type: ignore[no-untyped-def]
        calls.append(len(samples))
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt  # a killed node: Ctrl-C or SIGTERM mid-shard
        return real(src, schema, samples)

    monkeypatch.setattr(parallel, "prepare_blocks", counted)
    out = tmp_path / "o"
    interrupt_at: int | None = 3  # node 0 of 2 writes train shards 0, 2, 4, 6: the third is cut short
    with pytest.raises(KeyboardInterrupt):
        convert("vimh", source, out, max_samples=40, max_bytes=None, num_nodes=2, node_rank=0)
    first = (out / "train" / "train-000000.tar").stat().st_mtime_ns
    (out / "train" / "train-000002.tar").write_bytes(b"damaged")  # not as recorded: written again
    interrupt_at, calls[:] = None, []
    convert("vimh", source, out, max_samples=40, max_bytes=None, num_nodes=2, node_rank=0)
    assert len(calls) == 3 + 1  # train shards 2 (damaged), 4, 6; test shard 0 (that split had not started)
    assert (out / "train" / "train-000000.tar").stat().st_mtime_ns == first
    assert not list((out / "train").glob(".progress.*"))
    convert("vimh", source, out, max_samples=40, max_bytes=None, num_nodes=2, node_rank=1, workers=2)
    (out / "train" / "train-000005.tar.partial").write_bytes(b"cut")  # as a SIGKILL leaves them
    (out / "train" / ".progress.node-1-of-2.jsonl").write_text('{"key": "k"}\n')
    merge_manifests(out)
    assert not list((out / "train").glob("*.partial")) and not list((out / "train").glob(".progress.*"))
    convert("vimh", source, tmp_path / "single", max_samples=40, max_bytes=None)
    assert digests(out) == digests(tmp_path / "single")


def test_a_node_resumed_after_empty_slices_lists_them_and_merges(tmp_path: Path, monkeypatch) -> None:
    """ImageNet files skipped as bad, one per shard: their slices give no shard. A node
    interrupted after them records them, does not read them again, and the merged
    manifest equals one machine's."""
    import json

    import shard_tools.conversion.slices as parallel
    from shard_tools.formats.imagenet100.synthetic import generate_imagenet100
    from tests.test_imagenet100 import WNIDS

    (tmp_path / "classes.txt").write_text("\n".join(WNIDS) + "\n")
    options = {"class_list": str(tmp_path / "classes.txt"), "on_bad": "skip"}
    src = generate_imagenet100(tmp_path / "src", class_list=options["class_list"], n_train=3, n_val=0,
                               bad_files=True)
    real, calls = parallel.prepare_blocks, []

    def counted(source, schema, samples):  # type: ignore[no-untyped-def]
        calls.append(samples[0])
        if interrupt and len(calls) == 6:
            raise KeyboardInterrupt
        return real(source, schema, samples)

    monkeypatch.setattr(parallel, "prepare_blocks", counted)
    out, interrupt = tmp_path / "o", True
    with pytest.raises(KeyboardInterrupt):
        convert("imagenet100", src, out, max_samples=1, max_bytes=None, num_nodes=2, node_rank=0, options=options)
    finished, interrupt, calls[:] = calls[:-1], False, []  # the 6th slice was cut short
    convert("imagenet100", src, out, max_samples=1, max_bytes=None, num_nodes=2, node_rank=0, options=options)
    assert calls and not set(calls) & set(finished)  # no finished slice read again, empty ones included
    convert("imagenet100", src, out, max_samples=1, max_bytes=None, num_nodes=2, node_rank=1, options=options)
    single = convert("imagenet100", src, tmp_path / "single", max_samples=1, max_bytes=None, options=options)
    nodes = [json.loads(p.read_text()) for p in sorted((out / "train").glob("*.node-*.json"))]
    assert sum(len(n["empty_shards"]) for n in nodes) == 12 - single["train"].num_samples > 0
    assert merge_manifests(out)["train"] == single["train"]
    assert digests(out) == digests(tmp_path / "single")
