"""MSCOCO (DABS captioned images, pretraining): an image and one caption, labelled with 1 of 80 categories.

Raw files, as cocodataset.org publishes them (into RAW); an archive is unpacked on first use when
what it holds is missing:
    train2017.zip, val2017.zip        -> train2017/*.jpg, val2017/*.jpg
    annotations_trainval2017.zip      -> annotations/{captions,instances}_{train,val}2017.json

DABS's preprocessing, followed here (alextamkin/dabs src/datasets/captioned_images/mscoco.py):
- splits: train2017 -> train, val2017 -> test (DABS uses the 2017 release, not 2014).
- examples: every image with at least one instance annotation, in the order the caption file first
  lists them. Text: the caption the file lists LAST for the image (DABS keeps a dict image_id ->
  caption, so one of the ~5 captions survives). Label: a single class, the category of the instance
  annotation listed LAST for the image (also a dict), numbered in the order of the instance file's
  `categories` (80 classes) — not multi-label.
- image: RGB, torchvision Resize((640, 480)) (height 640, width 480: a stretch), CenterCrop(480),
  Resize((224, 224)), ToTensor: on PIL images that is PIL bilinear resizing, then / 255.
  3 × 224 × 224 float32 in [0, 1]; DABS applies no mean/std normalization here.
- text: BERT tokenizer, 32 tokens; here text.py's vocabulary, built from the train split's captions
  and written as vocab.json beside the manifest.

VQA reuses this module's image pipeline and writer (same COCO images, same DABS transform).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from metamae.data.converters.text import SEQ_LEN, VOCAB_SIZE, Vocab
from metamae.data.download import Source, raw_path
from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, ShardWriter
from metamae.modality import ImageSpec, ImageTextSpec, TokenSpec

COCO = "http://images.cocodataset.org"
IMAGES = {"train2017": Source(f"{COCO}/zips/train2017.zip", "train2017.zip"),
          "val2017": Source(f"{COCO}/zips/val2017.zip", "val2017.zip")}
ANNOTATIONS = Source(f"{COCO}/annotations/annotations_trainval2017.zip", "annotations_trainval2017.zip")
SOURCES = [*IMAGES.values(), ANNOTATIONS]
SPLITS = {"train": "train2017", "test": "val2017"}
CLASSES = 80
SPEC = ImageTextSpec(ImageSpec(3, 224, 224, 16), TokenSpec(VOCAB_SIZE, SEQ_LEN))
IMAGE = ("RGB; resize to 480 wide x 640 high (bilinear); centre crop 480 x 480; resize to 224 x 224 "
         "(bilinear); / 255: values in [0, 1], no mean/std normalization (DABS: ToTensor only)")
BATCH = 64
WORKERS = min(8, os.cpu_count() or 1)


class Example(NamedTuple):
    id: int                      # COCO image id (MSCOCO) or question id (VQA)
    image: Path
    texts: tuple[str, ...]       # (caption,) or (question, answer)
    label: int


# --------------------------------------------------------------------------------------------
# Raw files (shared with VQA)
# --------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the file is damaged; "
                         f"unpack or download it again") from error


def coco_image(path: Path) -> np.ndarray:
    """A COCO JPEG -> 3 × 224 × 224 float32 in [0, 1], DABS's transform."""
    bilinear = Image.Resampling.BILINEAR
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((480, 640), bilinear)          # Resize((640, 480)): W 480, H 640
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: its image folder is incomplete; unpack its zip again") from None
    except OSError as error:
        raise ValueError(f"{path} is not a readable image ({error}): unpack its zip again") from error
    image = image.crop((0, 80, 480, 560)).resize((224, 224), bilinear)         # CenterCrop(480), Resize(224)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)    # 3 × 224 × 224


def write_split(writer: ShardWriter, split: str, examples: list[Example], vocab: Vocab) -> None:
    """Decode and write in batches; an image shared by a batch's examples is decoded once."""
    with ThreadPoolExecutor(WORKERS) as pool:               # PIL releases the GIL to decode and resize
        for start in range(0, len(examples), BATCH):
            batch = examples[start:start + BATCH]
            paths = list(dict.fromkeys(e.image for e in batch))
            images = dict(zip(paths, pool.map(coco_image, paths)))
            x_image = np.stack([images[e.image] for e in batch])                # B × 3 × 224 × 224
            x_text = np.stack([vocab.encode(*e.texts) for e in batch])          # B × 32
            writer.add(split, (x_image, x_text), np.array([e.label for e in batch]),
                       ids=np.array([e.id for e in batch]))


# --------------------------------------------------------------------------------------------
# MSCOCO
# --------------------------------------------------------------------------------------------

def instances(path: Path) -> tuple[dict[int, int], dict[int, str], list[dict]]:
    """instances_*.json -> (image id -> label of its last-listed instance, image id -> file name, categories)."""
    data = read_json(path)
    try:
        categories = [{"id": c["id"], "name": c["name"]} for c in data["categories"]]
        label = {c["id"]: i for i, c in enumerate(categories)}
        labels = {a["image_id"]: label[a["category_id"]] for a in data["annotations"]}
        files = {i["id"]: i["file_name"] for i in data["images"]}
    except KeyError as error:
        raise ValueError(f"{path} lacks {error}: it is not a COCO instances file") from error
    if len(categories) != CLASSES:
        raise ValueError(f"{path} lists {len(categories)} categories; COCO's instances files list {CLASSES}")
    return labels, files, categories


def captions(path: Path) -> dict[int, str]:
    """captions_*.json -> image id -> the caption listed last for it (in first-listed image order)."""
    try:
        return {c["image_id"]: c["caption"] for c in read_json(path)["annotations"]}
    except KeyError as error:
        raise ValueError(f"{path} lacks {error}: it is not a COCO captions file") from error


def coco_examples(raw: Path, subset: str) -> tuple[list[Example], list[dict]]:
    labels, files, categories = instances(raw_path(raw, f"annotations/instances_{subset}.json", ANNOTATIONS, "mscoco"))
    text = captions(raw_path(raw, f"annotations/captions_{subset}.json", ANNOTATIONS, "mscoco"))
    folder = raw_path(raw, subset, IMAGES[subset], "mscoco")
    examples = [Example(i, folder / files[i], (caption,), labels[i]) for i, caption in text.items() if i in labels]
    return examples, categories


def convert(raw: Path, out: Path = Path("data/mscoco"), shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False) -> Manifest:
    raw = Path(raw)
    splits = {split: coco_examples(raw, subset) for split, subset in SPLITS.items()}
    vocab = Vocab.build(text for e in splits["train"][0] for text in e.texts)
    params = {
        "source": "COCO 2017 (cocodataset.org)", "dabs": "alextamkin/dabs src/datasets/captioned_images/mscoco.py",
        "splits": SPLITS, "ids": "COCO image id",
        "text": "the caption listed last for the image in captions_*.json",
        "label": "category of the instance annotation listed last for the image, in the order of 'categories'",
        "categories": splits["train"][1], "image": IMAGE, **vocab.describe(),
    }
    writer = ShardWriter(out, "mscoco", SPEC, num_classes=CLASSES, metric="accuracy", converter=params,
                         shard_bytes=shard_bytes, overwrite=overwrite)
    vocab.save(out)
    for split, (examples, _) in splits.items():
        write_split(writer, split, examples, vocab)
    return writer.finish()
