"""Transports: how bytes move between tier clients and the tier server.

Both sides import from here (never client from server), so one transport is one file:

- :mod:`~kvtier.transport.validation`: key and size limits every transport enforces;
- :mod:`~kvtier.transport.grpc_channel`: gRPC options and hand-framed ``Get`` data chunks;
- :mod:`~kvtier.transport.tcp_bulk`: the raw-TCP bulk read port (framing, server, client reader).
"""
