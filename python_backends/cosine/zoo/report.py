"""The zoo's quality bars and how the quality report is written: JSON, heatmap and a printed table."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

from ..contract import GENERAL_DRAFTER  # noqa: E402

SPECIALIST_OVER_GENERAL = 1.3  # a specialist on its domain vs the general drafter there
OWN_OVER_OTHER_DOMAINS = 1.5  # a specialist on its domain vs its average on the other domains
GENERAL_MEAN_ACCEPTED = 1.5  # the general drafter's average over domains
STEP_COST_RATIO = 8.0  # target step cost over a drafter's


def check_bars(report: dict) -> dict:
    """Each bar the demo zoo must clear: its measured value, its threshold and whether it holds."""
    accepted, domains = report["mean_accepted"], list(report["target_heldout_loss"])
    bars = {}
    for domain in domains:
        own = accepted[domain][domain]
        others = [accepted[domain][other] for other in domains if other != domain]
        bars[f"{domain}: specialist / general on {domain}"] = _bar(_ratio(own, accepted[GENERAL_DRAFTER][domain]),
                                                                   SPECIALIST_OVER_GENERAL)
        bars[f"{domain}: own domain / other domains"] = _bar(_ratio(own, sum(others) / len(others)),
                                                             OWN_OVER_OTHER_DOMAINS)
    bars["general: mean accepted over domains"] = _bar(sum(accepted[GENERAL_DRAFTER].values()) / len(domains),
                                                       GENERAL_MEAN_ACCEPTED)
    bars["step cost ratio target / slowest drafter"] = _bar(min(report["step_cost_ratio"].values()), STEP_COST_RATIO)
    return bars


def write_report(report: dict, out_dir: Path, show: bool) -> tuple[Path, Path]:
    json_path, png_path = out_dir / "quality_report.json", out_dir / "quality_report.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    _plot_acceptance(report, png_path)
    if show:
        print(format_table(report))
    return json_path, png_path


def format_table(report: dict) -> str:
    accepted, domains = report["mean_accepted"], list(report["target_heldout_loss"])
    width = max(10, *map(len, domains)) + 2
    lines = [f"{report['acceptance_metric']}, k={report['draft_length']}",
             "drafter".ljust(12) + "".join(d.rjust(width) for d in domains)
             + "mean".rjust(8) + "step ms".rjust(10) + "target/drafter".rjust(16)]
    for name, row in accepted.items():
        lines.append(name.ljust(12) + "".join(f"{row[d]:{width}.2f}" for d in domains)
                     + f"{sum(row.values()) / len(row):8.2f}" + f"{report['step_cost_ms'][name]:10.2f}"
                     + f"{report['step_cost_ratio'][name]:15.1f}x")
    lines.append("target".ljust(12) + "".join(f"{report['target_heldout_loss'][d]:{width}.3f}" for d in domains)
                 + f"{'':8}{report['step_cost_ms']['target']:10.2f}   (row: held-out loss, nats/token)")
    lines += [f"[{'ok' if bar['passed'] else 'FAIL'}] {name}: "
              f"{'unbounded' if bar['value'] is None else format(bar['value'], '.2f')} (>= {bar['threshold']})"
              for name, bar in report.get("bars", {}).items()]
    return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> float:
    # Only untrained models (the tiny profile) accept nothing at all; their ratio is unbounded.
    return numerator / denominator if denominator else math.inf


def _bar(value: float, threshold: float) -> dict:
    # JSON has no infinity: an unbounded value is written as null.
    return {"value": value if math.isfinite(value) else None, "threshold": threshold, "passed": value >= threshold}


def _plot_acceptance(report: dict, path: Path) -> None:
    accepted, domains = report["mean_accepted"], list(report["target_heldout_loss"])
    drafters = list(accepted)
    values = [[accepted[name][domain] for domain in domains] for name in drafters]
    figure, axes = plt.subplots(figsize=(1.6 * len(domains) + 2, 0.7 * len(drafters) + 1.5))
    image = axes.imshow(values, cmap="viridis", vmin=0, vmax=report["draft_length"])
    axes.set_xticks(range(len(domains)), domains)
    axes.set_yticks(range(len(drafters)), drafters)
    axes.set_xlabel("domain of the prompts")
    axes.set_ylabel("drafter")
    for row, name in enumerate(drafters):
        for column, domain in enumerate(domains):
            axes.text(column, row, f"{accepted[name][domain]:.2f}", ha="center", va="center", color="white")
    figure.colorbar(image, label=f"accepted draft tokens per round (of {report['draft_length']})")
    axes.set_title("Greedy speculative acceptance, drafter x domain")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
