"""``kvtier router``: an OpenAI-compatible prefill/decode (PD) router for vLLM.

It speaks vLLM's PD protocol as vLLM's own toy proxy does (prefill with
``max_tokens: 1`` and ``do_remote_decode``; the prefill's ``kv_transfer_params``
go unchanged to decode), so it works with KVTierConnector and with any other
connector speaking that protocol. It imports no vLLM: it runs in a slim image.
"""

from kvtier.router.app import RouterConfig, create_app, run

__all__ = ["RouterConfig", "create_app", "run"]
