"""Trace-driven simulation of the tier: hit rate and bytes per hit for admission x eviction."""
