"""Every Python and shell block of the README and docs/ runs, so that no example can rot.

Blocks run in a sandbox directory laid out as the docs assume, as if it were the repository
root: ``data/sources/`` (``vimh-32x32x3_demo``, ``cifar100mh-32x32x3_demo``,
``imagenet100_demo``, ``webdataset_demo``), ``data/shards/vimh``, ``data/shards/cifar100mh``,
``data/shards/imagenet100``, ``out`` (a VIMH shard set), and ``tests`` and ``pyproject.toml``
linked to the repository's; ``s3://bucket/vimh`` and ``s3://bucket/imagenet100`` are served by
a moto endpoint on 127.0.0.1 (``AWS_ENDPOINT_URL``). Shell blocks run with the project's
console scripts and a ``.venv/bin`` of shims: ``make`` is dry-run (``make -n``: the target and
its variables must exist; `make test` and `make bench` are what run them), and training
commands get quick settings appended (one short epoch on the sandbox's tiny shards). Blocks
share the sandbox and run in document order, as a reader would run them: a block may use what
an earlier one of its page made (``evaluate`` reads the checkpoint of a ``train`` above it).

A block whose info string says ``slow`` (```` ```bash slow ````) runs with the slow tests
(``make test PYTEST_ARGS="-m slow"``), with a longer time limit; a slow block that runs the
benchmarks first installs the ``bench`` extra into this interpreter's environment, as
``make bench`` does. ``docs/bench/`` is left out: the benchmarks write it (its loader section
is copied into docs/benchmarks.md, where its commands run).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "docs" / "bench"  # written by `make bench`, not by hand
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if GENERATED not in p.parents)]
RUN = ("python", "bash", "sh")
QUICK_TRAINING = ("trainer.max_epochs=1 trainer.limit_train_batches=2 trainer.limit_val_batches=1 "
                  "++trainer.limit_test_batches=1 data.num_workers=0 trainer.enable_progress_bar=false")
TIMEOUT_S, SLOW_TIMEOUT_S = 900, 3000  # a block's time limit, and a slow block's


@dataclass(frozen=True)
class Block:
    doc: Path
    number: int
    lang: str
    slow: bool
    code: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}#{self.number}"


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        for number, m in enumerate(re.finditer(r"^```([^\n]*)\n(.*?)^```", doc.read_text(), re.S | re.M)):
            info = m.group(1).split()
            if info and info[0] in RUN:
                found.append(Block(doc, number, info[0], "slow" in info[1:], m.group(2)))
    return found


BLOCKS = blocks()


def _shim(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _bin(sandbox: Path) -> Path:
    """``.venv/bin`` of the sandbox: the real interpreter and scripts, ``make`` dry-run, and
    quick settings appended to training runs."""
    real = Path(sys.executable).parent
    bin_dir = sandbox / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    quick = f'"$@" {QUICK_TRAINING} paths.root_dir={sandbox}'
    _shim(bin_dir / "python", f"""
        case "$1 $2" in
          "-m training.train"|"-m training.evaluate") exec {real}/python {quick} ;;
        esac
        exec {real}/python "$@"
        """)
    for name in ("train", "evaluate"):
        _shim(bin_dir / name, f'exec {real}/{name} {quick}\n')
    for name in ("shards", "pip"):
        _shim(bin_dir / name, f'exec {real}/{name} "$@"\n')
    _shim(bin_dir / "make", f'exec {shutil.which("make")} --no-print-directory -C {ROOT} -n "$@" >/dev/null\n')
    return bin_dir


def _webdataset_source(directory: Path) -> None:
    """WebDataset shards as ``webdataset.ShardWriter`` writes them: ``train/`` and ``val/``, each
    sample a JPEG, its fine class in ``.cls`` and its coarse class (fine // 5) in ``.json``."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 12)):
        (directory / split).mkdir(parents=True)
        with wds.ShardWriter(str(directory / split / "shard-%06d.tar"), maxcount=20, verbose=0) as sink:
            for i in range(n):
                jpeg = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
                fine = int(rng.integers(0, 100))
                sink.write({"__key__": f"{split}{i:05d}", "jpg": jpeg.getvalue(), "cls": fine,
                            "json": {"coarse": fine // 5}})


def _data(sandbox: Path) -> None:
    """The sources and shard sets the docs name, small."""
    from shard_tools.convert import convert
    from shard_tools.formats.cifar100mh.synthetic import generate_cifar100mh
    from shard_tools.formats.imagenet100.synthetic import generate_imagenet100
    from shard_tools.formats.vimh.synthetic import generate_vimh

    data = sandbox / "data"
    vimh = generate_vimh(data / "sources" / "vimh-32x32x3_demo", n_train=256, n_test=64, height=32, width=32,
                         channels=3, n_heads=2)
    convert("vimh", vimh, data / "shards" / "vimh", max_samples=64)
    convert("vimh", vimh, sandbox / "out", max_samples=64)
    cifar = generate_cifar100mh(data / "sources" / "cifar100mh-32x32x3_demo", n_train=256, n_test=64)
    convert("cifar100mh", cifar, data / "shards" / "cifar100mh", max_samples=64)
    imagenet = generate_imagenet100(data / "sources" / "imagenet100_demo", n_train=2, n_val=1)
    convert("imagenet100", imagenet, data / "shards" / "imagenet100", max_samples=64)
    _webdataset_source(data / "sources" / "webdataset_demo")
    for name in ("tests", "pyproject.toml"):  # for the blocks that run tests, as from the repository root
        (sandbox / name).symlink_to(ROOT / name)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, s3_endpoint: str) -> dict[str, str]:
    import boto3
    import s3fs

    root = tmp_path_factory.mktemp("docs")
    _data(root)
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="bucket")
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_endpoint})
    for name in ("vimh", "imagenet100"):
        fs.put(str(root / "data" / "shards" / name) + "/", f"bucket/{name}/", recursive=True)
    bin_dir = _bin(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(credentials, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), HOME=str(root),
               XDG_CACHE_HOME=str(root / ".cache"), MPLBACKEND="Agg")
    return {"root": str(root), **{f"env:{k}": v for k, v in env.items()}}


def run(block: Block, sandbox: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k.removeprefix("env:"): v for k, v in sandbox.items() if k.startswith("env:")}
    command = [str(Path(sandbox["root"]) / ".venv" / "bin" / "python"), "-c", block.code] if block.lang == "python" \
        else ["bash", "-euo", "pipefail", "-c", block.code]
    return subprocess.run(command, cwd=sandbox["root"], env=env, capture_output=True, text=True,
                          timeout=SLOW_TIMEOUT_S if block.slow else TIMEOUT_S, check=False)


def _bench_extra() -> None:
    """The ``bench`` extra (litdata, mosaicml-streaming), installed as ``make bench`` does."""
    import importlib.util

    if all(importlib.util.find_spec(name) for name in ("litdata", "streaming")):
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements.lock"),
                    "-e", f"{ROOT}[dev,bench]"], check=True, timeout=SLOW_TIMEOUT_S)


def _params(slow: bool) -> list:
    return [pytest.param(b, id=b.id) for b in BLOCKS if b.slow == slow]


def _check(block: Block, sandbox: dict[str, str]) -> None:
    done = run(block, sandbox)
    assert done.returncode == 0, f"{block.id} failed:\n{block.code}\n--- stdout\n{done.stdout[-3000:]}\n--- " \
                                 f"stderr\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("block", _params(slow=False))
def test_doc_block_runs(block: Block, sandbox: dict[str, str]) -> None:
    _check(block, sandbox)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S + 300)
@pytest.mark.parametrize("block", _params(slow=True))
def test_slow_doc_block_runs(block: Block, sandbox: dict[str, str]) -> None:
    if "benchmarks." in block.code:
        _bench_extra()
    _check(block, sandbox)


def test_every_doc_block_is_collected() -> None:
    """Blocks in other languages would not run: only python, bash and sh (and plain text,
    layouts and JSON, which are not code)."""
    for doc in DOCS:
        for m in re.finditer(r"^```([^\n]*)\n", doc.read_text(), re.M):
            lang = (m.group(1).split() or [""])[0]
            assert lang in (*RUN, "", "json", "text"), f"{doc}: a ```{lang} block"
    assert len(BLOCKS) >= 10 and shutil.which("bash")
