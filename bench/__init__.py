"""Benchmarks: figures for speed targets, printed, never asserted in tests."""
