"""The figures of a study, from its results.json (the paper's block-design and scaling plots, small)."""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List

METRIC_LABEL = {"fd": "digits FD (lower is better)", "fid": "FID (lower is better)"}
COMPUTE_LABEL = "training compute (Gflops x 3 x images seen)"


def _evals(member: Dict[str, Any], scale: float = 1.0) -> List[Dict[str, Any]]:
    return sorted((e for e in member.get("evals", []) if e.get("cfg_scale") == scale), key=lambda e: e["step"])


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_study(results: Dict[str, Any], path: str) -> str:
    if results["study"] == "blocks":
        return plot_blocks(results, path)
    return plot_scaling(results, path)


def _title(results: Dict[str, Any]) -> str:
    b = results["budget"]
    return (f"{os.path.basename(results['config'])}, budget '{b['name']}' ({b['steps']} steps, "
            f"quality every {b['eval_every']}), CFG 1")


def _real_line(ax, members, metric):
    if metric != "fd":
        return
    vals = [e["fd_real"] for m in members for e in _evals(m) if _finite(e.get("fd_real"))]
    if vals:
        ax.axhline(vals[-1], color="grey", ls=":", lw=1, label=f"real vs real ({vals[-1]:.1f})")


def plot_blocks(results: Dict[str, Any], path: str) -> str:
    """Quality vs training steps and vs training compute, one curve per conditioning block."""
    plt = _plt()
    metric = results["metric"]
    members = [m for m in results["members"] if _evals(m)]
    rows = 2 if metric == "fd" else 1
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), dpi=110, squeeze=False)
    for m in members:
        ev = _evals(m)
        steps = [e["step"] for e in ev]
        comp = [e["train_gflops"] for e in ev]
        label = f"{m['label']} ({m['gflops']:.3f} Gflops)"
        q = [e[metric] for e in ev]
        axes[0][0].plot(steps, q, marker="o", label=label)
        axes[0][1].plot(comp, q, marker="o", label=label)
        if rows == 2:
            acc = [100 * e["accuracy"] for e in ev]
            axes[1][0].plot(steps, acc, marker="o", label=m["label"])
            axes[1][1].plot(comp, acc, marker="o", label=m["label"])
    for ax in axes[0]:
        _real_line(ax, members, metric)
        ax.set_ylabel(METRIC_LABEL[metric])
        ax.set_yscale("log")
    if rows == 2:
        for ax in axes[1]:
            ax.set_ylabel("class-conditional accuracy of samples (%)")
            ax.set_ylim(0, 100)
            ax.axhline(10, color="grey", ls="--", lw=0.8, label="chance (10%)")
            ax.axhline(100 * members[0]["evals"][0]["classifier_test_acc"], color="grey", ls=":", lw=1,
                       label="classifier test accuracy") if members else None
    for r in range(rows):
        axes[r][0].set_xlabel("training steps")
        axes[r][1].set_xlabel(COMPUTE_LABEL)
        axes[r][1].set_xscale("log")
        for ax in axes[r]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return _save(fig, "Conditioning blocks: ", results, path)


def _save(fig, title: str, results: Dict[str, Any], path: str) -> str:
    """Title (with the failed members, if any), layout, write `path` (folders made), close; returns path."""
    plt = _plt()
    failed = [m["label"] for m in results["members"] if m.get("status") != "done"]
    fig.suptitle(title + _title(results) + (f"; failed: {', '.join(failed)}" if failed else ""), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_scaling(results: Dict[str, Any], path: str) -> str:
    """Quality vs steps (one curve per model), final quality vs forward Gflops (one line per size and
    one per patch size), and quality vs training compute (one curve per model)."""
    plt = _plt()
    metric = results["metric"]
    members = [m for m in results["members"] if _evals(m)]
    sizes = sorted({m["info"]["size"] for m in members}, key=lambda s: ["S", "B", "L", "XL"].index(s)
                   if s in ("S", "B", "L", "XL") else 9)
    patches = sorted({m["info"]["patch_size"] for m in members}, reverse=True)
    cmap = plt.get_cmap("viridis")
    colour = {s: cmap(i / max(1, len(sizes) - 1) * 0.85) for i, s in enumerate(sizes)}
    style = {p: ls for p, ls in zip(sorted(patches), ["-", "--", ":", "-."])}
    rows = 2 if metric == "fd" else 1
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.3 * rows), dpi=110, squeeze=False)
    keys = [(metric, METRIC_LABEL[metric])] + ([("accuracy", "class-conditional accuracy (%)")] if rows == 2 else [])
    for r, (key, ylabel) in enumerate(keys):
        scale = 100.0 if key == "accuracy" else 1.0
        for m in members:
            ev = _evals(m)
            s, p = m["info"]["size"], m["info"]["patch_size"]
            kw = dict(color=colour[s], ls=style[p], marker="o", ms=3, label=m["label"])
            axes[r][0].plot([e["step"] for e in ev], [scale * e[key] for e in ev], **kw)
            axes[r][2].plot([e["train_gflops"] for e in ev], [scale * e[key] for e in ev], **kw)
        # final quality vs forward Gflops: connect the same size across patches and the same patch across sizes
        final = {(m["info"]["size"], m["info"]["patch_size"]): (m["gflops"], scale * _evals(m)[-1][key])
                 for m in members}
        ax = axes[r][1]
        for s in sizes:
            pts = sorted(v for (ss, _), v in final.items() if ss == s)
            ax.plot([x for x, _ in pts], [y for _, y in pts], color=colour[s], marker="o", label=f"size {s}")
        for p in patches:
            pts = sorted(v for (_, pp), v in final.items() if pp == p)
            ax.plot([x for x, _ in pts], [y for _, y in pts], color="grey", ls=style[p], lw=0.8,
                    label=f"patch {p}")
        for (s, p), (x, y) in final.items():
            ax.annotate(f"{s}/{p}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("forward Gflops (fastdit.flops)")
        axes[r][0].set_xlabel("training steps")
        axes[r][2].set_xlabel(COMPUTE_LABEL)
        axes[r][2].set_xscale("log")
        for c in range(3):
            axes[r][c].set_ylabel(("final " if c == 1 else "") + ylabel)
            axes[r][c].grid(alpha=0.3)
            if key != "accuracy":
                axes[r][c].set_yscale("log")
            else:
                axes[r][c].set_ylim(0, 100)
                axes[r][c].axhline(10, color="grey", ls="--", lw=0.8)
        _real_line(axes[r][1], members, key) if key == metric else None
        axes[r][0].legend(fontsize=7, ncol=2)
        axes[r][1].legend(fontsize=7)
    return _save(fig, "Model size x patch size: ", results, path)
