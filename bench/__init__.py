"""Benchmarks run by hand; results and commands in BUILD_NOTES.md."""
