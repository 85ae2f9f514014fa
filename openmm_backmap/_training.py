"""Training bookkeeping shared by the trainers: CSV logs and atomically written checkpoints."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Optional

import torch


def write_log(path: Optional[Path], history: list[dict[str, float]]) -> None:
    """Rewrite the CSV log ``path`` with one row per epoch (nothing if ``path`` is None or there is no row)."""
    if path is None or not history:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def save_checkpoint(path: Optional[Path], model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    best_state: dict, best: float, stale: int, epoch: int, history: list[dict[str, float]]) -> None:
    """Write the training state to ``path`` atomically (temporary file + rename); nothing if ``path`` is None.
    Tensors and plain lists only, so it is read back with ``torch.load(weights_only=True)``."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(history[0]) if history else []
    state = {"model": model.state_dict(), "best_model": best_state, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "best": best, "stale": stale, "epoch": epoch,
             "history_keys": keys, "history": [[row[k] for k in keys] for row in history]}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
