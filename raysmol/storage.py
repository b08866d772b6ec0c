"""Local paths and object-storage URIs behind one small API, built on :mod:`pyarrow.fs`.

A location is either a local path (``/runs/x``, ``runs/x``, ``file:///runs/x``) or a URI with a
scheme pyarrow understands (``s3://bucket/key``, ``gs://bucket/key``, ``hdfs://...``). Every
function here accepts both kinds.

S3-compatible servers (MinIO, moto, Ceph...) are configured only through the standard environment:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
and ``AWS_DEFAULT_REGION``. pyarrow >= 26 reads the endpoint variables itself in
``FileSystem.from_uri`` (but *not* in the bare ``S3FileSystem()`` constructor), so remote
filesystems are always built with ``from_uri``.

Credentials are never copied into filesystem objects: a pickled filesystem (as Ray ships it to its
workers) carries the endpoint but each process reads its credentials from its own environment.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from functools import lru_cache

import pyarrow as pa
import pyarrow.fs as pafs

PathLike = str | os.PathLike[str]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# Schemes whose URIs are "<bucket>/<key>" paths on the filesystem; their filesystems are cached.
_BUCKET_SCHEMES = frozenset({"s3", "gs", "gcs"})
# Environment that changes what from_uri builds for a bucket scheme (part of the cache key).
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
_LOCAL = pafs.LocalFileSystem()
_cache: dict[tuple[str | None, ...], pafs.FileSystem] = {}
_cache_lock = threading.Lock()


def _scheme(uri: str) -> str | None:
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else None


def is_remote(uri: PathLike) -> bool:
    """True when ``uri`` has a scheme other than ``file://`` (``s3://``, ``gs://``, ...)."""
    scheme = _scheme(os.fspath(uri))
    return scheme is not None and scheme != "file"


def _local_path(uri: PathLike) -> str:
    """Absolute local path of a plain path or ``file://`` URI."""
    uri = os.fspath(uri)
    if _scheme(uri) == "file":
        uri = urllib.parse.unquote(urllib.parse.urlparse(uri).path)
    return os.path.abspath(os.path.expanduser(uri))


def _bucket_path(parsed: urllib.parse.ParseResult) -> str:
    """``bucket/key`` without trailing slash, as ``from_uri`` returns it for s3:// and gs://."""
    bucket = parsed.netloc.rpartition("@")[2]
    return (bucket + urllib.parse.unquote(parsed.path)).rstrip("/")


def filesystem(uri: PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``uri`` and the path of ``uri`` on it.

    Local paths give ``(LocalFileSystem, absolute path)``. Remote URIs go through
    ``pyarrow.fs.FileSystem.from_uri`` (which honours ``AWS_ENDPOINT_URL``); for s3:// and gs:// the
    filesystem is cached per scheme, bucket, URI query and relevant environment, since ``from_uri``
    makes a network round trip to resolve the bucket's region.
    """
    uri = os.fspath(uri)
    if not is_remote(uri):
        return _LOCAL, _local_path(uri)
    if uri.startswith("hf://"):
        return _hf_filesystem(), uri[len("hf://"):]
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme not in _BUCKET_SCHEMES:
        return pafs.FileSystem.from_uri(uri)
    key = (scheme, parsed.netloc, parsed.query, *(os.environ.get(k) for k in _ENV_KEYS))
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs, _ = pafs.FileSystem.from_uri(urllib.parse.urlunparse(parsed._replace(path="")))
            _cache[key] = fs
    return fs, _bucket_path(parsed)


def _hf_filesystem() -> pafs.FileSystem:
    # The hub's datasets (hf://datasets/<repo>/<path>) through huggingface_hub's fsspec implementation, wrapped
    # so callers see one pyarrow filesystem API (token from HF_TOKEN or the hub login, as huggingface_hub does).
    from huggingface_hub import HfFileSystem

    return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem()))


def join(uri: PathLike, *parts: str) -> str:
    """``uri`` with ``parts`` appended, separated by exactly one ``/`` (paths and URIs alike)."""
    base = os.fspath(uri)
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return base
    if not base:
        return tail
    return base.rstrip("/") + "/" + tail


def exists(uri: PathLike) -> bool:
    """True when a file or directory (object stores: an object, a prefix or a bucket) exists."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: PathLike) -> None:
    """Create the directory and its parents; fine if it exists. Never creates buckets."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: PathLike) -> bytes:
    """Whole contents of a file."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(uri: PathLike, data: bytes) -> None:
    """Write a file, replacing it. Local writes create parent directories and are atomic
    (temporary file in the same directory, then ``os.replace``); object-store writes are atomic by
    nature (the object appears when the upload completes)."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    path = _local_path(uri)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode instead
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_text(uri: PathLike, encoding: str = "utf-8") -> str:
    """Whole contents of a text file."""
    return read_bytes(uri).decode(encoding)


def write_text(uri: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write a text file, replacing it (same guarantees as :func:`write_bytes`)."""
    write_bytes(uri, text.encode(encoding))


def listdir(uri: PathLike) -> list[str]:
    """Sorted names (not paths) of the entries directly inside a directory.

    Raises FileNotFoundError when it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=False, recursive=False))
    return sorted(posixpath.basename(info.path.rstrip("/")) for info in infos)


def find(uri: PathLike, name: str) -> list[str]:
    """Sorted paths (URIs for object storage) of every file called `name` anywhere under the directory `uri`;
    [] when it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    root = os.fspath(uri).rstrip("/")
    return sorted(join(root, posixpath.relpath(i.path, path)) for i in infos
                  if i.type == pafs.FileType.File and posixpath.basename(i.path) == name)


def remove_tree(uri: PathLike) -> None:
    """Delete a directory with everything below it, or a single file; nothing if it is missing.

    On a bucket root (``s3://bucket``) the contents are deleted but the bucket is kept."""
    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    elif is_remote(uri) and "/" not in path.strip("/"):
        fs.delete_dir_contents(path, missing_dir_ok=True)
    else:
        if not is_remote(uri) and os.path.dirname(path) == path:
            raise ValueError(f"refusing to remove the filesystem root {path!r}")
        fs.delete_dir(path)


def upload_dir(local_dir: PathLike, uri: PathLike) -> None:
    """Copy the local directory ``local_dir`` recursively into ``uri`` (merging, overwriting)."""
    src = _local_path(local_dir)
    if not os.path.isdir(src):
        raise NotADirectoryError(src)
    if not is_remote(uri):
        shutil.copytree(src, _local_path(uri), dirs_exist_ok=True)
        return
    fs, path = filesystem(uri)
    pafs.copy_files(src, path, source_filesystem=_LOCAL, destination_filesystem=fs)


def upload_file(local_file: PathLike, uri: PathLike) -> None:
    """Copy one local file to ``uri`` (streamed, never read whole into memory)."""
    src = _local_path(local_file)
    if not is_remote(uri):
        dst = _local_path(uri)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
        return
    fs, path = filesystem(uri)
    pafs.copy_files(src, path, source_filesystem=_LOCAL, destination_filesystem=fs)


def download_dir(uri: PathLike, local_dir: PathLike) -> None:
    """Copy the directory ``uri`` recursively into the local directory ``local_dir`` (merging)."""
    dst = _local_path(local_dir)
    if not is_remote(uri):
        shutil.copytree(_local_path(uri), dst, dirs_exist_ok=True)
        return
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no directory at {os.fspath(uri)}")
    os.makedirs(dst, exist_ok=True)
    pafs.copy_files(path, dst, source_filesystem=fs, destination_filesystem=_LOCAL)


def local_copy(uri: str, complete: str) -> Path:
    """A local folder with the contents of the immutable folder `uri` (object-store folders are downloaded once
    per node, into ~/.cache/raysmol/remote); `complete` names a file whose presence marks a finished copy."""
    import hashlib
    from pathlib import Path

    if not is_remote(uri):
        return Path(uri)
    dest = Path(os.path.expanduser("~/.cache/raysmol/remote")) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (dest / complete).exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        download_dir(uri, tmp)
        os.replace(tmp, dest) if not dest.exists() else shutil.rmtree(tmp)
    return dest


def model_folder(uri: str) -> str:
    """A Hugging Face model folder on this node for `uri`: a local folder or run directory as is, or the copy of
    one on object storage (a run directory's hf/ export when it has one)."""
    if not is_remote(uri):
        return uri
    hf = join(uri, "hf")
    return str(local_copy(hf if exists(join(hf, "config.json")) else uri, "config.json"))


def ray_storage(uri: PathLike) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` so Ray writes where we do.

    Local paths give ``(absolute path, None)``. Remote URIs give the path on the filesystem plus the
    filesystem itself (same endpoint as :func:`filesystem`); Ray pickles it to its workers with the
    endpoint but without credentials, which every worker reads from its own environment.
    """
    if not is_remote(uri):
        return _local_path(uri), None
    fs, path = filesystem(uri)
    return path, fs


def jsonl_objects(uri: PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a jsonl file; a line that is not a JSON object raises
    `error` naming the file and line."""
    for lineno, line in enumerate(read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{uri}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise error(f"{uri}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def records(uri: PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a jsonl or parquet file (local, s3://, hf://); `where` names file and line
    or row for error messages, and a file that cannot be read raises `error` naming it."""
    uri = os.fspath(uri)
    if any(c in uri for c in "*?["):  # a glob over one folder's files (the hub's sharded parquet splits)
        import fnmatch

        parent, pattern = uri.rsplit("/", 1)
        try:
            names = sorted(n for n in listdir(parent) if fnmatch.fnmatch(n, pattern))
        except (OSError, FileNotFoundError) as e:
            raise error(f"{uri}: cannot list {parent}: {e}") from e
        if not names:
            raise error(f"{uri}: no file matches")
        for name in names:
            yield from records(join(parent, name), error)
        return
    try:
        if uri.endswith(".parquet"):
            import pyarrow.parquet as pq

            fs, path = filesystem(uri)
            for i, row in enumerate(pq.read_table(path, filesystem=fs).to_pylist()):
                yield f"{uri} row {i}", row
            return
        rows = list(jsonl_objects(uri, error))
    except (OSError, pa.ArrowInvalid) as e:
        raise error(f"{uri}: cannot read it as {'parquet' if uri.endswith('.parquet') else 'jsonl'}: {e}") from e
    for lineno, row in rows:
        yield f"{uri}:{lineno}", row
