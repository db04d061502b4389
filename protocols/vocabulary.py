"""The words every protocol and the runtime share, defined once here and imported everywhere else."""

from __future__ import annotations

__all__ = ["TASKS", "ACCELERATOR_KINDS", "CACHE_MODES", "CACHE_TIERS", "MAX_PEER_ID_LENGTH"]

TASKS = ("generate", "chat", "embed")  # what a request asks for: a prompt, chat messages, embeddings
ACCELERATOR_KINDS = ("cuda", "rocm", "mps", "cpu")  # the devices an advert lists and `accelerator=` names
# How a request uses the cache (INTERFACES.md "Cache modes").
CACHE_MODES = ("default", "no-store", "no-cache", "only-if-cached", "force", "private")
CACHE_TIERS = ("memory", "local", "cluster", "miss", "bypass")  # where an answer came from
MAX_PEER_ID_LENGTH = 128  # characters a peer id may have in any message; an Ed25519 peer id is 52
