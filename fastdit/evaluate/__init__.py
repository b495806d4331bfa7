"""Sample quality: FID, Inception Score and precision/recall of a sample .npz against a reference.

    fid.py        the statistics and distances (Frechet distance, IS, k-NN precision/recall), .npz streaming
    inception.py  the FID Inception-v3 (TF graph 2015-12-05) in plain PyTorch, weights from a local file
    run.py        one sample .npz against a reference .npz (stored or computed statistics); the command
                  `python -m fastdit.evaluate` (__main__.py)
"""
