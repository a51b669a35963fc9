"""Content-addressed stage artifacts on any pyarrow filesystem (a local directory, NFS, s3://, gs://).

A stage's artifact lives under a key derived from exactly the config it depends on (including the keys
of its upstream artifacts), so every trial that needs it — in this study, a later one, or a resumed
one — finds it instead of recomputing it. Writes go to a temporary name and are moved into place, so
a reader never sees a partial artifact. Every execution of a stage is recorded (for accounting).

Studies that share a store compute each stage once: a stage is computed under a lease (`lease`), a small
file created atomically beside the artifact whose holder refreshes it while it works; another study that
needs the same stage waits for the artifact instead of computing it, and takes the lease over only once it
has gone stale, after LEASE_STALE_S seconds without a refresh, or at once when its holder is known dead (a
process of this host that no longer exists, or one on a Ray node the cluster reports dead: a study resumed after
a kill, or a trial retried after a node loss, does not wait for its own crashed attempt). The exclusive create is
atomic on local and NFS-like filesystems; object stores (s3://, gs://) have no exclusive create, so there two
concurrent studies may still race (the artifact they write is the same)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


LEASE_STALE_S = 120.0         # a lease not refreshed for this long belongs to a crashed holder
LEASE_REFRESH_S = 20.0


def _ray_node_id() -> str | None:
    ray = sys.modules.get("ray")                 # only where Ray is in use; the store itself does not need it
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def holder_dead(info: dict) -> bool:
    """Whether a lease's holder is known to be gone (never guessed: unknown means alive, the lease then waits
    until stale). Pids are compared on the holder's own host only."""
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:                  # another user's live process
            pass
    ray = sys.modules.get("ray")
    if info.get("ray_node") and ray is not None and ray.is_initialized():
        state = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        return state.get(info["ray_node"]) is False
    return False


def stage_key(stage: str, config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


class ArtifactStore:
    def __init__(self, uri: str | os.PathLike):
        uri = str(uri)
        if "://" not in uri:
            try:
                Path(uri).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"store {uri} cannot be created ({e.strerror})") from None
            uri = str(Path(uri).resolve())
        self.uri = uri
        self.fs, self.root = pafs.FileSystem.from_uri(uri)
        self.fs.create_dir(self.root, recursive=True)

    def check_writable(self, min_free_bytes: int = 256 << 20):
        """Fail now, not after hours of training, if the store cannot take artifacts: write and delete a
        probe file, and (local stores) require some free space."""
        probe = self._path(f".probe-{uuid.uuid4().hex}")
        try:
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as e:
            raise ValueError(f"store {self.uri} is not writable ({e})") from None
        if isinstance(self.fs, pafs.LocalFileSystem):
            import shutil
            free = shutil.disk_usage(self.root).free
            if free < min_free_bytes:
                raise ValueError(f"store {self.uri} has {free / 2**20:.0f} MiB free; at least "
                                 f"{min_free_bytes / 2**20:.0f} MiB are needed for checkpoints and artifacts")

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

    # ------------------------------------------------------------ leases
    def _try_create(self, path: str, payload: bytes) -> bool:
        """Create `path` only if it does not exist (atomic where the filesystem allows)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            return True
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            return False
        with self.fs.open_output_stream(path) as f:
            f.write(payload)
        return True

    def _lease_info(self, path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(path) as f:
                info = json.loads(f.read().decode())
            float(info["refreshed"])
            return info
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextlib.contextmanager
    def lease(self, key: str, done: str = "artifact.pt", poll_s: float = 1.0, on_wait=None):
        """Hold the lease to compute `key`, or wait while another holder computes it.

        Yields True when the caller should compute (it holds the lease, refreshed in the background) and
        False when the artifact (`done`) appeared while waiting. A stale lease, or one whose holder is known dead,
        is taken over."""
        self.fs.create_dir(self._path(key), recursive=True)
        path = self._path(key, "lease.json")
        me = {"holder": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "ray_node": _ray_node_id()}

        def payload():
            return json.dumps({**me, "refreshed": time.time()}).encode()
        waited = False
        while not self._try_create(path, payload()):
            if self.exists(key, done):
                yield False
                return
            info = self._lease_info(path)
            if info is not None and (time.time() - float(info["refreshed"]) > LEASE_STALE_S or holder_dead(info)):
                again = self._lease_info(path)        # narrow the race with another waiter taking it over first
                if again is not None and again.get("holder") == info.get("holder"):
                    with contextlib.suppress(OSError):
                        self.fs.delete_file(path)
                continue
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(poll_s)
        if self.exists(key, done):                            # finished just before we got the lease
            self.fs.delete_file(path)
            yield False
            return
        stop = threading.Event()

        def refresh():
            while not stop.wait(LEASE_REFRESH_S):
                with contextlib.suppress(OSError), self.fs.open_output_stream(path) as f:
                    f.write(payload())
        t = threading.Thread(target=refresh, daemon=True)
        t.start()
        try:
            yield True
        finally:
            stop.set()
            t.join()
            with contextlib.suppress(OSError):
                self.fs.delete_file(path)

    def record_execution(self, key: str, info: dict | None = None):
        """One small file per execution of a stage: counting them shows what was (re)computed."""
        self.put_json("executions", {"key": key, **(info or {})}, name=f"{key}.{uuid.uuid4().hex}.json")

    def executions(self) -> list[dict]:
        return self.records("executions")

    def record_invocation(self, study: str, run_id: str, info: dict):
        """One file per invocation of a study (written at its start, rewritten at its end): a study's wall time
        is the sum over the invocations that ran it, across interruptions and resumes."""
        self.put_json(f"invocations/{study}", info, name=f"{run_id}.json")

    def invocations(self, study: str) -> list[dict]:
        return sorted(self.records(f"invocations/{study}"), key=lambda r: r.get("started", 0))

    def studies(self) -> list[str]:
        """Every study identity with recorded invocations."""
        sel = pafs.FileSelector(self._path("invocations"), allow_not_found=True)
        return sorted(fi.base_name for fi in self.fs.get_file_info(sel) if fi.type == pafs.FileType.Directory)

    def records(self, folder: str) -> list[dict]:
        """The JSON files of a folder of the store (none when it does not exist)."""
        sel = pafs.FileSelector(self._path(folder), allow_not_found=True)
        out = []
        for fi in self.fs.get_file_info(sel):
            if fi.type == pafs.FileType.File and fi.base_name.endswith(".json") and not fi.base_name.startswith("."):
                with self.fs.open_input_stream(fi.path) as f:
                    out.append(json.loads(f.read().decode()))
        return out
