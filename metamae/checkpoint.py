"""A checkpoint file (RUN/checkpoint_<step>/checkpoint.pt): model, optimizer, step, config and library version.

Written atomically (a temporary file in the same folder, then a rename), so a crash never leaves
a half-written checkpoint; read with `torch.load(weights_only=True)`, which runs no pickled code.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import torch

from metamae import __version__
from metamae.files import atomic_file
from metamae.modality import spec_from_dict
from metamae.model import MetaMAE, ModelConfig, ObjectiveConfig

FILENAME = "checkpoint.pt"


def save_checkpoint(path: Path, model: MetaMAE, optimizer: Optional[torch.optim.Optimizer], step: int,
                    config: dict[str, Any], **extra: Any) -> Path:
    """`config` holds plain values: {'dataset': {...}, 'model': {...}, 'objective': {...}, ...};
    `extra` plain values a trainer needs to resume (the best probe so far, ...)."""
    payload = {"model": model.state_dict(), "step": step, "config": config, "version": __version__,
               "optimizer": optimizer.state_dict() if optimizer is not None else None,
               "torch_rng": torch.get_rng_state(), **extra}
    serialized = io.BytesIO()            # whole before a byte is written: a full disk is then a plain OSError
    torch.save(payload, serialized)
    with atomic_file(path) as f:
        f.write(serialized.getbuffer())
    return Path(path)


def latest_in(folder: Path) -> Path:
    """A run folder's checkpoint: its own checkpoint.pt where there is one (a run of an earlier version
    of the plain loop), else its newest checkpoint_* folder's."""
    saved = sorted(folder.glob(f"checkpoint_*/{FILENAME}"), key=lambda p: p.parent.name)
    return folder / FILENAME if (folder / FILENAME).is_file() or not saved else saved[-1]


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = latest_in(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass the checkpoint file or the run folder holding "
                                f"{FILENAME}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        raise ValueError(f"checkpoint {path} could not be read ({reason[:200]}); it may be truncated or not a "
                         f"MetaMAE checkpoint") from error


def model_from_checkpoint(checkpoint: dict[str, Any]) -> MetaMAE:
    """Rebuild the model a checkpoint was saved from, with its weights."""
    config = checkpoint["config"]
    model = MetaMAE(spec_from_dict(config["dataset"]["input"]), ModelConfig(**config["model"]),
                    ObjectiveConfig(**config["objective"]))
    model.load_state_dict(checkpoint["model"])
    return model
