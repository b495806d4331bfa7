"""DiT weights on disk: reading every layout, exporting, converting.

    layout.py   the training checkpoint folder (tags, latest, meta.json, file names): writer and readers
    load.py     weights from every layout fastdit meets (official, exports, training checkpoints) and
                the model that matches them
    safe_load.py  every checkpoint file read with weights_only=True and a short allowlist (no code runs on
                load), DeepSpeed's own loads included; --trust-checkpoint
    export.py   a training checkpoint as a plain official-layout state dict (`python -m fastdit.export`)
    interop.py  official <-> fastdit <-> diffusers' DiTTransformer2DModel (`python -m fastdit.interop`)
"""
