"""Python state across two servers sharing one Redis and one S3 endpoint: a session continues on either
node with its variables, and a node's live kernel is dropped once the other node has run the session."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.nsjail


def test_a_session_moves_between_nodes_with_its_variables(bases: tuple[Path, Path], redis_url: str,
                                                          s3_endpoint: str) -> None:  # fmt: skip
    shared = {"REDIS_URL": redis_url, "S3_ENDPOINT": s3_endpoint, "S3_REGION": "us-east-1",
              "S3_BUCKET": f"kernels-{secrets.token_hex(6)}", "STATE_MAX_REDIS_SIZE_MB": "0.01"}  # fmt: skip
    node_a, node_b = ServerProcess(bases[0], **shared), ServerProcess(bases[1], **shared)
    node_a.start()
    node_b.start()
    try:
        first = node_a.exec("count = 1\nblob = bytes(50_000)", "py")  # over 10 kB: the checkpoint goes to S3
        sid = first["session_id"]
        on_b = node_b.exec("count += 1\ncount, len(blob)", "py", session_id=sid)
        assert (on_b["stdout"], on_b["runtime_status"]) == ("(2, 50000)\n", "restored")
        # Node A still has a live kernel with count == 1: its generation is stale, so it must not be used.
        back_on_a = node_a.exec("count += 1\ncount", "py", session_id=sid)
        assert (back_on_a["stdout"], back_on_a["runtime_status"]) == ("3\n", "restored")
        again_on_a = node_a.exec("count", "py", session_id=sid)
        assert (again_on_a["stdout"], again_on_a["runtime_status"]) == ("3\n", "reused")  # now current
    finally:
        assert node_a.stop() == 0
        assert node_b.stop() == 0
