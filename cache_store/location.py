"""Where a store lives: a local path or any fsspec URL, and the file-level queries zarr lacks
(does the path exist, is it empty, how many bytes do the chunk files take)."""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
from fsspec import AbstractFileSystem

_METADATA_FILE = "zarr.json"


@dataclass(frozen=True)
class Location:
    url: str  # as given by the caller, used in messages
    zarr_url: str  # what zarr.open_group gets: a local path or a non-file URL
    fs: AbstractFileSystem
    path: str  # root path inside fs

    @classmethod
    def parse(cls, url: str) -> Location:
        # zarr's fsspec store does not create parent directories for file:// URLs; a plain local
        # path goes through zarr's LocalStore, which does.
        zarr_url = url[len("file://") :] if url.startswith("file://") else url
        fs, path = fsspec.core.url_to_fs(zarr_url)
        return cls(url=url, zarr_url=zarr_url, fs=fs, path=path.rstrip("/"))

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_empty_dir(self) -> bool:
        return self.fs.isdir(self.path) and not self.fs.ls(self.path, detail=False)

    def chunk_bytes(self, subpath: str) -> int:
        """Total size of the chunk files under subpath (zarr metadata files excluded)."""
        root = f"{self.path}/{subpath}"
        # zarr writes through its own filesystem instance; drop any listing this one cached.
        self.fs.invalidate_cache(root)
        files = self.fs.find(root, detail=True)
        return sum(
            int(info["size"])
            for name, info in files.items()
            if not name.endswith("/" + _METADATA_FILE)
        )
