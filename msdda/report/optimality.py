"""The sweep report's table of each adapter's distance from its step optimum, from the gauge its training recorded
(msdda.train.gauge; ``optimality`` in ``msdda_adapter.json``)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["recorded_gauges", "gauge_rows", "GAUGE_CAPTION", "GAUGE_HEADER"]

GAUGE_CAPTION = ("Each adapter's distance from its step optimum, as its training gauged it on held-out states: "
                 "|d| / |d*| (its mean shift against the optimum's, 1 at the optimum) and cos(d, d*) per step, from "
                 "the reference's states; the worst step that carries KL, by that ratio and by the scale condition "
                 "(|scale beta / beta - 1|: 0 where every step's shift is at its best multiple, which per-step scales "
                 "reach); and the beta at which it is step-optimal. MSDDA's exponents w_i beta_i / beta are exact for "
                 "adapters at their optimum")
GAUGE_HEADER = ["adapter", "trained beta", "implied beta", "worst |ratio - 1| (steps with KL)",
                "worst |scale beta / beta - 1|", "ratio per step", "cosine per step"]


def recorded_gauges(adapters: Sequence[str]) -> dict[str, dict]:
    """Adapter source -> its recorded gauge, for the adapters that have one."""
    from msdda.adapters import METADATA_FILE, load_adapter_metadata, resolve_adapter

    gauges = {}
    for source in adapters:
        folder = resolve_adapter(source)
        if (folder / METADATA_FILE).is_file():
            gauge = load_adapter_metadata(folder).optimality
            if gauge:
                gauges[source] = gauge
    return gauges


def gauge_rows(gauges: dict[str, dict]) -> list[list[str]]:
    """The table's rows, one per adapter."""
    def numbers(rows: list[dict], key: str) -> str:
        return " ".join("n/a" if row[key] is None else f"{row[key]:.2f}" for row in rows)

    table = []
    for source, gauge in gauges.items():
        rows = gauge["sources"].get("reference") or next(iter(gauge["sources"].values()))
        worst, implied, scale = gauge["max_ratio_deviation"], gauge["implied_beta"], gauge.get("max_scale_deviation")
        table.append([source, f"{gauge['beta']:g}", "none" if implied is None else f"{implied:.3g}",
                      "n/a" if worst is None else f"{worst:.2f}", "n/a" if scale is None else f"{scale:.2f}",
                      numbers(rows, "ratio"), numbers(rows, "cosine")])
    return table
