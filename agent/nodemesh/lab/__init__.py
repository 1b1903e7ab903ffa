"""A lab of network namespaces for the demo, the tests and the benchmarks (see topology.py)."""
