"""LLM providers: one module per provider, plus the shared interface (`base`) and the registry."""
