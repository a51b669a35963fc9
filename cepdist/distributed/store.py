"""Content-addressed stage artifacts on any pyarrow filesystem (a local directory, NFS, s3://, gs://).

A stage's artifact lives under a key derived from exactly the config it depends on (including the keys
of its upstream artifacts), so every trial that needs it — in this study, a later one, or a resumed
one — finds it instead of recomputing it. Writes go to a temporary name and are moved into place, so
a reader never sees a partial artifact. Every execution of a stage is recorded (for accounting)."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def stage_key(stage: str, config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


class ArtifactStore:
    def __init__(self, uri: str | os.PathLike):
        uri = str(uri)
        if "://" not in uri:
            Path(uri).mkdir(parents=True, exist_ok=True)
            uri = str(Path(uri).resolve())
        self.uri = uri
        self.fs, self.root = pafs.FileSystem.from_uri(uri)
        self.fs.create_dir(self.root, recursive=True)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, key: str, name: str = "artifact.pt") -> bool:
        return self.fs.get_file_info(self._path(key, name)).type == pafs.FileType.File

    def put_file(self, key: str, local: str | os.PathLike, name: str = "artifact.pt"):
        self.fs.create_dir(self._path(key), recursive=True)
        tmp = self._path(key, f".{name}.{uuid.uuid4().hex}.tmp")
        with open(local, "rb") as src, self.fs.open_output_stream(tmp) as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        self.fs.move(tmp, self._path(key, name))

    def get_file(self, key: str, local: str | os.PathLike, name: str = "artifact.pt") -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(self._path(key, name)) as src, open(local, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        return local

    def put_json(self, key: str, obj: Any, name: str = "result.json"):
        self.fs.create_dir(self._path(key), recursive=True)
        tmp = self._path(key, f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(obj, default=float).encode())
        self.fs.move(tmp, self._path(key, name))

    def get_json(self, key: str, name: str = "result.json") -> Any:
        with self.fs.open_input_stream(self._path(key, name)) as f:
            return json.loads(f.read().decode())

    def record_execution(self, key: str, info: dict | None = None):
        """One small file per execution of a stage: counting them shows what was (re)computed."""
        self.put_json("executions", {"key": key, **(info or {})}, name=f"{key}.{uuid.uuid4().hex}.json")

    def executions(self) -> list[dict]:
        sel = pafs.FileSelector(self._path("executions"), allow_not_found=True)
        out = []
        for fi in self.fs.get_file_info(sel):
            if fi.type == pafs.FileType.File and fi.base_name.endswith(".json") and not fi.base_name.startswith("."):
                with self.fs.open_input_stream(fi.path) as f:
                    out.append(json.loads(f.read().decode()))
        return out
