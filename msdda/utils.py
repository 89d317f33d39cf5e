"""Neutral helpers every layer may use: parsing seed and number lists, tiling images into a grid, checking where a
local server listens."""

from __future__ import annotations

import ipaddress
import socket

from msdda.errors import UserError

__all__ = ["parse_seeds", "parse_floats", "image_grid", "SMALL_IMAGE", "is_loopback", "check_port"]

SMALL_IMAGE = 64
"""Images this wide or narrower (the world's are 32x32) are upscaled 4x in grids so that a person can read them."""


def parse_seeds(text: str) -> list[int]:
    """'0-15' -> 0..15; '1,4,9' -> [1, 4, 9]."""
    seeds: list[int] = []
    for part in text.split(","):
        start, separator, end = part.strip().partition("-")
        try:
            seeds.extend(range(int(start), int(end) + 1) if separator else [int(start)])
        except ValueError as error:
            raise UserError(f"--seeds {text!r} must look like '0-15' or '1,4,9'") from error
    if not seeds:
        raise UserError("--seeds names no seed")
    return seeds


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as error:
        raise UserError(f"--{what} {text!r} must be comma-separated numbers, e.g. 0.3,0.7") from error


def image_grid(images: list, columns: int | None = None):
    """PIL images tiled into one grid image; small images upscaled 4x without smoothing."""
    from PIL import Image

    columns = columns or min(len(images), 8)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    upscale = 4 if width <= SMALL_IMAGE else 1
    return grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (only this machine reaches a server bound to it)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_port(host: str, port: int) -> None:
    """Refuse a port that is no port, or that ``host`` cannot listen on now, before a server loads anything."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a port; give 1-65535, or leave it out for a free one")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a port a killed one left is free
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); give another --port, or leave it "
                            "out for a free one") from error
