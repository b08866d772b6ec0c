"""raysmol.storage on a local directory and on an s3:// bucket of a real (moto) S3 server."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raysmol import storage


def _new_bucket(s3_server) -> str:
    return s3_server.bucket(f"raysmol-test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path: Path) -> str:
    """An empty directory: a local path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    s3_server = request.getfixturevalue("s3_server")
    return storage.join(_new_bucket(s3_server), "root")


def _tree(base: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()
    }


def test_is_remote_and_join():
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b")
    assert storage.is_remote("hdfs://h/x")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("rel/x")
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote(Path("/tmp"))
    assert storage.join("s3://b", "a", "c.txt") == "s3://b/a/c.txt"
    assert storage.join("s3://b/", "/a/", "c/") == "s3://b/a/c"
    assert storage.join("/tmp/x/", "/y") == "/tmp/x/y"
    assert storage.join("/", "y") == "/y"
    assert storage.join("s3://b") == "s3://b"


def test_filesystem_local_and_file_uri(tmp_path: Path):
    fs, path = storage.filesystem("file://" + str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    fs, path = storage.filesystem("relative/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.abspath("relative/dir")


def test_filesystem_s3_uses_endpoint_from_env(s3_server):
    bucket = _new_bucket(s3_server)
    fs, path = storage.filesystem(storage.join(bucket, "a", "b/"))
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == bucket.removeprefix("s3://") + "/a/b"
    # Same path as pyarrow itself derives; the filesystem object is cached per bucket.
    assert pafs.FileSystem.from_uri(storage.join(bucket, "a", "b/"))[1] == path
    assert storage.filesystem(storage.join(bucket, "other"))[0] is fs


def test_bytes_text_exists_listdir(root: str):
    assert not storage.exists(root)
    storage.makedirs(storage.join(root, "sub", "deeper"))
    storage.makedirs(storage.join(root, "sub", "deeper"))  # idempotent
    assert storage.exists(storage.join(root, "sub", "deeper"))

    storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01\xff")
    storage.write_text(storage.join(root, "t.txt"), "héllo\n")
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"\x00\x01\xff"
    assert storage.read_text(storage.join(root, "t.txt")) == "héllo\n"
    storage.write_text(storage.join(root, "t.txt"), "replaced")
    assert storage.read_text(storage.join(root, "t.txt")) == "replaced"
    storage.write_text(storage.join(root, "new", "parent", "f.txt"), "x")  # parents implied

    assert storage.exists(root) and storage.exists(storage.join(root, "t.txt"))
    assert not storage.exists(storage.join(root, "missing.txt"))
    assert storage.listdir(root) == ["b.bin", "new", "sub", "t.txt"]
    assert storage.listdir(storage.join(root, "sub")) == ["deeper"]
    with pytest.raises(FileNotFoundError):
        storage.listdir(storage.join(root, "missing"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing.txt"))

    storage.remove_tree(storage.join(root, "t.txt"))  # a single file
    storage.remove_tree(storage.join(root, "sub"))
    storage.remove_tree(storage.join(root, "nothing-here"))  # missing: no-op
    assert storage.listdir(root) == ["b.bin", "new"]
    storage.remove_tree(root)
    assert not storage.exists(root)


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path):
    target = tmp_path / "f.txt"
    storage.write_text(str(target), "one")
    storage.write_text(str(target), "two")
    assert target.read_text() == "two"
    assert os.listdir(tmp_path) == ["f.txt"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_upload_download_roundtrip(root: str, tmp_path: Path):
    src = tmp_path / "src"
    files = {
        "top.txt": b"top",
        "a/one.bin": os.urandom(1000),
        "a/b/c/deep.json": b'{"k": 1}',
        "z/empty-file": b"",
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)

    dest = storage.join(root, "ckpt")
    storage.upload_dir(src, dest)
    assert storage.listdir(dest) == ["a", "top.txt", "z"]
    assert storage.read_bytes(storage.join(dest, "a/b/c/deep.json")) == b'{"k": 1}'

    out = tmp_path / "out"
    storage.download_dir(dest, out)
    assert _tree(out) == files

    storage.remove_tree(dest)
    assert not storage.exists(dest)
    with pytest.raises(FileNotFoundError):
        storage.download_dir(dest, tmp_path / "out2")


def test_remove_tree_on_bucket_root_keeps_bucket(s3_server):
    bucket = _new_bucket(s3_server)
    storage.write_text(storage.join(bucket, "x/y.txt"), "y")
    storage.remove_tree(bucket)
    assert storage.exists(bucket) and storage.listdir(bucket) == []


def test_ray_storage(s3_server, tmp_path: Path):
    assert storage.ray_storage(str(tmp_path / "rel")) == (str(tmp_path / "rel"), None)

    bucket = _new_bucket(s3_server)
    path, fs = storage.ray_storage(storage.join(bucket, "ray_results"))
    assert path == bucket.removeprefix("s3://") + "/ray_results"
    assert isinstance(fs, pafs.S3FileSystem)
    fs.create_dir(path + "/exp")
    with fs.open_output_stream(path + "/exp/marker") as f:
        f.write(b"from ray_storage")
    with fs.open_input_stream(path + "/exp/marker") as f:
        assert f.read() == b"from ray_storage"
    # ...and it is the same server that storage.* talks to.
    assert storage.read_bytes(storage.join(bucket, "ray_results/exp/marker")) == b"from ray_storage"
    # Ray pickles the filesystem to its workers: the endpoint travels, the credentials do not.
    state = fs.__reduce__()[1][0]
    assert state["endpoint_override"] == s3_server.endpoint and state["secret_key"] is None
    assert pickle.loads(pickle.dumps(fs)).get_file_info(path + "/exp/marker").size == 16


def test_subprocess_inheriting_env_sees_same_server(s3_server, tmp_path: Path):
    """A separate process (like a Ray worker) configured only by the inherited environment."""
    bucket = _new_bucket(s3_server)
    storage.write_text(storage.join(bucket, "from-parent.txt"), "parent")
    path, fs = storage.ray_storage(bucket)
    (tmp_path / "fs.pkl").write_bytes(pickle.dumps(fs))
    script = textwrap.dedent(
        """
        import pickle, sys
        import pyarrow.fs as pafs
        uri, pickled = sys.argv[1], sys.argv[2]
        fs, path = pafs.FileSystem.from_uri(uri)  # what Ray does with a plain storage_path
        with fs.open_input_stream(path + "/from-parent.txt") as f:
            assert f.read() == b"parent"
        with fs.open_output_stream(path + "/from-child.txt") as f:
            f.write(b"child")
        fs2 = pickle.load(open(pickled, "rb"))  # what Ray does with storage_filesystem
        with fs2.open_output_stream(path + "/from-child-pickled.txt") as f:
            f.write(b"child2")
        """
    )
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-c", script, bucket, str(tmp_path / "fs.pkl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert storage.read_text(storage.join(bucket, "from-child.txt")) == "child"
    assert storage.read_text(storage.join(bucket, "from-child-pickled.txt")) == "child2"


def test_hf_uris_go_through_huggingface_hubs_filesystem():
    import pyarrow.fs as pafs

    from raysmol import storage

    # No network here: only the wiring (the hub's fsspec filesystem behind pyarrow, the repo path kept) is checked.
    fs, path = storage.filesystem("hf://datasets/openai/gsm8k/main/train-00000-of-00001.parquet")
    assert isinstance(fs, pafs.PyFileSystem) and "HfFileSystem" in type(fs.handler.fs).__name__
    assert path == "datasets/openai/gsm8k/main/train-00000-of-00001.parquet"


def test_records_read_jsonl_parquet_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysmol import storage

    (tmp_path / "a-1.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
    pq.write_table(pa.table({"x": [3, 4]}), tmp_path / "b.parquet")
    assert [(w.rsplit("/", 1)[1], r) for w, r in storage.records(str(tmp_path / "a-1.jsonl"))] == \
        [("a-1.jsonl:1", {"x": 1}), ("a-1.jsonl:3", {"x": 2})]
    assert [r["x"] for _, r in storage.records(str(tmp_path / "b.parquet"))] == [3, 4]
    (tmp_path / "a-2.jsonl").write_text('{"x": 5}\n')
    assert [r["x"] for _, r in storage.records(str(tmp_path / "a-*.jsonl"))] == [1, 2, 5]
    with pytest.raises(ValueError, match="no file matches"):
        list(storage.records(str(tmp_path / "c-*.jsonl")))


def test_find_lists_every_file_of_a_name_under_a_tree(root: str):
    for rel in ("a/x.jsonl", "a/b/x.jsonl", "a/y.txt", "c/x.jsonl.bak"):
        storage.write_text(storage.join(root, rel), "{}\n")
    assert storage.find(root, "x.jsonl") == [storage.join(root, "a/b/x.jsonl"), storage.join(root, "a/x.jsonl")]
    assert all(storage.read_text(f) == "{}\n" for f in storage.find(root, "x.jsonl"))  # usable as given
    assert storage.find(storage.join(root, "missing"), "x.jsonl") == []
