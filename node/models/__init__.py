"""Models that ship inside the package (built offline by build_tiny.py)."""
