"""The built-in dataset: UCI handwritten digits (1,797 images, 8x8, 1 channel, CC BY 4.0), shipped in the package.

It lets ``vitlab train`` run offline with no arguments. See ``builtin/DIGITS_LICENSE.txt`` for provenance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitlab.data.loader import ArrayDataset, stratified_split
from vitlab.errors import DataError

DIGITS_FILE = Path(__file__).resolve().parent.parent / "builtin" / "digits.npz"
DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_TEST_FRACTION = 0.2
# The split is fixed (not the run's seed) so every run reports accuracy on the same 359 test images.
DIGITS_SPLIT_SEED = 0


def load_digits() -> dict[str, ArrayDataset]:
    """The built-in digits as ``{"train": 1438 images, "test": 359 images}``, uint8 (N, 1, 8, 8).

    The split is stratified and fixed (seed 0), about 80/20 in every class.
    """
    try:
        with np.load(DIGITS_FILE, allow_pickle=False) as z:
            images = torch.from_numpy(z["images"].copy()).unsqueeze(1)  # (N, 8, 8) -> (N, 1, 8, 8)
            labels = torch.from_numpy(z["labels"].astype(np.int64))
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{DIGITS_FILE}: the built-in digits file is missing or corrupt ({e}); "
                        "reinstall vitlab") from None
    full = ArrayDataset(images, labels, list(DIGITS_CLASSES))
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return {"train": full.subset(train_idx), "test": full.subset(test_idx)}
