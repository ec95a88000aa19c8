"""Waiting for the tier from outside an engine, as a real client (a router, a test) could.

An engine's connector uploads in the background; nothing in production flushes
it between requests. Tests that need a save to have landed ask the tier itself
until the expected boundary is restorable, with a deadline that fails the test
(and says why, from ``kvtier explain``) instead of passing on a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kvtier.backends import open_backend
from kvtier.explain import explain_prompt
from kvtier.manifest import load_manifests


class TierWaitTimeout(AssertionError):
    """The tier did not reach the expected state before the deadline."""


def wait_restorable(url: str, token_ids: Sequence[int], tokens: int, timeout_s: float = 30.0,
                    namespace: str | None = None, poll_s: float = 0.05,
                    **open_kwargs: Any) -> dict[str, Any]:
    """Block until ``tokens`` of ``token_ids`` are restorable from the tier at ``url``.

    ``namespace`` (hex) picks one namespace when several engines layouts or tenants
    share the tier; by default the tier must hold exactly one. Returns the final
    ``explain`` report; raises :class:`TierWaitTimeout` with the last report's reason.
    """
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] | str = "no namespace manifest yet"
    with open_backend(url, **open_kwargs) as b:
        while True:
            manifests = load_manifests(b)
            if namespace is not None:
                m = manifests.get(namespace)
            else:
                m = next(iter(manifests.values())) if len(manifests) == 1 else None
                if len(manifests) > 1:
                    last = f"{len(manifests)} namespaces; pass namespace="
            if m is not None:
                last = explain_prompt(b, m, token_ids)
                if last["hit_tokens"] >= tokens:
                    return last
            if time.monotonic() > deadline:
                why = last if isinstance(last, str) else (
                    f"{last['hit_tokens']} tokens restorable: {last['why']}")
                raise TierWaitTimeout(
                    f"{tokens} of {len(token_ids)} tokens not restorable from {url} after "
                    f"{timeout_s:.0f}s ({why})")
            time.sleep(poll_s)
