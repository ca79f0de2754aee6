"""The chart of a run: calls/s per configuration, 1 against 8 clients (PNG, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["draw"]


def draw(data: dict[str, Any], path: Path) -> bool:
    """Draw the pinned table of ``data`` (``results.json``) to ``path``; False if empty.

    Raises ``ImportError`` when matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = data.get("tables", {}).get("pinned", {})
    if not table:
        return False
    labels = [next(iter(by_n.values()))["label"] for by_n in table.values()]
    counts = sorted({int(n) for by_n in table.values() for n in by_n})
    height = 0.8 / max(1, len(counts))
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(labels) + 1.8))
    colors = ["#9ecae1", "#3182bd", "#08519c", "#6baed6"]
    for k, n in enumerate(counts):
        ys, values, lo, hi = [], [], [], []
        for i, by_n in enumerate(table.values()):
            row = by_n.get(str(n))
            if row is None or "calls_per_s" not in row:  # failed
                continue
            ys.append(i + (k - (len(counts) - 1) / 2) * height)
            values.append(row["calls_per_s"])
            lo.append(row["calls_per_s"] - row["calls_per_s_min"])
            hi.append(row["calls_per_s_max"] - row["calls_per_s"])
        ax.barh(ys, values, height=height, xerr=[lo, hi], capsize=2,
                color=colors[k % len(colors)], label=f"{n} client{'s' if n > 1 else ''}")
        for y, v, h in zip(ys, values, hi, strict=True):
            ax.text(v + h, y, f"  {v:,.0f}", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("calls/s (median of rounds; bars: min..max)")
    settings = data.get("settings", {})
    ax.set_title(
        "list_posts(limit=20), server pinned to one CPU, clients on the other "
        f"({settings.get('rounds', '?')} x {settings.get('window_s', '?')} s)",
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
