"""Benchmarks (``kvtier bench ...``), each printed beside a reference measured in the same run.

One module per benchmark, each runnable as ``python -m kvtier.benches.<name>``.
"""
