"""Reading this project's Lightning checkpoints safely: tensors and plain data only.

Checkpoints are read with ``torch.load(weights_only=True)``: it unpickles tensors, dicts,
lists, tuples, strings and numbers and refuses every other object, so a checkpoint from
elsewhere cannot run code when it is loaded. Everything a ``MultiheadModule`` checkpoint
holds is of those kinds (weights; optimizer, scheduler, loop, callback and datamodule state;
the hyperparameters: the dataset schema, the model's input image and the run's resolved
model and data configs as dicts), so no class is added to torch's allowed globals. The
trainer passes ``weights_only=True`` to Lightning's own loading (``fit``/``test``) too.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import fsspec
import torch

from pipeline import CheckpointError, DatasetSchema, ImageSpec, SchemaError

# what torch.load raises on files that are not (whole) checkpoints: truncated, corrupt, not PyTorch files
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, struct.error)


def _refusal(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only error that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line]
    return lines[0] if lines else str(error).splitlines()[0]


def load_checkpoint(path: str) -> dict[str, Any]:
    """A MultiheadModule checkpoint (local path or fsspec URL), loaded on the CPU without
    running any code it may contain; CheckpointError (a PipelineError) naming ``path``
    if it is not one."""
    try:
        with fsspec.open(path, "rb") as f:
            checkpoint = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: expected a checkpoint of tensors and plain data (read with "
                              f"torch.load(weights_only=True), which runs no code), found other objects or "
                              f"bytes that are not a checkpoint: {_refusal(e)}") from e
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: expected a checkpoint file, found no such file") from e
    except _UNREADABLE as e:
        raise CheckpointError(f"{path}: expected a PyTorch Lightning checkpoint, found a file that cannot be read "
                              f"as one (truncated or not a checkpoint): {type(e).__name__}: {e}") from e
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "schema" not in hparams or "state_dict" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: expected a checkpoint of a MultiheadModule (state_dict and "
                              f"hyper_parameters.schema), found {found}")
    return checkpoint


def checkpoint_schema(checkpoint: dict[str, Any], path: str) -> DatasetSchema:
    """The schema the checkpoint's model was built for."""
    try:
        return DatasetSchema.from_dict(checkpoint["hyper_parameters"]["schema"])
    except SchemaError as e:
        raise SchemaError(f"{path}: hyper_parameters.schema: {e}") from e


def checkpoint_image(checkpoint: dict[str, Any]) -> ImageSpec | None:
    """The images the model was trained on (after the data's transforms); None in
    checkpoints saved before it was recorded."""
    image = checkpoint["hyper_parameters"].get("image")
    return ImageSpec(image["height"], image["width"], image["channels"]) if isinstance(image, dict) else None


def checkpoint_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The run's resolved model and data configs (``{"model": ..., "data": ...}``, plain data);
    empty in checkpoints saved before they were recorded."""
    config = checkpoint["hyper_parameters"].get("config")
    return dict(config) if isinstance(config, dict) else {}
