"""Benchmarks of roiqa's components; each is a module with `main(argv) -> int` (`python -m benchmarks.<name>`)."""
