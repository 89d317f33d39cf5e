"""The studio's page: weight sliders and sampling controls on the left, the fused grid (and a baseline's) on the
right, and, given a sweep, its Pareto plot with each cell's samples. All sampling goes through :class:`Studio`.

Gradio is imported with its analytics off, and the page uses system fonts, so neither the server nor the browser
reaches outside the machine.
"""

from __future__ import annotations

import os
import warnings

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads the variable at import
# Gradio's queue summarises its own events with pandas (locally, for its monitoring page) in calls that pandas 3
# deprecates: two warnings per event, about Gradio's code, that would bury the studio's own messages
warnings.filterwarnings("ignore", module=r"gradio\.queueing")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from msdda.errors import UserError  # noqa: E402
from msdda.fuse.methods import get_method, method_names  # noqa: E402
from msdda.studio.core import Render, Studio  # noqa: E402
from msdda.studio.sweep import SweepView  # noqa: E402

__all__ = ["build_app", "serve", "THEME", "CSS", "WEIGHT_MAXIMUM"]

WEIGHT_MAXIMUM = 1.5
"""The sliders' top: above 1 so that weights off the simplex (where MSDDA brings in the reference) are reachable."""
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
"""Gradio's default look with system fonts: its own theme would have the browser fetch web fonts."""
CSS = """
#studio-grid img, #studio-baseline img, #sweep-strip img { image-rendering: pixelated; }
#studio-message:empty { display: none; }
"""
"""The world's images are 32x32: scaled up, they should stay sharp squares, not blur."""


def _gallery(render: Render) -> list[tuple[Image.Image, str]]:
    return [(sample.image, f"#{index + 1}") for index, sample in enumerate(render.samples)]


def _timing(renders: list[Render]) -> str:
    return " · ".join(f"{r.method}: {len(r.samples)} images in {r.seconds:.2f} s"
                      + ("" if r.kl_pending or not r.kl_seconds else f", path KL in {r.kl_seconds:.2f} s more")
                      for r in renders)


def _scores(render: Render | None) -> str:
    return "" if render is None else f"**{render.method}**\n\n{render.table()}"


def _error(message: str) -> str:
    return f"**Cannot sample:** {message}"


def build_app(studio: Studio, sweep: SweepView | None = None) -> gr.Blocks:
    """The page for one loaded studio (and optionally one sweep). Every control change runs one render (two
    side by side), queued so that at most one sampling runs at a time and only the latest setting is sampled;
    the grid and its scores show first, and a second event then measures and shows the path KLs."""
    adapters = studio.pipeline.adapters
    count = len(adapters)
    methods = method_names()
    with gr.Blocks(title="msdda studio", analytics_enabled=False) as app:
        gr.Markdown(f"## msdda studio\nBase `{studio.pipeline.base_model}`, {count} adapters; rewards "
                    f"{', '.join(studio.reward_names)}. Served on this machine only (loopback), without login.")
        with gr.Tab("Fuse"):
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    sliders = [gr.Slider(0.0, WEIGHT_MAXIMUM, value=round(1.0 / count, 2) if count else 0.0, step=0.05,
                                         label=f"weight: {label}", info=adapter.source, elem_id=f"weight-{index}")
                               for index, (label, adapter) in enumerate(zip(studio.adapter_labels, adapters))]
                    method = gr.Dropdown(methods, value="msdda", label="method", elem_id="method")
                    with gr.Row():
                        compare = gr.Checkbox(False, label="side by side with a baseline", elem_id="compare")
                        baseline = gr.Dropdown([m for m in methods if m != "msdda"], value="soup", label="baseline",
                                               elem_id="baseline")
                    # 0 stands for "not given": a Number left empty reaches the server as no number at all
                    beta = gr.Number(0.0, label="beta, the fused objective's KL weight (0: sum_i w_i beta_i / "
                                     f"sum_i w_i; the adapters': {', '.join(f'{b:g}' for b in studio.pipeline.betas)})",
                                     elem_id="beta")
                    steps = gr.Slider(1, 50, value=int(studio.default("num_inference_steps", 10)), step=1,
                                      label="steps", elem_id="steps")
                    guidance = gr.Slider(0.0, 15.0, value=float(studio.default("guidance_scale", 3.0)), step=0.25,
                                         label="guidance scale", elem_id="guidance")
                    seed = gr.Number(0, precision=0, label="seed (the same noise for every weight)", elem_id="seed")
                    if studio.is_world:
                        from msdda.world.data import COLOURS, POSITIONS, SHAPES

                        with gr.Row():
                            prompt_parts = [gr.Dropdown(list(COLOURS), value="red", label="colour", elem_id="colour"),
                                            gr.Dropdown(list(SHAPES), value="circle", label="shape", elem_id="shape"),
                                            gr.Dropdown(list(POSITIONS), value="left", label="position",
                                                        elem_id="position")]
                    else:
                        prompt_parts = [gr.Textbox("a photo of a cat", label="prompt (Enter samples)",
                                                   elem_id="prompt")]
                    with gr.Accordion("CoDe", open=False):
                        candidates = gr.Slider(2, 32, value=20, step=1, label="candidates per block")
                        block = gr.Slider(1, 20, value=5, step=1, label="block (steps)")
                with gr.Column(scale=2):
                    message = gr.Markdown("", elem_id="studio-message")
                    grid = gr.Gallery(label="fused samples", columns=4, rows=1, format="png", object_fit="contain",
                                      height=300, allow_preview=False, elem_id="studio-grid")
                    scores = gr.Markdown("", elem_id="studio-scores")
                    baseline_grid = gr.Gallery(label="baseline", columns=4, rows=1, format="png", object_fit="contain",
                                               height=300, allow_preview=False, visible=False,
                                               elem_id="studio-baseline")
                    baseline_scores = gr.Markdown("", elem_id="studio-baseline-scores")
                    timing = gr.Markdown("", elem_id="studio-timing")
        controls = {*sliders, method, compare, baseline, beta, steps, guidance, seed, *prompt_parts, candidates, block}

        def prompt_of(values: dict) -> str:
            if not studio.is_world:
                return values[prompt_parts[0]]
            from msdda.world.data import Attributes, prompt_for

            return prompt_for(Attributes(*(values[part] for part in prompt_parts)))

        shown: dict[str, list[Render]] = {}  # the renders on the page, whose KLs the second event measures

        def update(values: dict):
            settings = dict(beta=values[beta] or None, steps=values[steps], guidance=values[guidance],
                            seed=int(values[seed] or 0), prompt=prompt_of(values),
                            code_candidates=int(values[candidates]), code_block=int(values[block]))
            weights = [float(values[slider]) for slider in sliders]
            try:
                renders = [studio.render(weights, values[method], defer_kl=True, **settings)]
                if values[compare]:
                    renders.append(studio.render(weights, values[baseline], defer_kl=True, **settings))
            except UserError as error:  # bad input: say so in the page and keep serving; anything else is a bug
                gr.Warning(str(error))
                shown.clear()
                return _error(str(error)), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            shown["renders"] = renders
            first, second = renders[0], renders[1] if len(renders) > 1 else None
            title = f"{get_method(first.method).label}: {settings['prompt']}, seed {settings['seed']}"
            return ("", gr.Gallery(_gallery(first), label=title), _scores(first),
                    gr.Gallery(visible=False) if second is None else
                    gr.Gallery(_gallery(second), visible=True, label=f"baseline: {get_method(second.method).label}"),
                    _scores(second), _timing(renders))

        def measure_kl():
            renders = shown.pop("renders", None)
            if renders is None:  # nothing new on the page (the render was refused)
                return gr.skip(), gr.skip(), gr.skip()
            renders = [render.with_kl() for render in renders]
            return _scores(renders[0]), _scores(renders[1] if len(renders) > 1 else None), _timing(renders)

        queued = dict(trigger_mode="always_last", concurrency_id="render", concurrency_limit=1,
                      show_progress="minimal")
        events = dict(fn=update, inputs=controls, outputs=[message, grid, scores, baseline_grid, baseline_scores,
                                                             timing], **queued)
        kl_event = dict(fn=measure_kl, inputs=None, outputs=[scores, baseline_scores, timing], **queued)
        for slider in (*sliders, steps, guidance, candidates, block):
            slider.release(**events).success(**kl_event)
        for control in (method, compare, baseline, beta, seed, *prompt_parts):
            (control.submit if isinstance(control, gr.Textbox) else control.change)(**events).success(**kl_event)
        app.load(**events).success(**kl_event)
        if sweep is not None:
            _sweep_tab(sweep)
    return app


def _sweep_tab(sweep: SweepView) -> None:
    """The sweep's Pareto plot; a click on a point (or the picker) shows that cell's samples and numbers."""
    names = [cell.name for cell in sweep.cells]

    def clicked(event: gr.SelectData):
        x, y = event.index
        cell = sweep.nearest(float(x), float(y))
        return gr.skip() if cell is None else cell.name

    def show(name: str):
        cell = sweep.cell(name)
        return (Image.open(cell.strip) if cell.strip is not None else None), sweep.describe(cell)

    with gr.Tab("Sweep"):
        gr.Markdown(f"Sweep `{sweep.folder}`: click a point of the plot, or pick a cell, to see its samples "
                    "(the sweep's first prompts at its first seed).")
        with gr.Row():
            plot = gr.Image(Image.open(sweep.plot), label="Pareto plot (click a point)", interactive=False,
                            format="png", elem_id="sweep-plot", buttons=[])
            with gr.Column():
                picker = gr.Dropdown(names, value=names[0], label="cell", elem_id="sweep-cell")
                first, text = show(names[0])
                strip = gr.Image(first, label="samples", interactive=False, format="png", elem_id="sweep-strip",
                                 buttons=[])
                numbers = gr.Markdown(text, elem_id="sweep-numbers")

    plot.select(clicked, None, picker)
    picker.change(show, picker, [strip, numbers])


def serve(app: gr.Blocks, host: str, port: int | None) -> str:
    """Start serving on ``host:port`` in a background thread (``port`` None: Gradio's 7860 or the next free one)
    and return the URL; ``app.block_thread()`` then serves until interrupted, ``app.close()`` stops."""
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                           mcp_server=False, footer_links=[], theme=THEME, css=CSS, show_error=False)
    return url
