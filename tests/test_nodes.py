"""raysmol/nodes.py: which nodes see a local path, and the refusal that names the key (the cluster itself, with
a node on its own disk, is in test_private_disks.py)."""

from __future__ import annotations

import os

import pytest

from raysmol import nodes
from raysmol.config import ConfigError


def test_a_fingerprint_tells_the_same_file_from_another(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same")
    b.write_text("same")
    assert nodes.fingerprint(str(a)) == nodes.fingerprint(str(a))
    assert nodes.fingerprint(str(a)) != nodes.fingerprint(str(b))  # another inode: another disk's copy
    assert nodes.fingerprint(str(tmp_path))[1] == 0 and nodes.fingerprint(str(tmp_path / "nowhere")) is None


def test_a_one_node_cluster_sees_everything(ray_local, tmp_path):
    assert nodes.unseen([str(tmp_path), "s3://bucket/runs", str(tmp_path / "nowhere")]) == {}


def test_the_refusal_names_each_key_its_path_and_the_nodes(monkeypatch, tmp_path):
    cache, runs = str(tmp_path / "cache"), str(tmp_path / "runs")
    monkeypatch.setattr(nodes, "unseen", lambda paths: {os.path.abspath(cache): ["10.0.1.7 (3f2a9c1d)"]})
    with pytest.raises(ConfigError) as e:
        nodes.require_shared({"run.output_dir": runs, "data.cache_dir": cache}, "the training workers read them")
    msg = str(e.value)
    assert f"data.cache_dir={cache}: not visible from node(s) 10.0.1.7 (3f2a9c1d)" in msg
    assert "run.output_dir" not in msg and "data.cache_dir=s3://BUCKET/cache" in msg
    nodes.require_shared({"run.output_dir": runs}, "x")  # what every node sees passes
