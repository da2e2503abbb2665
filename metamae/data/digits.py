"""The embedded default: scikit-learn's bundled handwritten digits as 1 × 8 × 8 images.

1,797 images, 10 classes, pixel values 0-16 scaled to [0, 1]; a fixed, seeded, stratified split.
Real data that installs with a package, so the default run needs no download.
"""
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from metamae.data.arrays import ArrayDataset, Split
from metamae.modality import ImageSpec

TEST_FRACTION = 0.25
DIGIT_CLASSES = 10
SPLIT_SEED = 0


def digits(patch: int = 2) -> ArrayDataset:
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)     # N × 1 × 8 × 8
    labels = labels.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    return ArrayDataset("digits", ImageSpec(channels=1, height=8, width=8, patch=patch),
                        Split(train_x, train_y), Split(test_x, test_y))
