"""Mask strategies: one window per (timestep, layer, head), in FastVideo's JSON format
(keys ``"t_l_h"`` -> ``[kt, kh, kw]``), optionally gzipped."""

from __future__ import annotations

import collections
import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

from .config import check_triple
from .geometry import Triple


@dataclass(frozen=True, slots=True)
class MaskStrategy:
    """Windows indexed ``[step][layer][head]``; every step has every layer and head."""

    windows: tuple[tuple[tuple[Triple, ...], ...], ...]

    @property
    def num_steps(self) -> int:
        return len(self.windows)

    @property
    def num_layers(self) -> int:
        return len(self.windows[0])

    @property
    def num_heads(self) -> int:
        return len(self.windows[0][0])

    def layer_windows(self, step: int, layer: int) -> tuple[Triple, ...]:
        """One window per head of ``layer`` at ``step``."""
        for name, value, n in (("step", step, self.num_steps), ("layer", layer, self.num_layers)):
            if not 0 <= value < n:
                raise IndexError(f"{name} must be in [0, {n}), got {name}={value}")
        return self.windows[step][layer]

    def sta_param(self) -> list:
        """Nested lists ``[step][layer][head] -> [kt, kh, kw]``, FastVideo's ``STA_param``."""
        return [[[list(w) for w in layer] for layer in step] for step in self.windows]

    def layer_window_counts(self) -> Mapping[tuple[Triple, ...], int]:
        """How often each distinct per-layer window set occurs over all steps and layers."""
        return collections.Counter(layer for step in self.windows for layer in step)

    def items(self) -> Iterator[tuple[str, Triple]]:
        for s, step in enumerate(self.windows):
            for l, layer in enumerate(step):
                for h, w in enumerate(layer):
                    yield f"{s}_{l}_{h}", w

    @staticmethod
    def from_dict(entries: Mapping[str, object]) -> "MaskStrategy":
        """Parse ``{"t_l_h": [kt, kh, kw]}``; every index from 0 must be present."""
        table: dict[tuple[int, int, int], Triple] = {}
        for key, value in entries.items():
            parts = str(key).split("_")
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise ValueError(f"mask strategy keys must be 'step_layer_head' ints, got key={key!r}")
            table[tuple(int(p) for p in parts)] = check_triple(f"mask strategy[{key!r}]", value)  # type: ignore[index]
        if not table:
            raise ValueError("mask strategy must have at least one entry, got an empty mapping")
        dims = [max(k[i] for k in table) + 1 for i in range(3)]
        missing = [
            f"{s}_{l}_{h}" for s in range(dims[0]) for l in range(dims[1]) for h in range(dims[2])
            if (s, l, h) not in table
        ]
        if missing:
            raise ValueError(
                f"mask strategy must give every (step, layer, head) up to {dims}, missing keys {missing[:5]}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        return MaskStrategy(tuple(
            tuple(tuple(table[(s, l, h)] for h in range(dims[2])) for l in range(dims[1]))
            for s in range(dims[0])
        ))

    @staticmethod
    def uniform(window: Triple, num_steps: int, num_layers: int, num_heads: int) -> "MaskStrategy":
        w = check_triple("window", window)
        return MaskStrategy(((((w,) * num_heads),) * num_layers,) * num_steps)

    @staticmethod
    def load(path: str | os.PathLike) -> "MaskStrategy":
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt") as f:
            return MaskStrategy.from_dict(json.load(f))

    def save(self, path: str | os.PathLike) -> None:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "wt") as f:
            json.dump({k: list(w) for k, w in self.items()}, f)
