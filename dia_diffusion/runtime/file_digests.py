"""sha256 digests that name exactly which weights a run or a measurement used."""

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_weights_sha256(folder: Path) -> str:
    """sha256 of a model folder's weights file; for sharded weights, of the list of '<file> <sha256>' lines."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if len(files) == 1:
        return file_sha256(files[0])
    listing = "".join(f"{file.name} {file_sha256(file)}\n" for file in files)
    return hashlib.sha256(listing.encode()).hexdigest()
