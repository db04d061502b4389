"""accelmesh wire formats (sans-I/O)."""
