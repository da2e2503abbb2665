"""The LibriSpeech, MSCOCO and VQA converters, on tiny raw files in each publisher's own layout."""
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
from PIL import Image

from metamae.data.converters import librispeech, mscoco, vqa
from metamae.data.converters.text import CLS, PAD, SEP, UNK, VOCAB_FILE, Vocab, words
from metamae.data.shards import check_shards, iter_examples, open_dataset
from metamae.modality import ImageSpec

# LibriSpeech dev-clean's 40 speakers: numeric order differs from string order ("84" > "8297")
SPEAKERS = [84, 174, 251, 422, 652, 777, 1272, 1462, 1673, 1919, 1988, 1993, 2035, 2078, 2086, 2277, 2412,
            2428, 2803, 2902, 3000, 3081, 3170, 3536, 3576, 3752, 3853, 5338, 5536, 5694, 5895, 6241, 6295,
            6313, 6319, 6345, 7850, 7976, 8297, 8842]
RATE = 16000


def read_all(folder: Path, manifest, split: str):
    """(x, y, ids) of a whole split, in file order."""
    (x, y), = list(iter_examples(folder, manifest, split, batch_size=10_000))
    ids = np.concatenate([pq.read_table(folder / s.file, columns=["id"])["id"].to_numpy()
                          for s in manifest.splits[split]])
    return x, y, ids


# --------------------------------------------------------------------------------------------
# LibriSpeech
# --------------------------------------------------------------------------------------------

def tone(hz: float, samples: int, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * hz * np.arange(samples) / RATE)


def write_flac(folder: Path, speaker: int, utterance: int, wave: np.ndarray) -> None:
    chapter = folder / str(speaker) / str(1000 + speaker)
    chapter.mkdir(parents=True, exist_ok=True)
    stem = f"{speaker}-{1000 + speaker}-{utterance:04d}"
    soundfile.write(chapter / f"{stem}.flac", wave, RATE, subtype="PCM_16", format="FLAC")
    with open(chapter / f"{speaker}-{1000 + speaker}.trans.txt", "a") as f:
        f.write(f"{stem} HELLO WORLD\n")


@pytest.fixture(scope="module")
def libri(tmp_path_factory):
    """dev-clean.tar.gz with 40 speakers: 84 has 5 utterances (a 500 Hz tone first), 174 a long
    2 kHz tone that turns to 4 kHz after MAX_LENGTH samples, everyone else 2 short ones."""
    root = tmp_path_factory.mktemp("librispeech")
    subset = root / "build" / "LibriSpeech" / "dev-clean"
    rng = np.random.default_rng(0)
    special = {(84, 0): tone(500, RATE),
               (174, 0): np.concatenate([tone(2000, librispeech.MAX_LENGTH), tone(4000, 8000)])}
    for speaker in SPEAKERS:
        for utterance in range(5 if speaker == 84 else 2):
            wave = special.get((speaker, utterance), 0.1 * rng.standard_normal(800))
            write_flac(subset, speaker, utterance, wave)
    raw = root / "raw"
    raw.mkdir()
    with tarfile.open(raw / "dev-clean.tar.gz", "w:gz") as tar:      # as openslr.org ships it
        tar.add(root / "build" / "LibriSpeech", arcname="LibriSpeech")
    out = root / "out"
    manifest = librispeech.convert(raw, out)
    return raw, out, manifest


def expected_bin(hz: float) -> int:
    """Slaney mel scale (linear to 1 kHz, then log): the filter centred nearest to hz."""
    mel = hz * 3 / 200 if hz < 1000 else 15 + 27 * np.log(hz / 1000) / np.log(6.4)
    top = 15 + 27 * np.log(8000 / 1000) / np.log(6.4)
    return int(round(mel / (top / 225))) - 1                # 226 edges; filter k is centred on edge k + 1


def test_librispeech_manifest_splits_and_labels(libri):
    raw, out, manifest = libri
    assert (raw / "LibriSpeech" / "dev-clean").is_dir()       # unpacked from the archive
    manifest = open_dataset(out)
    check_shards(out, manifest, full=True)
    assert manifest.spec == ImageSpec(1, 224, 224, 16)
    assert (manifest.num_classes, manifest.metric, manifest.label) == (40, "accuracy", "class")
    assert manifest.converter["speakers"] == SPEAKERS
    assert manifest.rows("train") == 4 + 39 and manifest.rows("test") == 1 + 39

    stems = sorted(p.stem for p in (raw / "LibriSpeech" / "dev-clean").glob("*/*/*.flac"))
    speaker = np.array([int(s.split("-")[0]) for s in stems])
    _, train_y, train_ids = read_all(out, manifest, "train")
    _, test_y, test_ids = read_all(out, manifest, "test")
    assert sorted([*train_ids, *test_ids]) == list(range(len(stems)))
    np.testing.assert_array_equal(train_y, [SPEAKERS.index(speaker[i]) for i in train_ids])
    np.testing.assert_array_equal(test_y, [SPEAKERS.index(speaker[i]) for i in test_ids])
    own = np.where(speaker == 84)[0]                          # the first speaker in numeric order
    np.random.RandomState(42).shuffle(own)                    # DABS: the first draw of RandomState(42)
    assert train_ids[:4].tolist() == own[:4].tolist() and own[4] in test_ids


def spectrogram(out: Path, manifest, stem_index: int) -> np.ndarray:
    for split in ("train", "test"):
        x, _, ids = read_all(out, manifest, split)
        if stem_index in ids:
            return x[list(ids).index(stem_index), 0]          # 224 mels × 224 frames
    raise AssertionError(stem_index)


def test_librispeech_pure_tone_peaks_in_its_mel_bin(libri):
    raw, out, manifest = libri
    stems = sorted(p.stem for p in (raw / "LibriSpeech" / "dev-clean").glob("*/*/*.flac"))
    x = spectrogram(out, manifest, stems.index("84-1084-0000"))
    assert x.shape == (224, 224) and x.dtype == np.float32
    tone_frames = x[:, 2:22]                                  # 1 s at hop 672: frames 0..23
    assert set(tone_frames.argmax(axis=0)) == {expected_bin(500)}
    # zero padding after the tone sits at the floor, 80 dB under the maximum, in DABS's units
    assert np.all(x[:, 30:] == x.min())
    assert x.max() - x.min() == pytest.approx(80 / librispeech.STD, rel=1e-4)

    long = spectrogram(out, manifest, stems.index("174-1174-0000"))
    assert set(long[:, 2:-2].argmax(axis=0)) == {expected_bin(2000)}    # cropped before the 4 kHz part
    assert long[expected_bin(4000), -1] < long[expected_bin(2000), -1] - 40 / librispeech.STD


def test_mel_filterbank_is_slaney_area_normalized():
    bank = librispeech.mel_filterbank()
    assert bank.shape == (224, 1025)
    area = bank.sum(axis=1) * (RATE / 2048)                   # ∑ weights × Hz per FFT bin
    assert np.allclose(area[100:], 1.0, rtol=0.05)            # wide filters: unit area
    hz = np.array([0.0, 500.0, 1000.0, 3000.0, 8000.0])
    assert np.allclose(librispeech.mel_to_hz(librispeech.hz_to_mel(hz)), hz)


# librosa 0.11.0 with DABS's arguments on 0.3 sin(440 Hz) + 0.1 sin(3 kHz), 100000 samples (float64):
#   s = librosa.feature.melspectrogram(y=padded_to_150526, sr=16000, hop_length=672, n_mels=224)
#   ((librosa.power_to_db(s ** 2) + 22.924) / 12.587)[np.ix_(ROWS, COLS)]
ROWS, COLS = (0, 31, 32, 33, 152, 153, 154), (0, 1, 60, 148, 149)
LIBROSA = [[1.20164, 0.61119, 0.61119, 0.61119, 1.14808],
           [5.91927, 6.33609, 6.33149, 6.33517, 5.63309],
           [6.21970, 6.95003, 6.96695, 6.91321, 5.86178],
           [5.46545, 5.56194, 5.53581, 5.59864, 5.24816],
           [2.70352, 2.43458, 2.34552, 2.53907, 2.55491],
           [4.29745, 4.87968, 4.89024, 4.85524, 3.98802],
           [3.05191, 3.21212, 3.18952, 3.23542, 2.85015]]


def test_log_mel_matches_librosa():
    t = np.arange(100000) / RATE
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    x = librispeech.log_mel(librispeech.fit_length(wave))
    np.testing.assert_allclose(x[0][np.ix_(ROWS, COLS)], LIBROSA, atol=2e-5)


def test_librispeech_missing_or_incomplete_raw_files(libri, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dev-clean.*dev-clean\.tar\.gz"):
        librispeech.convert(tmp_path / "empty", tmp_path / "out")
    raw, _, _ = libri
    partial = tmp_path / "partial"
    shutil.copytree(raw / "LibriSpeech", partial / "LibriSpeech")
    shutil.rmtree(partial / "LibriSpeech" / "dev-clean" / "8842")
    with pytest.raises(ValueError, match="39 speakers"):
        librispeech.convert(partial, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

def test_vocab_and_encoding():
    assert words("A man, riding_a HORSE! Café 2x") == ["a", "man", "riding", "a", "horse", "café", "2x"]
    vocab = Vocab.build(["b a", "a c", "d"], size=6)
    assert vocab.tokens == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b"]      # by count, then a-z
    assert vocab.encode("a zebra", length=6).tolist() == [CLS, 4, UNK, SEP, PAD, PAD]
    long = vocab.encode(" ".join(["a"] * 10), "b b", length=8)                   # longest first
    assert long.tolist() == [CLS, 4, 4, 4, SEP, 5, 5, SEP]


# --------------------------------------------------------------------------------------------
# MSCOCO and VQA
# --------------------------------------------------------------------------------------------

def banded_jpeg(path: Path) -> None:
    """40 × 32 (W × H): blue, with 4 red rows at top and bottom — exactly what DABS's stretch to
    640 high and centre crop of 480 rows cut away."""
    pixels = np.zeros((32, 40, 3), np.uint8)
    pixels[:, :, 2] = 255
    pixels[:4], pixels[-4:] = (255, 0, 0), (255, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=100, subsampling=0)


CATEGORIES = [c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]   # COCO's 80 ids
LONG_CAPTION = " ".join(f"word{i}" for i in range(40))


def write_coco(raw: Path) -> None:
    captions = {"train2017": [(1, "A giraffe standing near a tree."), (2, LONG_CAPTION), (3, "no objects here"),
                              (1, "a GIRAFFE eating leaves")],
                "val2017": [(4, "A zebra and a giraffe"), (5, "a giraffe")]}
    boxes = {"train2017": [(1, 1), (2, 13), (1, 90)], "val2017": [(4, 24), (5, 25)]}
    (raw / "annotations").mkdir(parents=True)
    for subset in captions:
        ids = sorted({i for i, _ in captions[subset]})
        images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 32} for i in ids]
        for image in images:
            banded_jpeg(raw / subset / image["file_name"])
        json.dump({"images": images, "annotations": [
            {"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(captions[subset])]},
            open(raw / "annotations" / f"captions_{subset}.json", "w"))
        json.dump({"images": images, "categories": [{"id": c, "name": f"thing{c}"} for c in CATEGORIES],
                   "annotations": [{"id": n, "image_id": i, "category_id": c}
                                   for n, (i, c) in enumerate(boxes[subset])]},
                  open(raw / "annotations" / f"instances_{subset}.json", "w"))


def check_image(image: np.ndarray) -> None:
    assert image.shape == (3, 224, 224) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    inner = image[:, 12:-12]                                  # the red bands were cropped away
    assert inner[0].max() < 0.1 and inner[2].min() > 0.9


def test_mscoco(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_coco(raw)
    manifest = mscoco.convert(raw, out)
    manifest = open_dataset(out)
    check_shards(out, manifest, full=True)
    assert manifest.spec == mscoco.SPEC and manifest.input["text"] == {"vocab": 30552, "length": 32}
    assert (manifest.num_classes, manifest.metric, manifest.label) == (80, "accuracy", "class")
    assert manifest.rows("train") == 2 and manifest.rows("test") == 2             # image 3 has no objects

    vocab = Vocab.load(out)
    assert manifest.converter["vocab"] == VOCAB_FILE
    assert manifest.converter["vocab_sha256"] == hashlib.sha256((out / VOCAB_FILE).read_bytes()).hexdigest()
    assert "standing" not in vocab.ids and "zebra" not in vocab.ids            # dropped caption; test text
    (x_image, x_text), y, ids = read_all(out, manifest, "train")
    assert ids.tolist() == [1, 2]
    assert y.tolist() == [CATEGORIES.index(90), CATEGORIES.index(13)]           # last-listed instance
    caption = [CLS, *(vocab.ids[w] for w in ("a", "giraffe", "eating", "leaves")), SEP]
    assert x_text[0].tolist() == caption + [PAD] * (32 - len(caption))
    assert x_text[1].tolist() == [CLS, *(vocab.ids[f"word{i}"] for i in range(30)), SEP]
    for image in x_image:
        check_image(image)
    (_, test_text), test_y, _ = read_all(out, manifest, "test")
    a, giraffe = vocab.ids["a"], vocab.ids["giraffe"]
    assert test_text[0][:7].tolist() == [CLS, a, UNK, UNK, a, giraffe, SEP]        # "A zebra and a giraffe"


def test_mscoco_missing_annotations(tmp_path):
    write_coco(tmp_path / "raw")
    (tmp_path / "raw" / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json.*annotations_trainval2017\.zip"):
        mscoco.convert(tmp_path / "raw", tmp_path / "out")


CHOICES = ["yes", "no", "red", "blue", "two", "three"]


def write_vqa(raw: Path, multiple_choice: bool = True) -> dict[int, str]:
    """Train: 12 questions on images 1 and 2 (one answer is not a choice); val: 2 on image 3."""
    answers = {}
    for subset, images in (("train2014", [1, 2]), ("val2014", [3])):
        questions, annotations = [], []
        for image in images:
            banded_jpeg(raw / subset / f"COCO_{subset}_{image:012d}.jpg")
        for n in range(12 if subset == "train2014" else 2):
            qid, image = 100 * images[0] + n, images[n % len(images)]
            answer = "maybe" if n == 5 else CHOICES[n % len(CHOICES)]
            question = {"question_id": qid, "image_id": image,
                        "question": "Is the zebra red?" if subset == "val2014" else f"What is shown {n}?"}
            if multiple_choice:
                question["multiple_choices"] = CHOICES
            questions.append(question)
            annotations.append({"question_id": qid, "image_id": image, "multiple_choice_answer": answer,
                                 "answer_type": "other", "answers": [{"answer": answer, "answer_id": 1}]})
            answers[qid] = answer
        json.dump({"task_type": "Multiple-Choice", "data_subtype": subset, "questions": questions},
                  open(raw / f"MultipleChoice_mscoco_{subset}_questions.json", "w"))
        json.dump({"data_subtype": subset, "annotations": annotations},
                  open(raw / f"mscoco_{subset}_annotations.json", "w"))
    return answers


def test_vqa(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    answers = write_vqa(raw)
    vqa.convert(raw, out)
    manifest = open_dataset(out)
    check_shards(out, manifest, full=True)
    assert manifest.spec == mscoco.SPEC
    assert (manifest.num_classes, manifest.metric, manifest.label) == (2, "binary_accuracy", "class")
    assert manifest.rows("train") == 11 and manifest.rows("test") == 2            # "maybe" is no choice

    vocab = Vocab.load(out)
    assert "zebra" not in vocab.ids                                                # val text only
    (x_image, x_text), y, ids = read_all(out, manifest, "train")
    assert set(y.tolist()) == {0, 1}
    for tokens, label, qid in zip(x_text, y, ids):
        question = [vocab.ids[w] for w in words(f"What is shown {qid - 100}?")]
        assert tokens[:len(question) + 2].tolist() == [CLS, *question, SEP]
        shown = vocab.tokens[tokens[len(question) + 2]]
        assert shown in CHOICES and tokens[len(question) + 3] == SEP and not tokens[len(question) + 4:].any()
        assert label == (shown == answers[qid])
    check_image(x_image[0])
    (_, test_text), _, _ = read_all(out, manifest, "test")
    assert UNK in test_text[0][:6].tolist()


def test_vqa_needs_v1_multiple_choice_and_all_files(tmp_path):
    write_vqa(tmp_path / "v2", multiple_choice=False)
    with pytest.raises(ValueError, match="multiple_choices.*v1"):
        vqa.convert(tmp_path / "v2", tmp_path / "out")
    write_vqa(tmp_path / "raw")
    (tmp_path / "raw" / "mscoco_val2014_annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"mscoco_val2014_annotations\.json.*Annotations_Val_mscoco\.zip"):
        vqa.convert(tmp_path / "raw", tmp_path / "out")
