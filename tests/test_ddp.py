"""Real multi-process DDP on CPU (gloo): equal batches per rank, disjoint shares, no hang."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import make_loader
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    loader = make_loader(root, batch_size=4, num_workers=2, seed=11, with_keys=True)  # world from dist
    keys, steps = [], 0
    for epoch in range(2):
        for _, _, batch_keys in loader:
            step = torch.ones(1)
            dist.all_reduce(step)  # a collective every step: unequal batch counts would hang here
            keys.append([epoch, *batch_keys])
            steps += 1
    Path(out, f"{rank}.json").write_text(json.dumps({"keys": keys, "steps": steps, "len": len(loader)}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(240)
def test_two_gloo_ranks_over_uneven_shards(tmp_path: Path) -> None:
    src = generate_vimh(tmp_path / "vimh-4x4x1_ddp", n_train=75, n_test=2, height=4, width=4, channels=1)
    convert("vimh", src, tmp_path / "out", max_samples=16)  # shards of 16, 16, 16, 16, 11
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "out"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results[0]["steps"] == results[1]["steps"] == 2 * results[0]["len"] == 2 * 10
    for epoch in range(2):
        shares = [[k for batch in r["keys"] if batch[0] == epoch for k in batch[1:]] for r in results]
        assert [len(s) for s in shares] == [37, 37]
        assert not set(shares[0]) & set(shares[1])
        assert len(set(shares[0]) | set(shares[1])) == 74  # one of 75 left out by the drop policy
    first = [k for b in results[0]["keys"] if b[0] == 0 for k in b[1:]]
    second = [k for b in results[0]["keys"] if b[0] == 1 for k in b[1:]]
    assert first != second


def _mix_rank_main(rank: int, world: int, port: int, roots: list[str], out: str) -> None:
    from pipeline import MixSource, mix

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    weights = (0.6, 0.3, 0.1)
    sources = [MixSource(root, weight=w, name=f"s{k}") for k, (root, w) in enumerate(zip(roots, weights, strict=True))]
    loader = mix(sources, batch_size=8, epoch_samples=400, num_workers=2, seed=5, with_keys=True)
    epochs = []
    for _ in range(2):
        samples = []
        for _, labels, keys in loader:
            step = torch.ones(1)
            dist.all_reduce(step)  # unequal batch counts would hang here
            samples.extend([int(s), k] for s, k in zip(labels["dataset"].tolist(), keys, strict=True))
        epochs.append(samples)
    Path(out, f"mix-{rank}.json").write_text(json.dumps({"epochs": epochs, "realized": loader.realized}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_gloo_ranks_get_exact_mix_counts(tmp_path: Path) -> None:
    """Weights 0.6/0.3/0.1 over sources of 500, 120 and 20 samples: 240/120/40 per epoch,
    split 120/60/20 per rank, with equal batch counts and disjoint samples of the big source."""
    roots = []
    for name, n in (("a", 500), ("b", 120), ("c", 20)):
        src = generate_vimh(tmp_path / f"vimh-4x4x1_{name}", n_train=n, n_test=2, height=4, width=4, channels=1)
        convert("vimh", src, tmp_path / name, max_samples=32)
        roots.append(str(tmp_path / name))
    mp.spawn(_mix_rank_main, args=(2, _free_port(), roots, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"mix-{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        for r in results:
            counts = [sum(1 for s, _ in r["epochs"][epoch] if s == k) for k in range(3)]
            assert counts == [120, 60, 20]
        big = [{k for s, k in r["epochs"][epoch] if s == 0} for r in results]
        assert len(big[0]) == len(big[1]) == 120 and not big[0] & big[1]
    assert results[0]["realized"] == {"s0": 120, "s1": 60, "s2": 20}
    assert results[0]["epochs"][0] != results[0]["epochs"][1]
