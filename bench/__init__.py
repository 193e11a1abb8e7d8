"""Benchmarks: programs that print figures against the real local stack (``make bench``).

They are not tests and assert nothing about wall-clock times; see docs/benchmarks.md.
"""
