"""The synthetic VIMH source: real on-disk format, labels recoverable from pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConversionError
from shard_tools.formats.vimh.synthetic import generate_vimh
from tests.conftest import read_vimh_source


@pytest.mark.parametrize("channels", [1, 3])
def test_labels_can_be_read_back_from_the_pixels(tmp_path: Path, channels: int) -> None:
    """Each head's value is the lit length of its band: a trivial decoder recovers it,
    so a model can learn it."""
    src = generate_vimh(tmp_path / "s", n_train=200, n_test=1, height=32, width=32,
                        channels=channels, n_heads=4)
    hits = 0
    for pixels, labels in read_vimh_source(src, "train").values():
        image = np.frombuffer(pixels, np.uint8).reshape(channels, 32, 32)
        for head, q in labels.items():
            band = image[0, head * 8:(head + 1) * 8]
            lit = int((band >= 100).all(axis=0).sum())
            hits += lit == (q * 32 + 127) // 255
    assert hits == 200 * 4


def test_variants_write_the_real_files(tmp_path: Path) -> None:
    both = generate_vimh(tmp_path / "b", n_train=5, n_test=2, variant="both")
    assert sorted(p.name for p in both.iterdir()) == [
        "test", "test_batch", "train", "train_batch", "vimh_dataset_info.json"]
    assert read_vimh_source(both, "train")[0][0] == (both / "train").read_bytes()[14 + 5: 14 + 5 + 3072]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"variant: expected pickle, binary, binary-v1 or both, found 'x'"):
        generate_vimh(tmp_path, variant="x")
    with pytest.raises(ConversionError, match=r"n_heads: expected 1..4, found 9"):
        generate_vimh(tmp_path, n_heads=9)
