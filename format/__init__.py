"""The `.beton` data format, the layer under both the converters and the loaders: the file reader and writer
(`beton`), a converted dataset's manifest and checked splits (`dataset`), the page checksums that tell a file
changed since it was converted (`integrity`), and the split carving and channel statistics the converters and the
in-memory API share (`splits`). numpy and PIL only: no torch, no FFCV."""

from beton_trainer.format.beton import BetonFile, write_beton_file
from beton_trainer.format.dataset import MANIFEST, Split, dataset_identity, load_manifest, open_beton, open_split
from beton_trainer.format.splits import SplitData, carve_val, channel_stats

__all__ = ["MANIFEST", "BetonFile", "Split", "SplitData", "carve_val", "channel_stats", "dataset_identity",
           "load_manifest", "open_beton", "open_split", "write_beton_file"]
