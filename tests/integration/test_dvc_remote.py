"""DVC remote outage: the push fails with a message naming the remote; the next run pushes everything."""

from __future__ import annotations

import logging

import pytest

from benchmarks.workspace import dvc, git
from flows.dvc_workspace import push_data
from flows.limits import StageFailed

LOG = logging.getLogger("test")


@pytest.fixture
def tracked_workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    git(ws, "init", "-q")
    dvc(ws, "init", "-q")
    (ws / "data").mkdir()
    (ws / "data" / "images.bin").write_bytes(b"\x00" * 4096)
    (ws / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: cp data/images.bin out.bin\n    deps: [data/images.bin]\n    outs: [out.bin]\n"
    )
    dvc(ws, "repro")
    return ws


def test_push_without_a_remote_keeps_outputs_local(tracked_workspace):
    assert push_data(tracked_workspace, LOG) == {"remote": None, "pushed": False}


def test_unreachable_remote_fails_with_its_name_and_the_next_push_sends_everything(tracked_workspace, tmp_path):
    ws = tracked_workspace
    # /sys refuses writes even to root: a remote that cannot take the data.
    dvc(ws, "remote", "add", "-d", "storage", "/sys/tp-dvc-remote")
    with pytest.raises(StageFailed, match="dvc push to remote 'storage' failed"):
        push_data(ws, LOG)
    assert (ws / "out.bin").read_bytes() == b"\x00" * 4096  # the run's outputs stay complete locally

    dvc(ws, "remote", "modify", "storage", "url", str(tmp_path / "remote"))  # the remote is back
    assert push_data(ws, LOG) == {"remote": "storage", "pushed": True}
    status = dvc(ws, "status", "--cloud").stdout
    assert "in sync" in status, status
