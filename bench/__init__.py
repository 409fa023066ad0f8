"""The charge-throughput benchmark (``make bench``): our charge stage and DAG run against the
emulator, beside the naive loop over the official client. See BENCHMARKS.md."""
