"""``msdda studio``: a local web app to move adapter weights and see fused samples at once.

:mod:`msdda.studio.core` holds the logic (one loaded pipeline, a render per setting of the controls) apart from
the UI, :mod:`msdda.studio.app` the Gradio page, :mod:`msdda.studio.sweep` a sweep folder as the page shows it.
Importing this package imports neither Gradio nor torch.
"""
