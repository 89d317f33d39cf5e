"""``msdda report``: from a sweep folder, the Pareto plot, the reward-against-KL plot, hypervolumes, weighted and
regularised objectives, path KLs (to the base, to retrained oracles), costs and grids, written as report.md,
report.html and metrics.json beside the sweep's tables.

Its parts: msdda.report.load (the sweep's curves), msdda.report.summary (the numbers), msdda.report.plots (the
figures), msdda.report.render (Markdown and HTML)."""

from __future__ import annotations

import json
from pathlib import Path

from msdda.errors import UserError
from msdda.report.load import grid_prompts, learns_variances, load_curves
from msdda.report.optimality import recorded_gauges
from msdda.report.plots import kl_plot, method_grids, pareto_plot
from msdda.report.render import (
    LEARNED_PRECISION_NOTE,
    NO_STEP_NOTE,
    PRECISION_NOTE,
    STEP_NOTE,
    TRAJECTORY_NOTE,
    html_page,
    markdown,
    report_tables,
)
from msdda.report.summary import coincidences, compute_metrics, step_optimum_check

__all__ = ["build_report"]


def build_report(folder: str | Path, reference_point: list[float] | None = None, resamples: int = 200) -> Path:
    """Write pareto.png, kl.png, grids/, metrics.json, report.md and report.html into the sweep ``folder``."""
    folder = Path(folder)
    curves, names, config = load_curves(folder)
    if reference_point is not None and len(reference_point) != len(names):
        raise UserError(f"reference point {reference_point} needs one value per reward {names}")
    metrics = compute_metrics(curves, names, reference_point, resamples, config["beta"])
    metrics["step_optimum"] = step_optimum_check(curves, names, config.get("adapter_betas"))
    metrics["optimality"] = recorded_gauges(config.get("adapters") or [])
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = f"MSDDA sweep: {' vs '.join(names)}"
    pareto_plot(curves, names, folder / "pareto.png", title)
    kl_plot(curves, names, folder / "kl.png",
            "Reward against path KL to the base (methods with no Gaussian kernel left out)")
    grids = {label: str(path.relative_to(folder)) for label, path in method_grids(folder, curves).items()}
    notes = [" " + note for note in coincidences(curves)]
    intro = [f"{metrics['samples_per_cell']} samples per cell ({config.get('num_prompts') or 'all'} prompts × seeds "
             f"{config.get('seeds')}), base {config.get('base')}, adapters {config.get('adapters')}.",
             f"Hypervolume reference point: {[round(v, 4) for v in metrics['reference_point']]} "
             f"({metrics['reference_point_rule']})." + "".join(notes), TRAJECTORY_NOTE,
             STEP_NOTE if any(m["step_objective"] for m in metrics["methods"].values()) else NO_STEP_NOTE]
    if "msdda" in metrics["methods"]:
        intro.append(LEARNED_PRECISION_NOTE if learns_variances(config.get("adapters") or []) else PRECISION_NOTE)
    tables = report_tables(metrics, names)
    shown = grid_prompts(folder, config)
    grid_caption = (f"Rows: weights w = ({', '.join(names)}). Columns: the first seed of {shown}.")
    plots = {"Pareto plot": "pareto.png", "Reward against path KL to the base": "kl.png"}
    (folder / "report.md").write_text(markdown(title, intro, tables, plots, grids, grid_caption))
    (folder / "report.html").write_text(html_page(title, intro, tables, plots, grids, grid_caption))
    return folder / "report.md"
