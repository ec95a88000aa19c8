"""A READ into memory the caller hands back (a KV cache) must never land after the call
returns: with ``settle`` the agent waits until a timed-out transfer is aborted or over.

Between two processes of one host, UCX moves a READ inside the call that posts it, so a
transfer still in flight after its deadline cannot be made to happen here (it can over
RDMA): these tests put a stand-in for NIXL's agent object behind a real
:class:`~kvtier.transport.nixl.NixlAgent` to drive that state, and say so.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvtier.transport import nixl

pytestmark = pytest.mark.skipif(not nixl.available(), reason="nixl not installed")


class InFlight:
    """NIXL's agent API, for a READ that stays in flight until ``lands`` polls, and whose
    handle cannot be released while it is (as NIXL refuses to release an active one)."""

    def __init__(self, lands: int):
        self.polls, self.lands, self.released = 0, lands, False

    def get_xfer_descs(self, descs, mem):  # noqa: ANN001, ANN201
        return descs

    def initialize_xfer(self, op, local, remote, peer):  # noqa: ANN001, ANN201
        return "handle"

    def transfer(self, handle):  # noqa: ANN001, ANN201
        return "PROC"

    def check_xfer_state(self, handle):  # noqa: ANN001, ANN201
        self.polls += 1
        return "DONE" if self.polls >= self.lands else "PROC"

    def release_xfer_handle(self, handle) -> None:  # noqa: ANN001
        if self.polls < self.lands:
            raise RuntimeError("NIXL_ERR_REPOST_ACTIVE")
        self.released = True


def _agent(fake: InFlight) -> nixl.NixlAgent:
    a = nixl.NixlAgent.__new__(nixl.NixlAgent)  # the real class, around the stand-in
    a._agent, a._lock, a.name, a._remotes = fake, threading.Lock(), "test", {}
    return a


DESC = np.array([[0, 8]], dtype=np.uint64)


def test_a_settled_read_returns_only_once_the_transfer_is_over() -> None:
    fake = InFlight(lands=10**9)
    agent = _agent(fake)
    fake.lands = 50  # lands long after the 1 ms deadline
    with pytest.raises(nixl.NixlError, match="timed out"):
        agent.transfer("READ", "peer", DESC, DESC, 0.001, settle=True)
    assert fake.released and fake.polls >= 50


def test_an_unsettled_read_gives_up_at_its_deadline() -> None:
    fake = InFlight(lands=10**9)
    with pytest.raises(nixl.NixlError, match="timed out"):
        _agent(fake).transfer("READ", "peer", DESC, DESC, 0.001)
    assert not fake.released  # staging is discarded instead: never reused
