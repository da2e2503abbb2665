"""Datasets: the embedded digits, synthetic data and Parquet shards all read as one `Dataset`."""
from metamae.data.arrays import ArrayDataset, Dataset, Split, batches
from metamae.data.load import load_dataset

__all__ = ["ArrayDataset", "Dataset", "Split", "batches", "load_dataset"]
