"""Datasets: every source yields the same thing, an `ArrayDataset` of a modality spec and splits."""
from metamae.data.arrays import ArrayDataset, Split, batches
from metamae.data.load import load_dataset

__all__ = ["ArrayDataset", "Split", "batches", "load_dataset"]
