"""Convert real datasets (CIFAR pickles, MNIST IDX, ImageFolder trees/tarballs) into verified FFCV .beton files.

Run `beton-convert --help`; from Python, `convert_dataset(...)` does the same.
"""

from beton_trainer.convert.build import convert_dataset

__all__ = ["convert_dataset"]
