"""Conversion across machines: each node writes its share of a split's shards, by index;
``shards manifest OUT`` then merges the nodes' manifests and checks nothing is missing.

Every node plans the same shards without reading the others' samples: shard ``i`` holds
samples ``order[i*S:(i+1)*S]`` of the seeded order (``S`` = ``max_samples``), and node
``R`` of ``N`` writes the shards with ``i % N == R``. That plan is the one a single
process makes when only ``max_samples`` limits shards, so the merged shard set is
byte-identical to a one-machine conversion with the same settings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.errors import ConversionError
from pipeline.format.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.format.schema import DatasetSchema
from shard_tools.conversion.plan import SplitPlan, planned
from shard_tools.conversion.slices import run_jobs, slice_jobs
from shard_tools.progress_bar import ProgressBar
from shard_tools.staging import is_sound, read_progress, start_progress, write_atomic
from shard_tools.writer import report_skipped, shard_name

log = logging.getLogger(__name__)
NODE_MANIFEST = "manifest.node-{rank}-of-{nodes}.json"
NODE_PROGRESS = ".progress.node-{rank}-of-{nodes}.jsonl"  # shards finished so far, for a re-run


def node_shards(count: int, max_samples: int, num_nodes: int, node_rank: int) -> list[int]:
    """The shard numbers node ``node_rank`` of ``num_nodes`` writes, of ``count`` samples."""
    return [i for i in range(-(-count // max_samples)) if i % num_nodes == node_rank]


def convert_share(plan: SplitPlan, out: Path, *, num_nodes: int, node_rank: int, max_samples: int,
                  workers: int = 1) -> list[ShardInfo]:
    """Write this node's shards of one split into ``out/<split>/`` (``workers`` processes,
    each writing whole shards) and its node manifest. Shards a killed run of the same
    share finished, and that still hash to what it recorded, are kept (the plan's key
    covers ``(max_samples, num_nodes)``)."""
    schema, order, split_dir = plan.schema, plan.order, out / plan.split
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / MANIFEST_NAME).unlink(missing_ok=True)  # an earlier output's: it must not list new shards
    progress = split_dir / NODE_PROGRESS.format(rank=node_rank, nodes=num_nodes)
    done = {s.name: s for s in read_progress(progress, plan.key) if is_sound(split_dir / s.name, s)}
    start_progress(progress, plan.key, list(done.values()))
    if done:
        log.info("%s: node %d keeps %d sound shard(s) of an interrupted run", split_dir, node_rank, len(done))
    mine = node_shards(len(order), max_samples, num_nodes, node_rank)
    todo = [i for i in mine if shard_name(plan.split, i) not in done]
    jobs = slice_jobs(plan, todo, max_samples=max_samples, directory=split_dir, progress=progress, workers=workers)
    to_write = sum(job.planned for job in jobs)
    with ProgressBar(total=to_write, desc=f"{schema.name}/{plan.split} node {node_rank}/{num_nodes}",
                     unit="sample", disable=None, leave=False) as bar:
        for _, shards in run_jobs(jobs, workers, bar.update):
            done.update((s.name, s) for s in shards)  # each recorded in the progress log as it landed
    names = [(i, shard_name(plan.split, i)) for i in mine]
    written = [done[name] for _, name in names if name in done and done[name].samples]
    kept = {s.name for s in written}
    planned_shards = -(-len(order) // max_samples)
    node = {"schema": schema.to_dict(), "num_nodes": num_nodes, "node_rank": node_rank,
            "planned_shards": planned_shards, "shards": [vars(s) for s in written],
            "empty_shards": [i for i, name in names if name not in kept]}  # every sample skipped by the format
    write_atomic(split_dir / NODE_MANIFEST.format(rank=node_rank, nodes=num_nodes),
                json.dumps(node, sort_keys=True, indent=2) + "\n")
    share = sum(len(planned(order, i, max_samples)) for i in mine)
    report_skipped(split_dir, share, sum(s.samples for s in written))
    progress.unlink(missing_ok=True)
    return written


def merge_manifests(out: str | Path) -> dict[str, Manifest]:
    """For every split under ``out`` with node manifests: check that all nodes agree and that
    every planned shard is there with its recorded size; only if every split is complete,
    write each ``manifest.json`` and remove the node manifests. Every incomplete split is
    named in one error."""
    out = Path(out)
    splits = sorted({p.parent for p in out.glob("*/manifest.node-*-of-*.json")})
    if not splits:
        raise ConversionError(f"{out}: no node manifests (manifest.node-R-of-N.json) in any split directory")
    merged, problems = {}, []
    for split_dir in splits:
        try:
            merged[split_dir] = _merged_split(split_dir)
        except ConversionError as e:
            problems.append(str(e))
    if problems:
        raise ConversionError("; ".join(problems))
    for split_dir, manifest in merged.items():
        write_atomic(split_dir / MANIFEST_NAME, manifest.to_json())
        for path in [*split_dir.glob("manifest.node-*-of-*.json"), *split_dir.glob(".progress.node-*-of-*.json*"),
                     *split_dir.glob("*.tar.partial")]:  # shards a killed node had in flight
            path.unlink()
    return {split_dir.name: manifest for split_dir, manifest in merged.items()}


def _merged_split(split_dir: Path) -> Manifest:
    paths = sorted(split_dir.glob("manifest.node-*-of-*.json"))
    nodes = [json.loads(p.read_text()) for p in paths]
    first = nodes[0]
    for path, node in zip(paths, nodes, strict=True):
        for key in ("schema", "num_nodes", "planned_shards"):
            if node[key] != first[key]:
                raise ConversionError(f"{path}: {key} differs from {paths[0].name}'s; the nodes ran different "
                                      "conversions")
    missing_nodes = sorted(set(range(first["num_nodes"])) - {n["node_rank"] for n in nodes})
    shards = {s["name"]: ShardInfo(**s) for n in nodes for s in n["shards"]}
    schema = DatasetSchema.from_dict(first["schema"])
    empty = {i for n in nodes for i in n.get("empty_shards", [])}
    expected = [shard_name(schema.split, i) for i in range(first["planned_shards"]) if i not in empty]
    absent = [name for name in expected if name not in shards or not (split_dir / name).is_file()
              or (split_dir / name).stat().st_size != shards[name].bytes]
    if absent or missing_nodes:
        raise ConversionError(f"{split_dir}: incomplete: {len(absent)} of {len(expected)} shards missing or not as "
                              f"recorded {absent[:10]}; node manifests missing for node ranks {missing_nodes}")
    return Manifest(schema=schema, shards=tuple(shards[name] for name in expected))


def check_node_settings(num_nodes: int, node_rank: int, max_samples: int | None, max_bytes: int | None) -> int:
    """``max_samples`` when the node settings allow a plan every node can make alone."""
    if not 0 <= node_rank < num_nodes:
        raise ConversionError(f"node_rank: expected 0..{num_nodes - 1}, found {node_rank}")
    if max_bytes is not None or max_samples is None:
        raise ConversionError("num_nodes > 1 plans shards by sample count so that every node knows every shard: "
                              f"set max_samples and turn max_bytes off (--max-bytes 0); found max_samples="
                              f"{max_samples}, max_bytes={max_bytes}")
    return max_samples
