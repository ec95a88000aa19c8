"""kvtier: a shared, cluster-wide KV and recurrent-state cache tier for hybrid models."""

__version__ = "0.1.0"
