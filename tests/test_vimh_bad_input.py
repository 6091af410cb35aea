"""Every bad VIMH input gets a clear error naming the file and sample, and no valid output."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConversionError
from shard_tools.convert import convert
from shard_tools.validate import validate
from tests.conftest import no_output


def edit_pickle(path: Path, edit: Callable[[dict], None]) -> None:
    batch = pickle.loads(path.read_bytes())
    edit(batch)
    path.write_bytes(pickle.dumps(batch))


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"nowhere: no such directory"):
        convert("vimh", tmp_path / "nowhere", tmp_path / "out")
    assert no_output(tmp_path / "out")


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "vimh-8x8x3_empty").mkdir()
    with pytest.raises(ConversionError, match=r"empty dataset: expected one of"):
        convert("vimh", tmp_path / "vimh-8x8x3_empty", tmp_path / "out")


def test_pickle_without_samples(tmp_path: Path, vimh_source) -> None:
    src = vimh_source(variant="pickle")
    edit_pickle(src / "test_batch", lambda b: b.update(data=b["data"][:0], vimh_labels=[]))
    with pytest.raises(ConversionError, match=r"test_batch: empty dataset: no samples"):
        convert("vimh", src, tmp_path / "out")
    assert no_output(tmp_path / "out")


def test_truncated_pickle(tmp_path: Path, vimh_source) -> None:
    src = vimh_source(variant="pickle")
    data = (src / "train_batch").read_bytes()
    (src / "train_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"train_batch: expected a VIMH pickle, found a truncated"):
        convert("vimh", src, tmp_path / "out")
    assert no_output(tmp_path / "out")


def test_pickle_without_data(tmp_path: Path, vimh_source) -> None:
    src = vimh_source(variant="pickle")
    edit_pickle(src / "train_batch", lambda b: b.pop("data"))
    with pytest.raises(ConversionError, match=r"train_batch: expected a dict with 'data'"):
        convert("vimh", src, tmp_path / "out")


def test_label_list_shorter_than_1_plus_2n(tmp_path: Path, vimh_source) -> None:
    src = vimh_source(variant="pickle")
    edit_pickle(src / "train_batch", lambda b: b["vimh_labels"][7].pop())
    with pytest.raises(ConversionError, match=r"train_batch: sample 7: .* has 4 entries, expected 1\+2N = 5"):
        convert("vimh", src, tmp_path / "out")


def test_mixed_n_across_samples(tmp_path: Path, vimh_source) -> None:
    src = vimh_source(variant="pickle")
    edit_pickle(src / "train_batch", lambda b: b["vimh_labels"].__setitem__(3, [1, 0, 9]))
    with pytest.raises(ConversionError, match=r"train_batch: sample 3: N = 1, but sample 0 has N = 2 .*mixed N"):
        convert("vimh", src, tmp_path / "out")


def test_image_size_not_h_w_c(tmp_path: Path, vimh_source) -> None:
    src = vimh_source(variant="pickle")
    edit_pickle(src / "train_batch", lambda b: b.update(data=b["data"][:, :-1]))
    with pytest.raises(ConversionError, match=r"train_batch: sample 0: image has 191 bytes, expected H\*W\*C = 192"):
        convert("vimh", src, tmp_path / "out")


def test_truncated_trailing_binary_record(tmp_path: Path, vimh_source) -> None:
    src = vimh_source(variant="binary")
    data = (src / "train").read_bytes()
    (src / "train").write_bytes(data[:-10])
    with pytest.raises(ConversionError, match=r"train: truncated trailing record 39 at byte \d+: expected 211 "
                                              r"bytes, found 201 \(with a 14-byte record header\)"):
        convert("vimh", src, tmp_path / "out")
    assert no_output(tmp_path / "out")


def test_binary_header_size_is_detected_not_guessed(tmp_path: Path, vimh_source) -> None:
    old = vimh_source("vimh-8x8x3_old", variant="binary-v1")
    new = vimh_source("vimh-8x8x3_new", variant="binary")
    for src in (old, new):  # the JSON hint is removed: the layout must be detected
        info = json.loads((src / "vimh_dataset_info.json").read_text())
        del info["label_encoding"]
        (src / "vimh_dataset_info.json").write_text(json.dumps(info))
    assert convert("vimh", old, tmp_path / "a")["train"].schema.provenance.source_format == "vimh-binary-v1"
    assert convert("vimh", new, tmp_path / "b")["train"].schema.provenance.source_format == "vimh-binary"


def test_corrupt_json(tmp_path: Path, vimh_source) -> None:
    src = vimh_source()
    (src / "vimh_dataset_info.json").write_text('{"parameter_names": [')
    with pytest.raises(ConversionError, match=r"vimh_dataset_info.json: expected JSON, found unparsable text"):
        convert("vimh", src, tmp_path / "out")


def test_id_beyond_parameter_names_is_named_param_id(tmp_path: Path, vimh_source, caplog) -> None:
    src = vimh_source(n_heads=2)
    info = json.loads((src / "vimh_dataset_info.json").read_text())
    info["parameter_names"] = info["parameter_names"][:1]
    (src / "vimh_dataset_info.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        schema = convert("vimh", src, tmp_path / "out")["train"].schema
    assert schema.head_names == ("note_number", "param_1")
    assert "parameter id 1 is beyond parameter_names" in caplog.text


def test_dimension_disagreement_names_all_three(tmp_path: Path, vimh_source) -> None:
    src = vimh_source("vimh-8x8x3_dims")
    info = json.loads((src / "vimh_dataset_info.json").read_text())
    info.update(height=4, width=16, image_size="4x16x3")
    (src / "vimh_dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(ConversionError, match=r"disagree: directory name 'vimh-8x8x3_dims' says 8x8x3, "
                                              r".*vimh_dataset_info.json says 4x16x3, .*_batch says 8x8x3"):
        convert("vimh", src, tmp_path / "out")


def test_missing_json_gets_defaults_with_a_warning(tmp_path: Path, vimh_source, caplog) -> None:
    src = vimh_source()
    (src / "vimh_dataset_info.json").unlink()
    with caplog.at_level(logging.WARNING):
        schema = convert("vimh", src, tmp_path / "out")["train"].schema
    assert "vimh_dataset_info.json: missing; using defaults" in caplog.text
    assert schema.head_names == ("param_0", "param_1")
    assert [h.num_classes for h in schema.heads] == [256, 256]
    assert schema.image.shape_chw == (3, 8, 8)


def test_pickle_wins_over_binary_with_a_note(tmp_path: Path, vimh_source, caplog) -> None:
    src = vimh_source(variant="both")
    with caplog.at_level(logging.INFO):
        manifests = convert("vimh", src, tmp_path / "out")
    assert manifests["train"].schema.provenance.source_format == "vimh-pickle"
    assert "both train_batch and train exist; using the pickle" in caplog.text


def test_quantized_value_out_of_range(tmp_path: Path, vimh_source) -> None:
    src = vimh_source()
    edit_pickle(src / "test_batch", lambda b: b["vimh_labels"].__setitem__(5, [2, 0, 300, 1, 1]))
    with pytest.raises(ConversionError, match=r"test_batch: sample 5: quantized values must be 0..255, found \[300\]"):
        convert("vimh", src, tmp_path / "out")


def test_failed_run_leaves_earlier_output_untouched(tmp_path: Path, vimh_source) -> None:
    src = vimh_source()
    out = tmp_path / "out"
    convert("vimh", src, out, max_samples=16)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    data = np.asarray(pickle.loads((src / "test_batch").read_bytes())["data"])
    edit_pickle(src / "test_batch", lambda b: b["vimh_labels"].__setitem__(len(data) - 1, [0]))
    with pytest.raises(ConversionError, match=r"test_batch: sample 11: N = 0"):
        convert("vimh", src, out, max_samples=4)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(out.rglob(".staging"))
    assert validate(str(out), progress=False).ok


def test_non_identifier_names_are_made_identifiers(tmp_path: Path, vimh_source, caplog) -> None:
    src = vimh_source(n_heads=2)
    info = json.loads((src / "vimh_dataset_info.json").read_text())
    info["parameter_names"] = ["pedal-angle", "note number"]
    info["parameter_mappings"] = {"pedal-angle": {"min": 0, "max": 90, "step": 10, "description": "wah"}}
    (src / "vimh_dataset_info.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        schema = convert("vimh", src, tmp_path / "out")["train"].schema
    assert schema.head_names == ("pedal_angle", "note_number")
    assert schema.heads[0].description == "pedal-angle: wah" and schema.heads[0].num_classes == 10
    assert "no parameter_mappings entry for 'note number'" in caplog.text


def test_colliding_names_after_cleaning_are_an_error(tmp_path: Path, vimh_source) -> None:
    src = vimh_source(n_heads=2)
    info = json.loads((src / "vimh_dataset_info.json").read_text())
    info["parameter_names"] = ["a-b", "a b"]
    (src / "vimh_dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(ConversionError, match=r"heads: expected unique head names, found \['a_b'\]"):
        convert("vimh", src, tmp_path / "out")


class _RunsCode:
    """A pickle payload that would create ``marker`` when unpickled by a plain unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_source_pickle_that_would_run_code_is_refused(tmp_path: Path, vimh_source) -> None:
    """Source files are hostile too: unpickling builds only plain data and numpy arrays."""
    src = vimh_source()
    marker = tmp_path / "ran"
    (src / "train_batch").write_bytes(pickle.dumps({"data": _RunsCode(marker), "vimh_labels": []}))
    with pytest.raises(ConversionError, match=r"train_batch: expected a VIMH pickle, found a truncated or corrupt "
                                              r"file \(UnpicklingError: refused to load pathlib.Path"):
        convert("vimh", src, tmp_path / "out")
    assert not marker.exists()
