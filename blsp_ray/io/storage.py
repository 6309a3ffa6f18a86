"""The storage layer: every stage reads and writes through here, local paths and s3:// URIs alike.

Writes are all-or-nothing: a killed job leaves either the old state or the complete new file,
never half a file (local: temp file + rename; S3: one object, visible only once closed).
S3 endpoint: ``cluster.s3.endpoint_url`` (S3Config), else ``AWS_ENDPOINT_URL``; credentials come
from the usual AWS environment variables / instance roles.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from blsp_ray.config import S3Config

# ---- local atomic writes ---------------------------------------------------------------------------


def _umask() -> int:
    """The process umask: Linux reports it in /proc; elsewhere set-and-restore (the only portable read)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkdtemp(target: Path) -> Path:
    """A temp dir beside ``target`` with the mode a plain ``mkdir`` would give (mkdtemp's is 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp(target)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temp file beside ``target`` for writing; renamed over ``target`` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # what open() would give, not mkstemp's 0600: others may read a run's outputs
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- local paths and s3:// URIs --------------------------------------------------------------------


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def s3_endpoint(s3: S3Config | None = None) -> str | None:
    return (s3.endpoint_url if s3 else None) or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_env(s3: S3Config | None) -> dict[str, str]:
    """Environment that points boto3, pyarrow and Ray Data's own S3 reads (jobs, their workers) at the
    configured endpoint; credentials are left to the cluster (env, instance roles)."""
    env = {}
    if s3 is not None and s3.endpoint_url:
        env["AWS_ENDPOINT_URL"] = s3.endpoint_url
    if s3 is not None and s3.region:
        env["AWS_DEFAULT_REGION"] = s3.region
    return env


def s3_filesystem(s3: S3Config | None = None):
    """pyarrow's S3 filesystem for the configured endpoint (Ray Train's ``storage_filesystem`` too)."""
    from pyarrow import fs

    kwargs = {}
    endpoint = s3_endpoint(s3)
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = (s3.region if s3 else None) or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs)


def filesystem(uri: str, s3: S3Config | None = None):
    """(pyarrow filesystem, path inside it) for ``uri``: what Ray Data / Ray Train take."""
    from pyarrow import fs

    if is_s3(uri):
        return s3_filesystem(s3), _s3_key(uri)
    return fs.LocalFileSystem(), os.path.abspath(uri)


def _s3_key(uri: str) -> str:
    return str(uri)[len("s3://"):]


@contextlib.contextmanager
def open_output(uri: str, mode: str = "w", s3: S3Config | None = None) -> Iterator:
    """Write ``uri`` all-or-nothing: local temp file + rename, or one S3 object (visible only when closed)."""
    if not is_s3(uri):
        with atomic_file(uri, mode) as f:
            yield f
        return
    with s3_filesystem(s3).open_output_stream(_s3_key(uri)) as raw:
        yield io.TextIOWrapper(raw, encoding="utf-8", write_through=True) if "b" not in mode else raw


@contextlib.contextmanager
def open_input(uri: str, s3: S3Config | None = None) -> Iterator:
    """Binary, seekable input from a local path or s3:// URI."""
    if not is_s3(uri):
        with open(uri, "rb") as f:
            yield f
        return
    with s3_filesystem(s3).open_input_file(_s3_key(uri)) as f:
        yield f


def exists(uri: str, s3: S3Config | None = None) -> bool:
    if not is_s3(uri):
        return os.path.exists(uri)
    from pyarrow import fs

    return s3_filesystem(s3).get_file_info(_s3_key(uri)).type != fs.FileType.NotFound


def list_dir(uri: str, s3: S3Config | None = None) -> list[str]:
    """Names (not paths) of the files directly in ``uri``; [] if it does not exist."""
    if not is_s3(uri):
        return sorted(p.name for p in Path(uri).iterdir() if p.is_file()) if os.path.isdir(uri) else []
    from pyarrow import fs

    infos = s3_filesystem(s3).get_file_info(fs.FileSelector(_s3_key(uri), allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == fs.FileType.File)


def write_text(uri: str, text: str, s3: S3Config | None = None) -> None:
    with open_output(uri, "w", s3) as f:
        f.write(text)


def read_text(uri: str, s3: S3Config | None = None) -> str:
    with open_input(uri, s3) as f:
        return f.read().decode("utf-8")


def write_jsonl(target: str | os.PathLike, rows: Iterable[dict], s3: S3Config | None = None) -> int:
    """Atomically write rows as JSON lines; returns the row count."""
    n = 0
    with open_output(str(target), "w", s3) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike, s3: S3Config | None = None) -> list[dict]:
    return [json.loads(line) for line in read_text(str(path), s3).splitlines() if line.strip()]


def local_copy(uri: str, s3: S3Config | None = None) -> str:
    """A local directory holding the checkpoint at ``uri`` (Hugging Face and vLLM load from disk).

    Local paths are returned as they are; an s3:// directory is downloaded once per node into
    the model cache, keyed by URI and the objects' sizes and times, so a checkpoint rewritten
    under the same URI is fetched again.
    """
    if not is_s3(uri):
        return uri
    from pyarrow import fs

    s3fs, key = s3_filesystem(s3), _s3_key(uri).rstrip("/")
    infos = s3fs.get_file_info(fs.FileSelector(key, recursive=True, allow_not_found=True))
    files = sorted((i.path, i.size, str(i.mtime)) for i in infos if i.type == fs.FileType.File)
    if not files:
        raise FileNotFoundError(f"{uri}: no checkpoint there (empty or missing)")
    digest = hashlib.sha1(json.dumps([uri, files]).encode()).hexdigest()[:16]
    target = model_cache(digest)
    if not target.exists():
        with cache_dir(target) as tmp:
            fs.copy_files(key, str(tmp), source_filesystem=s3fs, destination_filesystem=fs.LocalFileSystem())
    return str(target)


def model_cache(name: str) -> Path:
    """Where node-local copies of remote checkpoints live: ``$BLSP_MODEL_CACHE`` (default /tmp/blsp-models)."""
    return Path(os.environ.get("BLSP_MODEL_CACHE", "/tmp/blsp-models")) / name


@contextlib.contextmanager
def cache_dir(target: Path) -> Iterator[Path]:
    """Fill a temp dir renamed to ``target`` unless another process got there first (then its copy
    stays): replicas starting together on one node never see half a copy, nor remove a used one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp(target)
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
