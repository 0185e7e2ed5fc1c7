"""Module paths as a plan shows them: ``emb, blocks.0-11`` instead of every submodule's path.

Kept apart from the search so that the name of a stage's span (``StagePlan.module_span``) is
made in one place, whatever builds the stage.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lightning_rannc._utils import layer_of

__all__ = ["describe_span", "layer_of"]


def describe_span(paths: Sequence[str], depth: int = 2) -> str:
    """Compress module paths into ranges: ``["emb", "blocks.0.attn", "blocks.1"]`` -> ``"emb, blocks.0-1"``."""
    heads = list(dict.fromkeys(layer_of(p, depth) or "<top>" for p in paths))
    parts: list[str] = []
    run: tuple[str, int, int] | None = None
    for head in heads:
        match = re.fullmatch(r"(.*)\.(\d+)", head)
        if match and run and run[0] == match[1] and int(match[2]) == run[2] + 1:
            run = (run[0], run[1], int(match[2]))
            continue
        if run:
            parts.append(_range_text(run))
            run = None
        if match:
            run = (match[1], int(match[2]), int(match[2]))
        else:
            parts.append(head)
    if run:
        parts.append(_range_text(run))
    return ", ".join(parts)


def _range_text(run: tuple[str, int, int]) -> str:
    prefix, first, last = run
    return f"{prefix}.{first}" if first == last else f"{prefix}.{first}-{last}"
