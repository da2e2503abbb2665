"""LibriSpeech (DABS speech, `librispeech_transfer`): who is speaking? 40 speakers, log-mel images.

Raw files, as openslr.org/12 publishes them (into RAW): `dev-clean.tar.gz`, which unpacks to
`LibriSpeech/dev-clean/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTTERANCE.flac` (16 kHz mono) beside each
chapter's `SPEAKER-CHAPTER.trans.txt` (the transcripts, which speaker labels do not need). The archive
is unpacked on first use when the folder is missing.

DABS's preprocessing, followed here (alextamkin/dabs src/datasets/speech/librispeech.py, class
LibriSpeechTransfer; DABS pretrains on train-clean-100 + train-clean-360 + train-other-500, 2338
speakers without labels, and its 40-class task is this one):
- examples: dev-clean's utterances in sorted id order (torchaudio's LIBRISPEECH walker); label: the
  speaker's rank among the 40 dev-clean speaker ids sorted as numbers.
- split: for each speaker in increasing id order, that speaker's utterance indices shuffled by one
  shared np.random.RandomState(42); the first int(0.8 n) to train, the rest to test.
- waveform: the first MAX_LENGTH = 150526 samples (DABS's choice at test time; for training it
  picks the start or the end at random on every read, which a fixed dataset cannot); a shorter one
  padded with zeros at the end.
- librosa.feature.melspectrogram(sr=16000, hop_length=672, n_mels=224; defaults n_fft=2048, periodic
  Hann window, center=True, power 2, Slaney mel scale and Slaney area norm from 0 Hz to sr/2)
  -> 224 mel bins × 224 frames, then librosa.power_to_db(mel ** 2): 10 log10(max(1e-10, mel²)),
  floored at its maximum - 80 dB, then Normalize(mean -22.924, std 12.587).
Here STFT and filterbank are numpy re-implementations of librosa's, in float64; they match librosa
0.11 to 1e-6 (tests/test_converters_speech_vl.py). The centre padding is zeros (librosa >= 0.9's
default pad_mode; DABS pins no librosa version, and 0.8 reflected): with 0.8 the first two frames,
and the last of a cropped utterance, would differ.

One example: 1 × 224 × 224 float32, rows = mel bins from low to high frequency, columns = frames.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse
import soundfile

from metamae.data.download import Source, raw_path
from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, ShardWriter
from metamae.modality import ImageSpec

SOURCES = [Source("https://www.openslr.org/resources/12/dev-clean.tar.gz", "dev-clean.tar.gz")]
SUBSET = "LibriSpeech/dev-clean"
SPEAKERS = 40
SAMPLE_RATE = 16000
MAX_LENGTH = 150526
N_FFT = 2048
HOP = 672
N_MELS = 224
TOP_DB = 80.0
MEAN, STD = -22.924, 12.587
SPLIT_SEED = 42
TRAIN_FRACTION = 0.8
PATCH = 16                # configs/dataset/librispeech.yaml and DABS's PATCH_SIZE
BATCH = 64


# --------------------------------------------------------------------------------------------
# Log-mel spectrogram (librosa's melspectrogram + power_to_db, in numpy)
# --------------------------------------------------------------------------------------------

LOG_STEP = np.log(6.4) / 27.0          # Slaney's scale above 1 kHz (15 mels): 27 mels per factor 6.4


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / LOG_STEP)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp(LOG_STEP * (mel - 15.0)))


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """n_mels × (n_fft/2 + 1) triangles, equally spaced in Slaney mels from 0 to sr/2, each scaled
    to unit area (2 / bandwidth in Hz): librosa.filters.mel(htk=False, norm='slaney')."""
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)                          # F
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2.0), n_mels + 2))  # n_mels + 2
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz - lower) / (centre - lower)
    falling = (upper - fft_hz) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))  # n_mels × F


def power_spectrogram(wave: np.ndarray, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """L samples -> (n_fft/2 + 1) × (1 + L // hop) |STFT|², centred frames, zero padding, periodic Hann."""
    padded = np.pad(wave.astype(np.float64), n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]     # T × n_fft
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    return (np.abs(np.fft.rfft(frames * window, axis=1)) ** 2).T                # F × T


_FILTERBANK = scipy.sparse.csr_array(mel_filterbank())         # ~9 non-zero weights a filter


def log_mel(wave: np.ndarray) -> np.ndarray:
    """MAX_LENGTH samples -> 1 × 224 × 224 float32, normalized as DABS does."""
    mel = _FILTERBANK @ power_spectrogram(wave)                                 # 224 mels × 224 frames
    db = 10.0 * np.log10(np.maximum(1e-10, mel ** 2))                           # power_to_db(mel ** 2)
    db = np.maximum(db, db.max() - TOP_DB)
    return ((db - MEAN) / STD).astype(np.float32)[None]


def fit_length(wave: np.ndarray) -> np.ndarray:
    """The first MAX_LENGTH samples, zero-padded at the end when shorter."""
    out = np.zeros(MAX_LENGTH, dtype=np.float64)
    out[:min(len(wave), MAX_LENGTH)] = wave[:MAX_LENGTH]
    return out


# --------------------------------------------------------------------------------------------
# Raw files
# --------------------------------------------------------------------------------------------

def utterances(folder: Path) -> tuple[list[Path], np.ndarray]:
    """SPEAKER/CHAPTER/*.flac sorted by utterance id (SPEAKER-CHAPTER-UTTERANCE, as strings), and
    each one's speaker id."""
    paths = sorted(folder.glob("*/*/*.flac"), key=lambda p: p.stem)
    speakers = np.array([speaker_of(p) for p in paths], dtype=np.int64)
    if len(set(speakers.tolist())) != SPEAKERS:
        raise ValueError(f"{folder} holds {len(paths)} utterances of {len(set(speakers.tolist()))} speakers; "
                         f"LibriSpeech dev-clean has {SPEAKERS}: the folder is incomplete; unpack "
                         f"{SOURCES[0].filename} again")
    return paths, speakers


def speaker_of(path: Path) -> int:
    speaker, chapter, utterance = path.stem.split("-")
    if path.parent.parent.name != speaker or path.parent.name != chapter:
        raise ValueError(f"{path} is not in the LibriSpeech layout SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTTERANCE.flac")
    return int(speaker)


def read_wave(path: Path) -> np.ndarray:
    try:
        wave, rate = soundfile.read(path, dtype="float32", always_2d=True)      # L × channels, in [-1, 1)
    except RuntimeError as error:                                              # soundfile's LibsndfileError
        raise ValueError(f"{path} is not a readable FLAC file ({error}): unpack {SOURCES[0].filename} again") from error
    if rate != SAMPLE_RATE or wave.shape[1] != 1:
        raise ValueError(f"{path} is {rate} Hz with {wave.shape[1]} channels; LibriSpeech is {SAMPLE_RATE} Hz mono")
    return wave[:, 0]


def split_indices(speakers: np.ndarray) -> dict[str, np.ndarray]:
    """DABS's LibriSpeechTransfer.train_test_split: 80/20 within each speaker, RandomState(42)."""
    rs = np.random.RandomState(SPLIT_SEED)
    train, test = [], []
    for speaker in np.unique(speakers):
        own = np.where(speakers == speaker)[0]
        rs.shuffle(own)
        cut = int(TRAIN_FRACTION * len(own))
        train.extend(own[:cut])
        test.extend(own[cut:])
    return {"train": np.array(train, dtype=np.int64), "test": np.array(test, dtype=np.int64)}


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

def convert(raw: Path, out: Path = Path("data/librispeech"), shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False) -> Manifest:
    raw = Path(raw)
    paths, speakers = utterances(raw_path(raw, SUBSET, SOURCES[0], "librispeech"))
    speaker_ids = sorted(set(speakers.tolist()))
    labels = np.searchsorted(speaker_ids, speakers)                             # speaker id -> 0..39
    params = {
        "source": "LibriSpeech dev-clean (openslr.org/12)",
        "dabs": "alextamkin/dabs src/datasets/speech/librispeech.py (LibriSpeechTransfer)",
        "ids": "index into dev-clean's utterance ids, sorted as strings",
        "speakers": speaker_ids, "split": "80/20 within each speaker, np.random.RandomState(42)",
        "sample_rate": SAMPLE_RATE, "max_length": MAX_LENGTH,
        "crop": "first max_length samples; shorter ones zero-padded at the end",
        "n_fft": N_FFT, "hop_length": HOP, "window": "hann (periodic)", "center": "zero padding n_fft/2",
        "n_mels": N_MELS, "mel": "slaney scale, slaney area norm, 0 Hz to sample_rate/2",
        "log": "10 log10(max(1e-10, mel^2)), floored at max - 80 dB", "mean": MEAN, "std": STD,
        "layout": "1 x mel bins (low to high) x frames",
    }
    writer = ShardWriter(out, "librispeech", ImageSpec(1, N_MELS, N_MELS, PATCH), num_classes=SPEAKERS,
                         metric="accuracy", converter=params, shard_bytes=shard_bytes, overwrite=overwrite)
    for split, indices in split_indices(speakers).items():
        for start in range(0, len(indices), BATCH):
            batch = indices[start:start + BATCH]
            x = np.stack([log_mel(fit_length(read_wave(paths[i]))) for i in batch])   # B × 1 × 224 × 224
            writer.add(split, x, labels[batch], ids=batch)
    return writer.finish()
