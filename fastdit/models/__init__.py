"""DiT models: `reference` is the eager oracle; `dit` is the fast model (same registry and state dict)."""
from .reference import DiT as ReferenceDiT, DiT_models as ReferenceDiT_models  # noqa: F401
