"""Convert real datasets (CIFAR pickles, MNIST IDX, ImageFolder trees/tarballs) into verified FFCV .beton files.

Run `python -m convert --help`; from Python, `convert_dataset(...)` does the same.
"""

from convert.build import convert_dataset

__all__ = ["convert_dataset"]
