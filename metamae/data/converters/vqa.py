"""VQA (DABS captioned images, transfer): is the shown answer the right answer to the question on this image?

Raw files, as visualqa.org (VQA v1, real images) and cocodataset.org publish them (into RAW); an
archive is unpacked on first use when what it holds is missing:
    Questions_{Train,Val}_mscoco.zip   -> MultipleChoice_mscoco_{train,val}2014_questions.json
    Annotations_{Train,Val}_mscoco.zip -> mscoco_{train,val}2014_annotations.json
    train2014.zip, val2014.zip         -> {train,val}2014/COCO_{train,val}2014_<image id, 12 digits>.jpg

DABS's task, followed here (alextamkin/dabs src/datasets/captioned_images/vqa.py):
- splits: train2014 -> train, val2014 -> test; one candidate example per annotated question, in the
  annotation file's order.
- answer: the annotation's `multiple_choice_answer`; a question whose answer is not among its 18
  `multiple_choices` is dropped. With probability 1/2 the answer is swapped for another of the
  question's choices (label 0), otherwise kept (label 1): a binary answer-verification task over
  every question type, not a yes/no-question subset. DABS draws from Python's unseeded `random`;
  here each split draws from random.Random(42), so the dataset is reproducible.
- text: BERT pair encoding `[CLS] question [SEP] answer [SEP]`, 32 tokens; here text.py's vocabulary,
  built from the train split's questions and shown answers, written as vocab.json.
- image: MSCOCO's transform (mscoco.coco_image): 3 × 224 × 224 float32 in [0, 1], no normalization.
  DABS looks the file name up in captions_{split}2014.json; it is COCO_{split}2014_<id:012d>.jpg,
  so that 240 MB annotation archive is not needed here.
VQA v2 has no multiple-choice questions, so this task needs the v1 question files.
"""
from __future__ import annotations

import random
from pathlib import Path

from metamae.data.converters.mscoco import COCO, IMAGE, SPEC, Example, read_json, write_split
from metamae.data.converters.text import Vocab
from metamae.data.download import Source, raw_path
from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, ShardWriter

VQA_V1 = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"
SPLITS = {"train": "train2014", "test": "val2014"}
QUESTIONS = {"train2014": Source(f"{VQA_V1}/Questions_Train_mscoco.zip", "Questions_Train_mscoco.zip"),
             "val2014": Source(f"{VQA_V1}/Questions_Val_mscoco.zip", "Questions_Val_mscoco.zip")}
ANSWERS = {"train2014": Source(f"{VQA_V1}/Annotations_Train_mscoco.zip", "Annotations_Train_mscoco.zip"),
           "val2014": Source(f"{VQA_V1}/Annotations_Val_mscoco.zip", "Annotations_Val_mscoco.zip")}
IMAGES = {"train2014": Source(f"{COCO}/zips/train2014.zip", "train2014.zip"),
          "val2014": Source(f"{COCO}/zips/val2014.zip", "val2014.zip")}
SOURCES = [*QUESTIONS.values(), *ANSWERS.values(), *IMAGES.values()]
SWAP_SEED = 42


def questions(path: Path) -> dict[int, tuple[str, list[str]]]:
    """MultipleChoice_*_questions.json -> question id -> (question, its multiple choices)."""
    try:
        return {q["question_id"]: (q["question"], q["multiple_choices"]) for q in read_json(path)["questions"]}
    except KeyError as error:
        raise ValueError(f"{path} lacks {error}: DABS's VQA task needs VQA v1's multiple-choice questions "
                         f"(MultipleChoice_mscoco_*2014_questions.json from {VQA_V1}/Questions_*_mscoco.zip, "
                         f"listed at visualqa.org/vqa_v1_download.html); VQA v2 has no multiple choices") from error


def vqa_examples(raw: Path, subset: str) -> list[Example]:
    asked = questions(raw_path(raw, f"MultipleChoice_mscoco_{subset}_questions.json", QUESTIONS[subset], "vqa"))
    path = raw_path(raw, f"mscoco_{subset}_annotations.json", ANSWERS[subset], "vqa")
    folder = raw_path(raw, subset, IMAGES[subset], "vqa")
    rng = random.Random(SWAP_SEED)
    examples = []
    try:
        for annotation in read_json(path)["annotations"]:
            question_id, answer = annotation["question_id"], annotation["multiple_choice_answer"]
            question, choices = asked[question_id]
            if answer not in choices:
                continue
            label = 1
            if rng.random() < 0.5:                                   # DABS's _static_swap
                answer, label = rng.choice([c for c in choices if c != answer]), 0
            image = folder / f"COCO_{subset}_{annotation['image_id']:012d}.jpg"
            examples.append(Example(question_id, image, (question, answer), label))
    except KeyError as error:
        raise ValueError(f"{path} lacks {error}, or names a question its questions file does not: "
                         f"it is not the VQA v1 annotation file for {subset}") from error
    return examples


def convert(raw: Path, out: Path = Path("data/vqa"), shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False) -> Manifest:
    raw = Path(raw)
    splits = {split: vqa_examples(raw, subset) for split, subset in SPLITS.items()}
    vocab = Vocab.build(text for e in splits["train"] for text in e.texts)
    params = {
        "source": "VQA v1 real images, multiple choice (visualqa.org) + COCO 2014 images",
        "dabs": "alextamkin/dabs src/datasets/captioned_images/vqa.py", "splits": SPLITS, "ids": "VQA question id",
        "task": "label 1: the annotation's multiple_choice_answer is shown; label 0: it was swapped (probability "
                "1/2) for another of the question's multiple choices; questions whose answer is not a choice dropped",
        "swap_seed": SWAP_SEED, "text": "[CLS] question [SEP] answer [SEP]", "image": IMAGE, **vocab.describe(),
    }
    writer = ShardWriter(out, "vqa", SPEC, num_classes=2, metric="binary_accuracy", converter=params,
                         shard_bytes=shard_bytes, overwrite=overwrite)
    vocab.save(out)
    for split, examples in splits.items():
        write_split(writer, split, examples, vocab)
    return writer.finish()
