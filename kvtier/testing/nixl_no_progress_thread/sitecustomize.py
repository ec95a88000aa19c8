"""Put this folder on ``PYTHONPATH`` to run vLLM's NixlConnector without NIXL's progress thread.

vLLM builds its NIXL agent with ``nixl_agent_config``'s default ``enable_prog_thread=True``
and offers no setting for it; that thread polls UCX with no delay, a whole core per agent
even when idle, which stalls engines on a 2-core machine (design notes §7). This hook
flips the default before vLLM imports NIXL (in every process of the server), so UCX
progresses only when the connector calls into NIXL. Used by ``kvtier bench pd``.
"""

from __future__ import annotations

import os

# vLLM sets this only if NIXL is not imported yet; NIXL is imported here first.
os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")

try:
    import nixl._api as _api
except ImportError:  # no NIXL: nothing to patch (vLLM will say it is not available)
    _api = None

if _api is not None and not getattr(_api.nixl_agent_config, "_kvtier_no_prog", False):
    _init = _api.nixl_agent_config.__init__

    def _no_prog_thread_init(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        kwargs["enable_prog_thread"] = False
        _init(self, *args, **kwargs)

    _api.nixl_agent_config.__init__ = _no_prog_thread_init
    _api.nixl_agent_config._kvtier_no_prog = True
