"""A sweep's report as text: its tables from the metrics (msdda.report.summary), written as Markdown and HTML."""

from __future__ import annotations

import html

from msdda.report.optimality import GAUGE_CAPTION, GAUGE_HEADER, gauge_rows
from msdda.report.summary import OBJECTIVES
from msdda.sweep.grid import weight_key

__all__ = ["report_tables", "markdown", "html_page", "TRAJECTORY_NOTE", "STEP_NOTE", "NO_STEP_NOTE", "PRECISION_NOTE",
           "LEARNED_PRECISION_NOTE", "NO_KERNEL"]


NO_KERNEL = "no Gaussian kernel"
"""What the tables say instead of a KL for a method whose step is not one Gaussian kernel (CoDe)."""


TRAJECTORY_NOTE = (
    "The regularised objective is the trajectory-level one, what a user sees: sum_i w_i r_i of the terminal sample "
    "minus beta times the path KL to the base, sum over steps of KL(method kernel || base kernel) at the method's own "
    "states.")


STEP_NOTE = (
    "The step-level objective is the one MSDDA's kernel is exact for and each adapter was trained on: sum over steps "
    "of sum_i w_i r_i,t minus beta times that step's KL, with the tweedie step reward r_i,t = r_i of the base's x0 "
    "estimate at the state the step reaches (of x_0 at the last step). The two objectives rank methods alike only as "
    "far as the step rewards track the terminal ones; the table of best methods shows where they do not.")


NO_STEP_NOTE = ("The step-level objective (the one MSDDA is exact for) is not reported: it is measured only for "
                "adapters trained with the tweedie step reward.")


PRECISION_NOTE = (
    "MSDDA's fused precision, P = (1 - sum_i l_i) / s_ref^2 + sum_i l_i / s_i^2, is 1 / s^2 > 0 at every weight "
    "here, off the simplex too: every kernel has the scheduler's variance s^2. (With learned variances it can turn "
    "non-positive, and sampling refuses such weights.)")


LEARNED_PRECISION_NOTE = (
    "MSDDA's fused precision, P = (1 - sum_i l_i) / s_ref^2 + sum_i l_i / s_i^2, weights each kernel by its own "
    "learned variance here, so MSDDA parts from output averaging (the weighted mean of the means and of the "
    "log-variances) as far as the variances differ. Sampling refuses weights where P is not positive; every cell of "
    "this sweep sampled.")


def _cell_text(value: dict[str, float] | None) -> str:
    return "" if value is None else f"{value['mean']:.4g} ± {value['sem']:.2g}"


def _point_at(method: dict, key: str, own_cell_only: bool = False) -> dict | None:
    """The method's cell standing for weights ``key``: its own there, or (unless ``own_cell_only``) its only one
    when it ignores weights."""
    points = method["points"]
    found = next((p for p in points if weight_key(p["weights"]) == key), None)
    if found is not None or own_cell_only or len(points) != 1 or method["sweeps_weights"]:
        return found
    return points[0]


def _objective_table(metrics: dict, field: str, keys: list[str]) -> list[list[str]]:
    """Rows per weight vector, a column per method: ``field`` there (mean ± s.e.), the best method's in bold; where
    the field needs a KL and the method has none (CoDe), the cell says so."""
    best = metrics["best"].get(field, {})
    rows = []
    for key in keys:
        row = [key]
        for label, method in metrics["methods"].items():
            if field != "weighted_objective" and not method["gaussian"]:
                row.append(NO_KERNEL)
                continue
            text = _cell_text(method[field].get(key))
            row.append(f"**{text}**" if text and best.get(key) == label else text)
        rows.append(row)
    return rows


def _point_table(metrics: dict, keys: list[str], value, own_cell_only: bool = False) -> list[list[str]]:
    """Rows per weight vector, a column per method: ``value(point, method)`` of the cell standing for it."""
    rows = []
    for key in keys:
        row = [key]
        for method in metrics["methods"].values():
            point = _point_at(method, key, own_cell_only)
            row.append("" if point is None else value(point, method))
        rows.append(row)
    return rows


def _kl_text(field: str):
    def text(point: dict, method: dict) -> str:
        return _cell_text(point.get(field)) if method["gaussian"] else NO_KERNEL
    return text


def _difference_table(metrics: dict, field: str, keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """MSDDA minus each other method on ``field`` (paired by prompt and seed), rows per weight vector."""
    others = [label for label, m in metrics["methods"].items() if "msdda_minus" in m]
    rows = [[key] + [_cell_text(metrics["methods"][label]["msdda_minus"].get(key, {}).get(field)) or
                     (NO_KERNEL if not metrics["methods"][label]["gaussian"] and field != "weighted_objective" else "")
                     for label in others] for key in keys]
    return others, rows


def report_tables(metrics: dict, names: list[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    methods = metrics["methods"]
    labels = list(methods)
    keys = [weight_key(w) for w in metrics["weights"]]
    weights_header = f"w ({', '.join(names)})"
    volume_rows = [[label, f"{m['hypervolume']:.4g} ± {m['hypervolume_sem']:.2g}"] for label, m in methods.items()]
    cost_rows = [[label, f"{m['costs']['seconds_per_image']:.3f}", f"{m['costs']['unet_rows_per_image']:.0f}",
                  f"{m['costs']['reward_images_per_image']:.0f}",
                  f"{m['costs']['reward_gradient_images_per_image']:.0f}", f"{m['costs']['kl_seconds_per_image']:.3f}",
                  f"{m['costs']['kl_unet_rows_per_image']:.0f}"]
                 for label, m in methods.items()]
    beta = f"beta = {metrics['beta']:g}"
    tables = [("Hypervolume (± bootstrap standard error)", ["method", "hypervolume"], volume_rows)]
    for index, name in enumerate(names):
        tables.append((f"Mean {name} per cell (± standard error)", [weights_header, *labels],
                       _point_table(metrics, keys, lambda p, m, i=index: f"{p['mean'][i]:.4g} ± {p['sem'][i]:.2g}")))
    tables += [
        ("Weighted objective sum_i w_i r_i of the terminal sample (mean ± standard error; best in bold)",
         [weights_header, *labels], _objective_table(metrics, "weighted_objective", keys)),
        (f"Trajectory-level objective sum_i w_i r_i - beta * path KL to the base ({beta}; mean ± paired standard "
         "error; best in bold)", [weights_header, *labels], _objective_table(metrics, "regularised_objective", keys)),
    ]
    measured_steps = any(m["step_objective"] for m in methods.values())
    if measured_steps:
        tables.append((f"Step-level objective sum_t (sum_i w_i r_i,t - beta * KL_t), tweedie step rewards ({beta}; "
                       "mean ± paired standard error; best in bold)", [weights_header, *labels],
                       _objective_table(metrics, "step_objective", keys)))
    if "msdda" in methods:
        for field, caption in (("regularised_objective", "trajectory-level"), ("step_objective", "step-level")):
            if field == "step_objective" and not measured_steps:
                continue
            others, rows = _difference_table(metrics, field, keys)
            tables.append((f"MSDDA minus each method on the {caption} objective, paired by (prompt, seed) "
                           "(mean ± standard error of the differences)", [weights_header, *others], rows))
    tables.append(("Best method per weight vector under each objective", [weights_header, "terminal rewards",
                   "trajectory-level", *(["step-level"] if measured_steps else [])],
                   [[key, *(metrics["best"][field].get(key, "") for field in OBJECTIVES
                            if field != "step_objective" or measured_steps)] for key in keys]))
    tables.append(("Path KL to the base, sum over steps of KL(method || base) at the method's own states, per cell "
                   "(mean ± standard error)", [weights_header, *labels], _point_table(metrics, keys,
                                                                                     _kl_text("kl_to_base"))))
    # a KL to the oracle at w belongs to the cell sampled at w (the base's one cell has one to its own weights' oracle)
    oracle_keys = [k for k in keys if any((_point_at(m, k, True) or {}).get("kl_to_oracle") for m in methods.values())]
    if oracle_keys:
        tables.append(("Path KL to the oracle retrained at w, sum over steps of KL(method || oracle) at the method's "
                       "own states (mean ± standard error)", [weights_header, *labels],
                       _point_table(metrics, oracle_keys, _kl_text("kl_to_oracle"), own_cell_only=True)))
    if metrics.get("step_optimum"):
        tables.append(("Each adapter against its step optimum: its own reward's gain over the base (paired), its path "
                       "KL, and the beta they imply, terminal gain / (2 KL) (the step gains add up to the terminal "
                       "one; equal to the trained beta at the step optimum of a locally linear reward, above it where "
                       "the adapter stopped short, below it where it went too far; an aggregate over steps: the gauge "
                       "below checks each step). The tweedie step rewards summed along the path count each early "
                       "shift again at every later step",
                       ["reward", "trained beta", "terminal gain", "step rewards summed along the path",
                        "path KL to the base", "implied beta"],
                       [[c["reward"], f"{c['beta']:g}", _cell_text(c["terminal_gain"]), _cell_text(c["step_gain"]),
                         _cell_text(c["kl_to_base"]), f"{c['implied_beta']:.3g}"] for c in metrics["step_optimum"]]))
    if metrics.get("optimality"):
        tables.append((GAUGE_CAPTION, GAUGE_HEADER, gauge_rows(metrics["optimality"])))
    tables.append(("Cost per image (mean over the method's cells; KL measurement apart)",
                   ["method", "seconds", "UNet rows", "reward calls (images)", "of them with gradient", "KL seconds",
                    "KL UNet rows"], cost_rows))
    return tables


def markdown(title: str, intro: list[str], tables, plots: dict[str, str], grids: dict[str, str],
              grid_caption: str) -> str:
    lines = [f"# {title}", "", *intro, ""]
    for alt, plot in plots.items():
        lines += [f"![{alt}]({plot})", ""]
    for caption, header, rows in tables:
        lines += [f"## {caption}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += ["## Images per method", "", grid_caption, ""]
    for label, path in grids.items():
        lines += [f"### {label}", "", f"![{label}]({path})", ""]
    return "\n".join(lines)


def _bold(cell: str) -> str:
    """Markdown's **bold** of a table cell as HTML."""
    return f"<b>{cell[2:-2]}</b>" if cell.startswith("**") and cell.endswith("**") else cell


def html_page(title: str, intro: list[str], tables, plots: dict[str, str], grids: dict[str, str],
          grid_caption: str) -> str:
    escape = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{padding:2px 8px;"
             "border-bottom:1px solid #ddd}img{max-width:100%}</style>", f"<h1>{escape(title)}</h1>"]
    parts += [f"<p>{escape(line)}</p>" for line in intro]
    parts += [f"<img src='{escape(plot)}' alt='{escape(alt)}'>" for alt, plot in plots.items()]
    for caption, header, rows in tables:
        parts.append(f"<h2>{escape(caption)}</h2><table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{_bold(escape(c))}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append(f"<h2>Images per method</h2><p>{escape(grid_caption)}</p>")
    for label, path in grids.items():
        parts.append(f"<h3>{escape(label)}</h3><img src='{escape(path)}' alt='{escape(label)}'>")
    return "\n".join(parts)
