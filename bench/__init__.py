"""Benchmarks: they print figures (a rich table, then one JSON line), they do not pass or fail."""
