"""Modalities: what one example looks like, and how it becomes a sequence of tokens.

A *spec* is a typed description of one example (shapes, patch size, vocabulary). A *tokenizer*
is the only modality-specific part of the model: it embeds a batch into B × N × D tokens, gives
the reconstruction targets, maps the decoder's output back to predictions, scores them per token,
and knows the fixed sin-cos positions and the neighbourhood of the token grid (MetaMAE's support
set adds hidden tokens next to visible ones).
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

Batch = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

def _check_patch(name: str, size: int, patch: int) -> None:
    if patch < 1 or size % patch:
        raise ValueError(f"patch {patch} does not divide {name} {size}: choose a patch size "
                         f"that divides it (divisors: {[d for d in range(1, size + 1) if size % d == 0]})")


@dataclass(frozen=True)
class TimeSeriesSpec:
    """C × L sensor channels, cut into 1-D patches of `patch` steps (PAMAP2: 52 × 320, patch 5)."""
    channels: int
    length: int
    patch: int
    kind: ClassVar[str] = "timeseries"

    def __post_init__(self):
        _check_patch("length", self.length, self.patch)

    @property
    def shape(self) -> tuple[int, ...]:                    # one example's
        return self.channels, self.length

    def tokenizer(self, enc_width: int, dec_width: int) -> Tokenizer:
        return Patches1d(self.channels, self.length, self.patch, enc_width, dec_width)


@dataclass(frozen=True)
class TabularSpec:
    """1 × F features, one token per feature (HIGGS: F = 28)."""
    features: int
    kind: ClassVar[str] = "tabular"

    @property
    def shape(self) -> tuple[int, ...]:
        return 1, self.features

    def tokenizer(self, enc_width: int, dec_width: int) -> Tokenizer:
        return Patches1d(1, self.features, 1, enc_width, dec_width)


@dataclass(frozen=True)
class TokenSpec:
    """L integer tokens over a vocabulary of V (Genomics: V = 4, L = 250; Pfam: V = 26, L = 128)."""
    vocab: int
    length: int
    kind: ClassVar[str] = "tokens"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.length,)

    def tokenizer(self, enc_width: int, dec_width: int) -> Tokenizer:
        return Tokens(self.vocab, self.length, enc_width, dec_width)


@dataclass(frozen=True)
class ImageSpec:
    """C × H × W images or spectrograms, cut into square patches (ImageNet32: 3 × 32 × 32, patch 4)."""
    channels: int
    height: int
    width: int
    patch: int
    kind: ClassVar[str] = "image"

    def __post_init__(self):
        _check_patch("height", self.height, self.patch)
        _check_patch("width", self.width, self.patch)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.channels, self.height, self.width

    def tokenizer(self, enc_width: int, dec_width: int) -> Tokenizer:
        return Patches2d(self.channels, self.height, self.width, self.patch, enc_width, dec_width)


@dataclass(frozen=True)
class ImageTextSpec:
    """An image and a caption or question, one token sequence: image patches, then text tokens."""
    image: ImageSpec
    text: TokenSpec
    kind: ClassVar[str] = "image_text"

    def tokenizer(self, enc_width: int, dec_width: int) -> Tokenizer:
        return ImageText(self.image.tokenizer(enc_width, dec_width),
                         self.text.tokenizer(enc_width, dec_width))


Spec = Union[TimeSeriesSpec, TabularSpec, TokenSpec, ImageSpec, ImageTextSpec]
SPECS: dict[str, type] = {s.kind: s for s in (TimeSeriesSpec, TabularSpec, TokenSpec, ImageSpec, ImageTextSpec)}


def spec_parts(spec: Spec) -> tuple[Spec, ...]:
    """The single-input specs a batch of `spec` is made of: (image, text) for image+text."""
    return (spec.image, spec.text) if isinstance(spec, ImageTextSpec) else (spec,)


def to_device(x: Batch, device) -> Batch:
    """A batch (a tensor, or a tuple (image, text)) on `device`."""
    return tuple(part.to(device) for part in x) if isinstance(x, tuple) else x.to(device)


def check_batch(spec: Spec, x: Batch) -> None:
    """Raise ValueError, naming both, when a batch's examples are not the shape the spec says."""
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    expected = [part.shape for part in spec_parts(spec)]
    if len(parts) != len(expected) or any(tuple(p.shape[1:]) != shape for p, shape in zip(parts, expected)):
        raise ValueError(f"a batch of shape {' and '.join(str(tuple(p.shape)) for p in parts)} does not fit the "
                         f"{spec.kind} input {spec}, whose examples are {' and '.join(map(str, expected))}")


def spec_from_dict(d: dict[str, Any]) -> Spec:
    """{'kind': 'timeseries', 'channels': 52, ...} -> TimeSeriesSpec; names a wrong key or kind."""
    if not isinstance(d, Mapping):
        raise ValueError(f"input is {d!r}; expected a mapping such as {{kind: image, channels: 3, height: 32, "
                         f"width: 32, patch: 4}} (set dataset.input, or dataset.path for a prepared folder)")
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in SPECS:
        raise ValueError(f"input.kind is {kind!r}; expected one of {sorted(SPECS)}")
    cls = SPECS[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = set(d) - fields, fields - set(d)
    if unknown or missing:
        raise ValueError(f"input of kind {kind!r} takes exactly {sorted(fields)}; "
                         f"unknown: {sorted(unknown)}, missing: {sorted(missing)}")
    if cls is ImageTextSpec:
        return ImageTextSpec(image=spec_from_dict({"kind": "image", **d["image"]}),
                             text=spec_from_dict({"kind": "tokens", **d["text"]}))
    for key, value in d.items():
        whole = isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()
        if not whole or value < 1:
            raise ValueError(f"input.{key} is {value!r}; expected a positive whole number")
    return cls(**{k: int(v) for k, v in d.items()})


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    return {"kind": spec.kind, **dataclasses.asdict(spec)}


# --------------------------------------------------------------------------------------------
# Fixed sin-cos positions (computed in float64, stored as float32; the cls row is all zeros)
# --------------------------------------------------------------------------------------------

def sincos_1d(width: int, positions: np.ndarray) -> np.ndarray:
    """M positions -> M × width: [sin(n ω), cos(n ω)], ω_i = 10000^(-i / (width/2))."""
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)           # M × width/2
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(width: int, rows: int, cols: int) -> np.ndarray:
    """Row-major grid -> (rows·cols) × width: first half encodes the column, second half the row."""
    row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.concatenate([sincos_1d(width // 2, col.ravel()), sincos_1d(width // 2, row.ravel())], axis=1)


def with_cls_row(table: np.ndarray) -> torch.Tensor:
    """N × width -> 1 × (1+N) × width float32, a zero row in front for the cls token."""
    table = np.concatenate([np.zeros((1, table.shape[1])), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


# --------------------------------------------------------------------------------------------
# Neighbourhoods: nearby = visible, or a visible neighbour (zero padding at the borders)
# --------------------------------------------------------------------------------------------

def nearby_1d(visible: torch.Tensor) -> torch.Tensor:
    """B × N bool -> B × N bool: visible, or the left or right neighbour is visible."""
    none = torch.zeros_like(visible[:, :1])
    left = torch.cat([none, visible[:, :-1]], dim=1)
    right = torch.cat([visible[:, 1:], none], dim=1)
    return visible | left | right


def nearby_2d(visible: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """B × (rows·cols) bool, row-major -> same: visible, or a visible 4-neighbour on the grid."""
    grid = visible.view(-1, rows, cols)
    padded = F.pad(grid, (1, 1, 1, 1))                                # B × (rows+2) × (cols+2)
    near = (grid | padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1]          # up, down
            | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:])              # left, right
    return near.reshape(visible.shape)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

class Tokenizer(nn.Module):
    """The modality-specific ends of the model. N = num_tokens."""
    num_tokens: int
    neighbours: int                                           # the most tokens nearby() adds per visible one

    def embed(self, x: Batch) -> torch.Tensor:                # -> B × N × D
        raise NotImplementedError

    def targets(self, x: Batch) -> Batch:                     # what reconstruct() should predict
        raise NotImplementedError

    def reconstruct(self, h: torch.Tensor) -> Batch:          # B × N × D' -> predictions
        raise NotImplementedError

    def token_loss(self, pred: Batch, target: Batch) -> torch.Tensor:   # -> B × N
        raise NotImplementedError

    def positions(self, width: int) -> torch.Tensor:          # -> 1 × (1+N) × width
        raise NotImplementedError

    def nearby(self, visible: torch.Tensor) -> torch.Tensor:  # B × N bool -> B × N bool
        raise NotImplementedError

    def init_weights(self) -> None:                           # the published initialisation of its layers
        raise NotImplementedError


def _xavier_patch_init(proj: nn.Module) -> None:
    """The patch/token embedding is initialised like a linear layer (Xavier-uniform)."""
    w = proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))


class Patches1d(Tokenizer):
    """B × C × L -> B × (L/p) × D with a strided Conv1d; targets flatten a patch as j·C + c."""
    neighbours = 2

    def __init__(self, channels: int, length: int, patch: int, enc_width: int, dec_width: int):
        super().__init__()
        self.channels, self.patch, self.num_tokens = channels, patch, length // patch
        self.proj = nn.Conv1d(channels, enc_width, kernel_size=patch, stride=patch)
        self.head = nn.Linear(dec_width, patch * channels)

    def init_weights(self) -> None:
        _xavier_patch_init(self.proj)

    def embed(self, x):
        return self.proj(x).transpose(1, 2)                             # B × N × D

    def targets(self, x):
        B, C, _ = x.shape
        x = x.reshape(B, C, self.num_tokens, self.patch)                # B × C × N × p
        return x.permute(0, 2, 3, 1).reshape(B, self.num_tokens, -1)    # B × N × (p·C)

    def reconstruct(self, h):
        return self.head(h)                                             # B × N × (p·C)

    def token_loss(self, pred, target):
        return (pred - target).pow(2).mean(dim=-1)                      # B × N

    def positions(self, width):
        return with_cls_row(sincos_1d(width, np.arange(self.num_tokens)))

    def nearby(self, visible):
        return nearby_1d(visible)


class Patches2d(Tokenizer):
    """B × C × H × W -> B × (H/p · W/p) × D, row-major; targets flatten a patch as (i·p + j)·C + c."""
    neighbours = 4

    def __init__(self, channels: int, height: int, width: int, patch: int, enc_width: int, dec_width: int):
        super().__init__()
        self.channels, self.patch = channels, patch
        self.rows, self.cols = height // patch, width // patch
        self.num_tokens = self.rows * self.cols
        self.proj = nn.Conv2d(channels, enc_width, kernel_size=patch, stride=patch)
        self.head = nn.Linear(dec_width, patch * patch * channels)

    def init_weights(self) -> None:
        _xavier_patch_init(self.proj)

    def embed(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                  # B × N × D

    def targets(self, x):
        B, C, p = x.shape[0], self.channels, self.patch
        x = x.reshape(B, C, self.rows, p, self.cols, p)                 # B × C × h × p × w × p
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, self.num_tokens, -1)  # B × N × (p²·C)

    def reconstruct(self, h):
        return self.head(h)

    def token_loss(self, pred, target):
        return (pred - target).pow(2).mean(dim=-1)

    def positions(self, width):
        return with_cls_row(sincos_2d(width, self.rows, self.cols))

    def nearby(self, visible):
        return nearby_2d(visible, self.rows, self.cols)


class Tokens(Tokenizer):
    """B × L integer tokens -> B × L × D by an embedding table; logits tied to that table."""
    neighbours = 2

    def __init__(self, vocab: int, length: int, enc_width: int, dec_width: int):
        super().__init__()
        self.vocab, self.num_tokens = vocab, length
        self.proj = nn.Embedding(vocab, enc_width)
        self.head = nn.Linear(dec_width, enc_width)

    def init_weights(self) -> None:
        nn.init.xavier_uniform_(self.proj.weight)

    def embed(self, x):
        return self.proj(x)                                             # B × L × D

    def targets(self, x):
        return x                                                        # B × L token ids

    def reconstruct(self, h):
        return self.head(h) @ self.proj.weight.t()                      # B × L × V logits

    def token_loss(self, pred, target):
        return F.cross_entropy(pred.transpose(1, 2), target, reduction="none")   # B × L

    def positions(self, width):
        return with_cls_row(sincos_1d(width, np.arange(self.num_tokens)))

    def nearby(self, visible):
        return nearby_1d(visible)


class ImageText(Tokenizer):
    """(image, text) -> image patches then text tokens in one sequence, each with its own head.

    Not in the published code (it leaves vision-language out). Text positions continue the
    numbering after the image's tokens so that no text position repeats an image position, and
    neighbourhoods do not cross from image to text.
    """

    def __init__(self, image: Patches2d, text: Tokens):
        super().__init__()
        self.image, self.text = image, text
        self.num_tokens = image.num_tokens + text.num_tokens
        self.neighbours = max(image.neighbours, text.neighbours)

    def init_weights(self) -> None:
        self.image.init_weights()
        self.text.init_weights()

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t[:, :self.image.num_tokens], t[:, self.image.num_tokens:]

    def embed(self, x):
        image, text = x
        return torch.cat([self.image.embed(image), self.text.embed(text)], dim=1)   # B × N × D

    def targets(self, x):
        image, text = x
        return self.image.targets(image), self.text.targets(text)

    def reconstruct(self, h):
        h_image, h_text = self._split(h)
        return self.image.reconstruct(h_image), self.text.reconstruct(h_text)

    def token_loss(self, pred, target):
        return torch.cat([self.image.token_loss(pred[0], target[0]),
                          self.text.token_loss(pred[1], target[1])], dim=1)          # B × N

    def positions(self, width):
        image = sincos_2d(width, self.image.rows, self.image.cols)
        text = sincos_1d(width, self.image.num_tokens + np.arange(self.text.num_tokens))
        return with_cls_row(np.concatenate([image, text], axis=0))

    def nearby(self, visible):
        v_image, v_text = self._split(visible)
        return torch.cat([self.image.nearby(v_image), self.text.nearby(v_text)], dim=1)
