"""fastdit.kernels: fused Triton kernels for the DiT block (installed from the top-level kernels/)."""
