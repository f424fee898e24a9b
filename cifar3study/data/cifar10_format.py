"""Facts about the official `cifar-10-python.tar.gz`, and the limits derived from them.

Anything bigger than what a valid archive can hold is refused before it is
read, so a small hostile file (a compression bomb, a lying server) cannot
cost gigabytes. Sizes measured on the official archive and on the mirror.
"""

from __future__ import annotations

BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_BATCH = "test_batch"
META = "batches.meta"
IMAGE_BYTES = 3 * 32 * 32  # one image as uint8 RGB planes
IMAGES_PER_BATCH = 10_000  # every batch file holds exactly this many
NUM_CLASSES = 10
TRAIN_IMAGES_PER_CLASS = 5_000  # the 5 training batches hold 50,000 images, 5,000 of each class
MAX_CLASS_NAME = 10  # characters of the longest label name ("automobile")

MAX_MEMBERS = 16  # the archive has 9 (a folder, 6 batches, the meta file, a readme)
MAX_MEMBER_BYTES = 32 << 20  # a batch pickle is 31.0 MB (10,000 x 3,072 bytes plus labels and file names)
MAX_PICKLE_OPCODES = 100_000  # a batch pickle has ~30,000; more means a structure no batch has
MAX_ARCHIVE_BYTES = 200 << 20  # 6 batches at the member cap (192 MiB), plus headers; gzip cannot grow raw pixels
MAX_TAR_BYTES = 200 << 20  # the decompressed tar: 186,060,800 bytes for the mirror, about as much for the official one
MAX_EXTENSION_BYTES = 64 << 10  # one PAX or GNU long-name header; the archive has none, a repacked one a few hundred bytes
