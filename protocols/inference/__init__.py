"""The inference protocol: messages and rules (see SPEC.md beside this file)."""
