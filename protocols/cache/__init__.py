"""The cache protocol: messages and rules (see SPEC.md beside this file)."""
