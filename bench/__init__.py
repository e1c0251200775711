"""Side-by-side benchmarks of durable_streams and DBOS Transact; run ``python -m bench``."""
