"""Waiting for the tier from outside an engine, as a real client (a router, a test) could.

An engine's connector uploads in the background; nothing in production flushes
it between requests. Tests that need a save to have landed ask the tier itself
until the expected boundary is restorable, with a deadline that fails the test
(and says why, from ``kvtier explain``) instead of passing on a timeout.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kvtier.backends import open_backend
from kvtier.explain import explain_prompt
from kvtier.manifest import load_manifests

T = TypeVar("T")


class TierWaitTimeout(AssertionError):
    """The tier did not reach the expected state before the deadline."""


def wait_until(fn: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.05) -> T:
    """Poll ``fn`` until it returns something truthy (returned); on the deadline fail
    with ``what`` and the last value seen, instead of passing on a timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TierWaitTimeout(f"not true after {timeout_s:.0f}s: {what} (last: {value!r})")
        time.sleep(poll_s)


def scrape_metrics(port: int, host: str = "127.0.0.1") -> dict[tuple[str, tuple], float]:
    """A Prometheus endpoint's samples as ``{(name, sorted labels): value}``: what an
    outside observer sees of an engine that may be busy generating."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


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
