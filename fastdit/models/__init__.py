"""DiT models.

`fastdit.models.DiT_models` / `DiT` are the fast model (fused kernels, attention backends);
`fastdit.models.reference` is the eager oracle. Both share registry keys, constructor and state dict.
"""
from .dit import DiT, DiT_models, constructor_kwargs, from_reference  # noqa: F401
from .reference import DiT as ReferenceDiT, DiT_models as ReferenceDiT_models  # noqa: F401
