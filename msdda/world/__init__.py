"""Worlds msdda ships so that everything runs and is checked without a model hub.

``msdda.world.analytic``: Gaussian data with exact denoiser and exact step optima, for proofs.
"""
