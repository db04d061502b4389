"""Fakes that implement the real interfaces (never mocks of our own code)."""
