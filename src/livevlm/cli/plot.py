"""The timeline plot of `livevlm stream --plot`: p(speak) over time, the decision line, what was said.

Readable at any length: each query and response is a numbered mark on the time axis, the numbers are
packed into as many rows as it takes for none to overlap, and the texts go into a numbered list under
the plot (truncated to one line each), so nothing is drawn over anything else or outside the figure.
"""

from __future__ import annotations

import math

TEXT_CHARS = 45  # each listed text is cut to this many characters
LIST_COLUMNS = 3


def pack_rows(positions: list[float], min_gap: float) -> list[int]:
    """Greedy interval packing: the row of each label (positions in ascending order, in axes fractions)
    such that two labels in one row are at least `min_gap` apart. Returns one row index per position."""
    last_in_row: list[float] = []
    rows = []
    for x in positions:
        for row, last in enumerate(last_in_row):
            if x - last >= min_gap:
                last_in_row[row] = x
                rows.append(row)
                break
        else:
            last_in_row.append(x)
            rows.append(len(last_in_row) - 1)
    return rows


def _clean(text: str) -> str:
    text = "".join(c for c in text if c.isprintable())  # a model may emit control characters
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"


def _fit(label, prefix: str, text: str, width_px: float, renderer) -> None:
    """Set `prefix + text` on a text artist, cutting the text (with "…") until it fits its column."""
    label.set_text(prefix + text)
    while text and label.get_window_extent(renderer).width > width_px:
        text = text[: max(0, len(text) - 4)]
        label.set_text(prefix + text.rstrip() + "…")


def plot_timeline(timeline: list[tuple[float, float]], said: list[tuple[float, str, str]], path: str,
                  threshold: float) -> None:
    """Save the plot as a PNG.

    Args:
        timeline: (stream time, p_speak) per frame.
        said: (stream time, "user" | "assistant", text), in stream order.
        threshold: θ; the model speaks where p(speak) > 1 − θ, drawn as the decision line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([t for t, _ in timeline] + [t for t, _, _ in said] + [1.0])
    width_in = 14.0
    min_gap = 0.03  # axes fraction between two numbers of one row (~0.4 inch at this width)
    rows = pack_rows([t / end for t, _, _ in said], min_gap)
    label_rows = max(rows, default=-1) + 1
    list_rows = math.ceil(len(said) / LIST_COLUMNS)
    plot_h, label_h, row_h = 3.0, 0.18, 0.2
    height = plot_h + label_rows * label_h + list_rows * row_h + 1.0
    fig = plt.figure(figsize=(width_in, height))
    top = 1 - (0.25 + label_rows * label_h) / height
    bottom = 1 - (0.25 + label_rows * label_h + plot_h) / height
    ax = fig.add_axes((0.06, bottom, 0.9, top - bottom))
    if timeline:
        times, probs = zip(*timeline, strict=True)
        ax.plot(times, probs, color="black", linewidth=0.8, label="p(speak)")
    ax.axhline(1 - threshold, color="grey", linestyle="--", linewidth=0.8,
               label=f"speaks when p(speak) > {1 - threshold:.3f} (θ = {threshold:g})")
    for k, ((time_s, role, _), row) in enumerate(zip(said, rows, strict=True)):
        color = "tab:green" if role == "assistant" else "tab:blue"
        ax.axvline(time_s, color=color, alpha=0.5, linewidth=0.8)
        ax.annotate(str(k + 1), (time_s, 1.0), xytext=(0, 3 + row * label_h * 72), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7, color=color, annotation_clip=False)
    ax.set_xlim(0, end)
    ax.set_ylim(0, 1)
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel("p(speak)")
    ax.legend(loc="upper left", fontsize=7, framealpha=0.9)
    renderer = fig.canvas.get_renderer()
    column_px = (0.96 / LIST_COLUMNS - 0.02) * width_in * fig.dpi
    for k, (time_s, role, text) in enumerate(said):
        column, line = divmod(k, list_rows) if list_rows else (0, 0)
        y = (bottom * height - 0.6 - line * row_h) / height
        who = "User" if role == "user" else "Assistant"
        label = fig.text(0.02 + column * (0.96 / LIST_COLUMNS), y, "", fontsize=7, family="monospace",
                         color="tab:green" if role == "assistant" else "tab:blue",
                         parse_math=False)  # "$5 … $6" is not TeX
        _fit(label, f"{k + 1:>3}  {time_s:6.1f}s  {who}: ", _clean(text), column_px, renderer)
    fig.savefig(path, dpi=110)
    plt.close(fig)
