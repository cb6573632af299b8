"""The files of /v1/files: a directory (--files-dir), one data file and one JSON metadata file per id.

Uploads (purpose "batch") and batch outputs ("batch_output") live side by side under `{files_dir}/files/`:
`file-<id>` holds the bytes, `file-<id>.json` the OpenAI file object. Every write goes to a temporary name,
is fsynced and renamed, so a crash never leaves half a file under an id. Several gateways behind a load
balancer share the directory (a network volume); nothing else about files is kept anywhere.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import orjson

FILE_ID_RE = re.compile(r"file-[A-Za-z0-9._-]{1,120}")
TMP_PREFIX = ".upload-"


class FileStore:
    """Reads and writes the files directory; every method is blocking (call it from a thread)."""

    def __init__(self, root: Path):
        self.dir = Path(root) / "files"
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_id() -> str:
        """A fresh file id."""
        return "file-" + uuid.uuid4().hex

    @staticmethod
    def valid_id(file_id: str) -> bool:
        """True for an id this store could have made (never a path)."""
        return bool(FILE_ID_RE.fullmatch(file_id)) and not file_id.endswith(".json")  # .json: metadata names

    def data_path(self, file_id: str) -> Path:
        """Where a file's bytes are (ValueError for an id that is not one)."""
        if not self.valid_id(file_id):
            raise ValueError(f"invalid file id {file_id[:80]!r}")
        return self.dir / file_id

    def _meta_path(self, file_id: str) -> Path:
        return self.data_path(file_id).with_name(file_id + ".json")

    def temp_path(self) -> Path:
        """A fresh temporary name inside the directory (an upload lands there, then commit() renames it)."""
        return self.dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"

    def commit(self, tmp: Path, filename: str, purpose: str) -> dict:
        """Make an uploaded temporary file a stored file; returns its file object."""
        file_id = self.new_id()
        _fsync(tmp)
        os.replace(tmp, self.data_path(file_id))
        return self._write_meta(file_id, filename, purpose)

    def register(self, file_id: str, filename: str, purpose: str) -> dict:
        """Publish a file written in place (a batch output) under its id; idempotent."""
        return self.get(file_id) or self._write_meta(file_id, filename, purpose)

    def get(self, file_id: str) -> dict | None:
        """The file object, or None if there is no such file."""
        try:
            meta = orjson.loads(self._meta_path(file_id).read_bytes())
            meta["bytes"] = self.data_path(file_id).stat().st_size
        except (OSError, ValueError, orjson.JSONDecodeError):
            return None
        return meta

    def list(self, purpose: str | None = None, after: str | None = None, limit: int = 10_000,
             order: str = "desc") -> tuple[list[dict], bool]:
        """File objects by creation time (order asc | desc), after the id `after`; and whether more follow."""
        items = [m for p in self.dir.glob("file-*.json") if (m := self.get(p.name[:-5])) is not None
                 and (purpose is None or m["purpose"] == purpose)]
        items.sort(key=lambda m: (m["created_at"], m["id"]), reverse=order == "desc")
        if after is not None:
            ids = [m["id"] for m in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        return items[:limit], len(items) > limit

    def delete(self, file_id: str) -> bool:
        """Remove a file; False if there was none."""
        found = False
        for path in (self._meta_path(file_id), self.data_path(file_id)):
            try:
                path.unlink()
                found = True
            except FileNotFoundError:
                pass
        return found

    def _write_meta(self, file_id: str, filename: str, purpose: str) -> dict:
        meta = {"id": file_id, "object": "file", "bytes": self.data_path(file_id).stat().st_size,
                "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed",
                "expires_at": None, "status_details": None}
        tmp = self.temp_path()
        tmp.write_bytes(orjson.dumps(meta))
        _fsync(tmp)
        os.replace(tmp, self._meta_path(file_id))
        _fsync_dir(self.dir)
        return meta


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
