"""Entry points a Ray job runs (`python -m jobs.<verb> ...`); each has `main(argv) -> int`."""
