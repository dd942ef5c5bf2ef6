"""Where images come from and how they become batches.

``load_data(spec)`` reads CIFAR (python format), MNIST-style IDX files, image folders, Hugging Face datasets saved
to disk, WebDataset shards or the built-in digits into uint8 splits: :class:`ArrayDataset` (in memory, or
memory-mapped from the decoded-image cache) or, for shards, a streamed dataset; their ``loader()`` cuts batches
(sharded per rank, prefetched) and moves them to the device; :class:`TrainTransform` / :class:`EvalTransform`
augment and normalise them there.
"""

from vitlab.data.images import decode_image, list_image_files
from vitlab.data.specs import DATA_KINDS, dataset_info, has_own_val, load_data, parse_data_spec, with_val_split
from vitlab.data.loader import ArrayDataset, BatchLoader, DatasetSplits, channel_mean_std, stratified_split
from vitlab.data.transforms import EvalTransform, Preprocess, TrainTransform

__all__ = ["ArrayDataset", "DatasetSplits", "BatchLoader", "TrainTransform", "EvalTransform", "Preprocess",
           "load_data", "decode_image", "list_image_files", "dataset_info", "parse_data_spec", "DATA_KINDS",
           "channel_mean_std", "stratified_split", "with_val_split", "has_own_val"]
