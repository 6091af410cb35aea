"""A run's configs as plain data: what ``train`` saves in every checkpoint, and the configs
``evaluate`` rebuilds the run from (the saved ones, then the command line's).

Saved: the resolved ``model`` and ``data`` configs as dicts, lists, strings and numbers (they
load with ``torch.load(weights_only=True)``), without ``storage_options`` (credentials stay
out of checkpoints). Read back: every ``_target_`` a checkpoint names must be a class of this
project's kinds (module, backbone, optimizer, scheduler, datamodule, transform) from
``training.``, ``torch.optim.`` or ``torchvision.transforms.``, so a checkpoint from elsewhere
cannot make evaluation call anything else.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline import CheckpointError, ConfigError

SECRET_KEYS = frozenset({"storage_options"})
SAFE_MODULES = ("training.", "torch.optim.", "torchvision.transforms.")
SAFE_KINDS = (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, L.LightningDataModule)
DATAMODULE = "training.datamodule.MultiheadDataModule"


def plain(node: Any) -> Any:
    """``node`` (an OmegaConf container or plain data) as resolved plain data."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node


def without_secrets(value: Any) -> Any:
    """``value`` with every ``storage_options`` entry left out, at any depth."""
    if isinstance(value, Mapping):
        return {k: without_secrets(v) for k, v in value.items() if k not in SECRET_KEYS}
    if isinstance(value, list | tuple):
        return [without_secrets(v) for v in value]
    return value


def saved_config(model: Any, data: Any) -> dict[str, Any]:
    """What a checkpoint keeps of the run: its resolved model and data configs."""
    return {"model": plain(model), "data": without_secrets(plain(data))}


def _locate(target: str) -> Any:
    """The object ``target`` names, or None if there is none."""
    try:
        return get_object(target)
    except (ImportError, AttributeError, ValueError):
        return None


def check_targets(config: Any, path: str, where: str) -> None:
    """CheckpointError unless every ``_target_`` in ``config`` (from checkpoint ``path``) names
    a class of a safe kind in a safe module."""
    if isinstance(config, list):
        for i, item in enumerate(config):
            check_targets(item, path, f"{where}[{i}]")
        return
    if not isinstance(config, Mapping):
        return
    target = config.get("_target_")
    if target is not None:
        found = _locate(target) if isinstance(target, str) and target.startswith(SAFE_MODULES) else None
        if not (inspect.isclass(found) and issubclass(found, SAFE_KINDS)):
            raise CheckpointError(f"{path}: {where}._target_: expected a module, backbone, optimizer, scheduler, "
                                  f"datamodule or transform class from {', '.join(SAFE_MODULES)}, found {target!r}; "
                                  "if you trust the checkpoint, give that config on the command line")
    for key, value in config.items():
        check_targets(value, path, f"{where}.{key}")


def eval_data_config(saved: Mapping[str, Any] | None, given: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The run's data config with the settings ``given`` on the command line (not None) in place
    of its own. A checkpoint without a saved data config (older runs): a MultiheadDataModule
    on ``given`` alone."""
    base = dict(saved) if saved else {"_target_": DATAMODULE}
    given = {k: v for k, v in (plain(given) or {}).items() if v is not None}
    check_targets({k: v for k, v in base.items() if k not in given}, path, "data")  # the command line is trusted
    target = given.get("_target_", base.get("_target_"))
    found = _locate(target) if isinstance(target, str) else None
    if not inspect.isclass(found):
        raise CheckpointError(f"{path}: data._target_: expected a datamodule class, found {target!r}")
    accepted = set(inspect.signature(found).parameters) | {"_target_"}
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise ConfigError(f"data: {unknown}: the run's datamodule {target} has no such setting; "
                          f"expected some of {sorted(accepted)}")
    merged = {**base, **given}
    if "train" not in merged and "sources" not in merged:
        raise CheckpointError(f"{path}: the checkpoint does not say where its data is (no saved data config): "
                              "expected data.train=... on the command line")
    return merged


def eval_model_config(saved: Mapping[str, Any] | None, chosen: Any, path: str) -> dict[str, Any]:
    """The model config ``model=<name>`` chose on the command line, else the run's own."""
    if chosen is not None:
        return dict(plain(chosen))
    if not saved:
        raise CheckpointError(f"{path}: the checkpoint holds no model config (saved before runs kept theirs): "
                              "expected model=<the run's model config> and the run's model.* overrides")
    config = dict(saved)
    check_targets(config, path, "model")
    return config
