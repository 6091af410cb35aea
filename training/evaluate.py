"""``evaluate ckpt_path=... [split=test|val|train] [data.train=...]`` (also ``python -m
training.evaluate``): evaluates a checkpoint through Lightning's ``trainer.test`` and writes
a confusion-matrix PNG per head and ``metrics.json`` into the run directory.

Everything is rebuilt from what the run saved in the checkpoint: the model (backbone
included) from its model config and input image, the datamodule (data location, splits,
decode settings) from its data config; ``data.*`` keys given on the command line replace
the run's values. The checkpoint is read once, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from pipeline import CheckpointError, ConfigError, DatasetSchema, ImageSpec, PipelineError, SchemaError
from pipeline.format.schema import check_same_heads
from training.checkpoints import checkpoint_config, checkpoint_image, checkpoint_schema, load_checkpoint
from training.confusion import ConfusionMatrices, plot_confusion
from training.module import MultiheadModule
from training.notices import quiet_library_notices
from training.run_config import eval_data_config, eval_model_config
from training.train import CONFIG_PATH, instantiate, instantiate_all

log = logging.getLogger(__name__)
SPLITS = ("test", "val", "train")


def check_same_image(trained: ImageSpec | None, data: ImageSpec, path: str) -> ImageSpec:
    """The images the model was trained on, which the data as configured must give."""
    if trained is None:
        return data
    if (trained.height, trained.width, trained.channels) != (data.height, data.width, data.channels):
        raise SchemaError(f"{path}: the model was trained on {trained.height}x{trained.width}x{trained.channels} "
                          f"images, the data as configured gives {data.height}x{data.width}x{data.channels}: "
                          "leave data.image_size to the checkpoint or set it to the training size")
    return trained


def load_weights(model: MultiheadModule, checkpoint: dict[str, Any], path: str) -> None:
    """The checkpoint's weights into ``model``; CheckpointError if they do not fit it."""
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model built from the run's model config: "
                              f"{' '.join(str(e).split())[:600]}") from e


def rebuild(cfg: DictConfig, checkpoint: dict[str, Any], path: str) -> tuple[MultiheadModule, Any]:
    """The run's model (with the checkpoint's weights) and datamodule, checked against each other."""
    saved = checkpoint_config(checkpoint)
    schema = checkpoint_schema(checkpoint, path)
    model_config = eval_model_config(saved.get("model"), cfg.get("model"), path)
    datamodule = instantiate(eval_data_config(saved.get("data"), cfg.data, path))
    check_same_heads(schema, datamodule.schema, f"dataset {datamodule.schema.name!r}", "the checkpoint")
    image = check_same_image(checkpoint_image(checkpoint), datamodule.input_image, path)
    model = instantiate(model_config, _partial_=True)(schema=schema, image=image, config=saved)
    load_weights(model, checkpoint, path)
    return model, datamodule


def summarize(schema: DatasetSchema, results: Mapping[str, float], counts: dict[str, Any], cfg: DictConfig,
              out_dir: Path | None) -> dict[str, Any]:
    """metrics.json's content; writes a confusion-matrix PNG per head into ``out_dir`` (None: on
    processes other than the first of a multi-process run)."""
    summary: dict[str, Any] = {"checkpoint": str(cfg.ckpt_path), "split": cfg.split, "dataset": schema.name,
                               "metrics": dict(sorted(results.items())), "heads": {}}
    for head in schema.heads:
        matrix = counts[head.name]
        samples = int(matrix.sum())
        accuracy = float(matrix.trace()) / samples if samples else float("nan")
        entry: dict[str, Any] = {"samples": samples, "accuracy": results.get(f"test/{head.name}_acc", accuracy)}
        if f"test/{head.name}_mae" in results:
            entry["mae"] = results[f"test/{head.name}_mae"]
        entry["confusion_png"] = f"confusion_{head.name}.png"
        if out_dir is not None:
            plot_confusion(matrix, head, f"{schema.name}: {head.name} ({cfg.split}, {samples} samples)",
                           out_dir / entry["confusion_png"])
        summary["heads"][head.name] = entry
    return summary


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates ``cfg.ckpt_path`` on ``cfg.split``; returns (and writes) the summary."""
    if cfg.split not in SPLITS:
        raise ConfigError(f"split: expected one of {list(SPLITS)}, found {cfg.split!r}")
    path = str(cfg.ckpt_path)
    checkpoint = load_checkpoint(path)
    model, datamodule = rebuild(cfg, checkpoint, path)
    loader = datamodule.eval_dataloader(cfg.split)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    confusion = ConfusionMatrices(model.schema)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[*instantiate_all(cfg.get("callbacks")), confusion],
                                     logger=False)
    results = trainer.test(model, dataloaders=loader, verbose=False)[0]
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(model.schema, results, confusion.counts, cfg, out_dir if trainer.is_global_zero else None)
    if trainer.is_global_zero:
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def report(summary: dict[str, Any]) -> str:
    lines = []
    for name, entry in summary["heads"].items():
        extra = f"  mae {entry['mae']:.4f}" if "mae" in entry else ""
        lines.append(f"{name:<24} acc {entry['accuracy']:.4f}{extra}  ({entry['samples']} samples)")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    quiet_library_notices()
    try:
        summary = evaluate(cfg)
    except PipelineError as e:
        log.error("%s", e)
        sys.exit(2)
    print(report(summary))
    print(f"summary -> {Path(cfg.paths.output_dir) / 'metrics.json'}")


if __name__ == "__main__":
    main()
