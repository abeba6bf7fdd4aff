"""PNG plots of benchmark summaries (rows from stats.summarize, acceptance from stats.acceptance_by_domain)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _closed_loop_by_mode(rows: list[dict]) -> dict[str, list[dict]]:
    lines: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda row: row["level"]):
        if row["load"] == "concurrency":
            lines.setdefault(row["mode"], []).append(row)
    return lines


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def throughput_vs_latency(rows: list[dict], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for mode, line in _closed_loop_by_mode(rows).items():
        x = [row["token_latency_p50"] * 1000 for row in line]
        y = [row["tokens_per_s"] for row in line]
        axes.plot(x, y, marker="o", label=mode)
        for row, xi, yi in zip(line, x, y):
            axes.annotate(f"{row['level']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set(xlabel="p50 per-token latency (ms)", ylabel="output tokens/s",
             title="Throughput vs latency (labels: concurrency)")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def speedup_vs_concurrency(rows: list[dict], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    levels = set()
    for mode, line in _closed_loop_by_mode(rows).items():
        line = [row for row in line if "throughput_vs_autoregressive" in row]
        levels.update(row["level"] for row in line)
        ratios = [row["throughput_vs_autoregressive"] for row in line]
        # bars: the range of the rounds' paired ratios, where several rounds ran
        spans = [row.get("throughput_vs_autoregressive_range", (ratio, ratio)) for row, ratio in zip(line, ratios)]
        axes.errorbar([row["level"] for row in line], ratios, yerr=[[r - lo for r, (lo, _) in zip(ratios, spans)],
                                                                     [hi - r for r, (_, hi) in zip(ratios, spans)]],
                      marker="o", capsize=3, label=mode)
    axes.axhline(1.0, color="gray", linewidth=0.8)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(levels), [f"{level:g}" for level in sorted(levels)])
    axes.set(xlabel="concurrency", ylabel="throughput / autoregressive",
             title="Speedup over autoregressive (bars: range over rounds)")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def acceptance_by_domain(acceptance: dict[str, dict[str, float]], path: Path) -> Path:
    domains = sorted({domain for per_domain in acceptance.values() for domain in per_domain})
    width = 0.8 / max(1, len(acceptance))
    figure, axes = plt.subplots(figsize=(max(6.5, 1.2 * len(domains)), 4.5))
    for i, (mode, per_domain) in enumerate(acceptance.items()):
        axes.bar([d + i * width for d in range(len(domains))], [per_domain.get(d, 0.0) for d in domains],
                 width, label=mode)
    axes.set_xticks([d + width * (len(acceptance) - 1) / 2 for d in range(len(domains))], domains)
    axes.set(ylabel="accepted draft tokens per round", title="Mean accepted length per domain")
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    return _save(figure, path)


def write_plots(rows: list[dict], acceptance: dict[str, dict[str, float]], out_dir: Path) -> list[Path]:
    """Writes the plots there is data for; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    closed_loop = [row for row in rows if row["load"] == "concurrency"]
    if closed_loop:
        written.append(throughput_vs_latency(rows, out_dir / "throughput_vs_latency.png"))
        if any("throughput_vs_autoregressive" in row for row in closed_loop):
            written.append(speedup_vs_concurrency(rows, out_dir / "speedup_vs_concurrency.png"))
    if acceptance:
        written.append(acceptance_by_domain(acceptance, out_dir / "acceptance_by_domain.png"))
    return written
