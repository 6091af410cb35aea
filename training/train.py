"""Hydra entry point: ``train experiment=vimh_cnn data.train=s3://bucket/vimh`` (also
``python -m training.train``).

Builds the datamodule first (its schema comes from the shard headers), then the model from
that schema, then the trainer; fits, tests, and prints every head's metrics. The model keeps
the run's resolved model and data configs in its hyperparameters, so every checkpoint can be
evaluated on its own (``evaluate ckpt_path=...``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from pipeline import PipelineError
from pipeline.format.schema import check_same_heads
from training.checkpoints import checkpoint_schema, load_checkpoint
from training.notices import quiet_library_notices
from training.run_config import saved_config

log = logging.getLogger(__name__)
# the config tree ships inside the package (training/configs links to configs/), so every
# install finds it from every working directory
CONFIG_PATH = "pkg://training.configs"


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, letting our own errors through unwrapped, so that bad input
    reads as what it is (a missing dataset, heads that do not match), not as a config error."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, PipelineError):
            raise e.__cause__ from e
        raise


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Every ``_target_`` entry of a config group (callbacks, loggers)."""
    return [instantiate(c) for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def head_metrics(metrics: dict[str, Any], stage: str) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if k.startswith(f"{stage}/") and
            (k.endswith("_acc") or k.endswith("_mae"))}


def report(metrics: dict[str, float]) -> str:
    lines = [f"  {name:<36} {value:8.4f}" for name, value in metrics.items()]
    return "per-head metrics:\n" + "\n".join(lines)


def train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    if cfg.get("ckpt_path"):
        path = str(cfg.ckpt_path)
        check_same_heads(checkpoint_schema(load_checkpoint(path), path), datamodule.schema,
                         f"dataset {datamodule.schema.name!r}", "the checkpoint")
    model = instantiate(cfg.model, _partial_=True)(schema=datamodule.schema, image=datamodule.input_image,
                                                   config=saved_config(cfg.model, cfg.data))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")),
                                                 logger=instantiate_all(cfg.get("logger")) or False)
    log.info("dataset %s: heads %s", datamodule.schema.name,
             ", ".join(f"{h.name} ({h.num_classes})" for h in datamodule.schema.heads))
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test", False) and not trainer.fast_dev_run:  # type: ignore[attr-defined]
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    stage = "test" if any(k.startswith("test/") for k in metrics) else "val"
    if trainer.is_global_zero and head_metrics(metrics, stage):
        print(report(head_metrics(metrics, stage)))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_library_notices()
    try:
        metrics = train(cfg)
    except PipelineError as e:
        log.error("%s", e)
        sys.exit(2)
    return metrics.get(cfg.get("optimized_metric", ""))


if __name__ == "__main__":
    main()
