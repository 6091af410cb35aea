"""``python -m training.evaluate ckpt_path=... [experiment=...] [split=test]``: per-head metrics on
a split, a confusion-matrix PNG per head and a JSON summary in the run directory."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig

from pipeline.batching import value_key
from pipeline.errors import PipelineError
from training.module import MultiheadModule, check_same_heads
from training.train import checkpoint_schema, instantiate

matplotlib.use("Agg")
import matplotlib.pyplot as plt

log = logging.getLogger(__name__)


def predict(model: MultiheadModule, batches: Any) -> dict[str, dict[str, np.ndarray]]:
    """Per head: predicted and true classes (and real values for quantized heads)."""
    out: dict[str, dict[str, list[np.ndarray]]] = {h: {"pred": [], "true": [], "pred_value": [], "true_value": []}
                                                   for h in model.schema.head_names}
    model.eval()
    with torch.no_grad():
        for batch in batches:
            images, labels = batch[0], batch[1]
            outputs = model(images)
            for name, head in model.heads.items():
                classes, values = head.predict(outputs[name])  # type: ignore[operator]
                out[name]["pred"].append(classes.numpy())
                out[name]["true"].append(labels[name].numpy())
                if values is not None:
                    out[name]["pred_value"].append(values.numpy())
                    out[name]["true_value"].append(labels[value_key(name)].numpy())
    return {h: {k: np.concatenate(v) for k, v in cols.items() if v} for h, cols in out.items()}


def confusion(pred: np.ndarray, true: np.ndarray, classes: int) -> np.ndarray:
    keep = true >= 0
    return np.bincount(true[keep] * classes + pred[keep], minlength=classes * classes).reshape(classes, classes)


def plot_confusion(matrix: np.ndarray, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5))
    shown = ax.imshow(matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    fig.colorbar(shown, ax=ax, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    datamodule = instantiate(cfg.data)
    schema = checkpoint_schema(cfg.ckpt_path)
    check_same_heads(schema, datamodule.schema, "checkpoint")
    model = instantiate(cfg.model, _partial_=True)(schema=schema, image=datamodule.input_image)
    model.load_state_dict(torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False)["state_dict"])
    loaders = {"train": datamodule.train_dataloader, "val": datamodule.val_dataloader,
               "test": datamodule.test_dataloader}
    if cfg.split not in loaders:
        raise PipelineError(f"split: expected one of {sorted(loaders)}, found {cfg.split!r}")
    results = predict(model, loaders[cfg.split]())
    out_dir = Path(cfg.paths.output_dir)
    summary: dict[str, Any] = {"checkpoint": str(cfg.ckpt_path), "split": cfg.split, "dataset": schema.name,
                               "heads": {}}
    for head in schema.heads:
        r = results[head.name]
        keep = r["true"] >= 0
        entry = {"samples": int(keep.sum()), "accuracy": float((r["pred"][keep] == r["true"][keep]).mean())}
        if "pred_value" in r:
            entry["mae"] = float(np.abs(r["pred_value"][keep] - r["true_value"][keep]).mean())
        matrix = confusion(r["pred"], r["true"], head.num_classes)
        png = out_dir / f"confusion_{head.name}.png"
        plot_confusion(matrix, f"{schema.name}: {head.name} ({cfg.split})", png)
        entry["confusion_png"] = png.name
        summary["heads"][head.name] = entry
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, entry in summary["heads"].items():
        extra = f"  mae {entry['mae']:.4f}" if "mae" in entry else ""
        print(f"{name:<24} acc {entry['accuracy']:.4f}{extra}  ({entry['samples']} samples)")
    print(f"summary -> {out_dir / 'metrics.json'}")
    return summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except PipelineError as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
