"""FastVideo's STA modes (``STA_searching``, ``STA_tuning``, ``STA_tuning_cfg``,
``STA_inference``) at any resolution.

FastVideo 0.1.7's denoising stage refuses every resolution but 69x768x1280 for the search
and tuning modes (its candidate windows are written for that grid, 3x6x10 tiles), and its
saver of search results turns each step's list of per-layer losses into a dict with
``dict(...)``, which loses them. The two stage methods are replaced from outside: the
candidates are scaled to the grid of the canvas actually run, and the losses are saved in
the layout FastVideo's own ``configure_sta`` reads back (``{"L2_loss": {"[kt, kh, kw]":
[step][layer][head]}, "L1_loss": ...}``), so its tuning turns them into a mask strategy in
its format. The mechanics (``configure_sta``, file names, folders) stay FastVideo's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ... import geometry
from ...backend import canvas_from_latent
from ...geometry import Triple
from . import parallel

FASTVIDEO_GRID: Triple = (3, 6, 10)
"""The grid FastVideo's candidates were written for (69x768x1280 with tile 6x8x8)."""
FASTVIDEO_CANDIDATES: tuple[Triple, ...] = ((3, 1, 10), (1, 5, 7), (3, 3, 3), (1, 6, 5), (1, 3, 10), (3, 6, 1))

_candidates_override: list | None = None


def set_candidates(candidates: Sequence[Sequence[int]] | None) -> None:
    """Search these windows (FastVideo's rule) instead of the scaled defaults."""
    global _candidates_override
    _candidates_override = None if candidates is None else [list(c) for c in candidates]


def search_candidates(grid: Triple) -> list[list[int]]:
    """FastVideo's candidate windows scaled axis by axis from its 3x6x10 grid to ``grid``:
    odd widths (where FastVideo's even rule and sta_dist's agree) or the whole axis,
    without repeats and without the full window."""
    if _candidates_override is not None:
        return [list(c) for c in _candidates_override]
    out: list[list[int]] = []
    for cand in FASTVIDEO_CANDIDATES:
        window = []
        for k, ref, n in zip(cand, FASTVIDEO_GRID, grid):
            if k >= ref:
                window.append(n)
                continue
            scaled = max(1, round(k * n / ref))
            scaled = scaled if scaled % 2 else scaled - 1 if scaled > 1 else 1
            window.append(n if scaled >= n else scaled)
        if window != list(grid) and window not in out:
            out.append(window)
    return out


def _as_strings(windows) -> list[str]:
    return [", ".join(str(x) for x in w) for w in windows]


def _grid(batch, fastvideo_args) -> Triple:
    if batch.raw_latent_shape is None:
        raise ValueError("STA search/tuning needs batch.raw_latent_shape (set by the latent preparation stage)")
    canvas = canvas_from_latent(batch.raw_latent_shape[2:5], fastvideo_args.pipeline_config.dit_config.patch_size)
    return geometry.grid_shape(canvas, parallel.settings().tile)


def prepare_sta_param(self, batch, fastvideo_args) -> None:
    """FastVideo's ``DenoisingStage.prepare_sta_param`` at any resolution."""
    from fastvideo.attention.backends.STA_configuration import configure_sta
    from fastvideo.configs.pipelines.base import STA_Mode
    from fastvideo import envs

    mode = fastvideo_args.STA_mode
    if batch.timesteps is None:
        raise ValueError("Timesteps must be provided")
    steps = batch.timesteps.shape[0]
    config = self.transformer.config
    layers = config.num_layers + getattr(config, "num_single_layers", 0)
    heads = config.num_attention_heads
    common = dict(layer_num=layers, head_num=heads, time_step_num=steps)
    if mode == STA_Mode.STA_INFERENCE:
        path = envs.FASTVIDEO_ATTENTION_CONFIG
        if path is None:
            raise ValueError("FASTVIDEO_ATTENTION_CONFIG is not set: STA_inference needs a mask-strategy JSON")
        batch.STA_param = configure_sta(mode=STA_Mode.STA_INFERENCE, load_path=path, **common)
    else:
        grid = _grid(batch, fastvideo_args)
        candidates = _as_strings(search_candidates(grid))
        full = list(grid)
        size = f"{batch.width}x{batch.height}"
        tuning = dict(mask_candidates=candidates, full_attention_mask=full, skip_time_steps=fastvideo_args.skip_time_steps,
                      save_dir=f"output/mask_search_strategy_{size}/", timesteps=steps)
        if mode == STA_Mode.STA_SEARCHING:
            batch.STA_param = configure_sta(mode=STA_Mode.STA_SEARCHING,
                                            mask_candidates=candidates + _as_strings([full]), **common)
        elif mode == STA_Mode.STA_TUNING:
            batch.STA_param = configure_sta(mode=STA_Mode.STA_TUNING, **common, **tuning,
                                            mask_search_files_path=f"output/mask_search_result_pos_{size}/")
        elif mode == STA_Mode.STA_TUNING_CFG:
            batch.STA_param = configure_sta(mode=STA_Mode.STA_TUNING_CFG, **common, **tuning,
                                            mask_search_files_path_pos=f"output/mask_search_result_pos_{size}/",
                                            mask_search_files_path_neg=f"output/mask_search_result_neg_{size}/")
        else:
            raise ValueError(f"STA_mode must be one of {[m.value for m in STA_Mode if m.value]}, got {mode!r}")
    batch.mask_search_final_result_pos = [[] for _ in range(steps)]
    batch.mask_search_final_result_neg = [[] for _ in range(steps)]


def search_file(results: list, candidates: Sequence[Sequence[int]]) -> dict:
    """``results[step]``: the per-layer ``{"L2_loss": [candidate][head], ...}`` in call
    order -> FastVideo's file layout ``{"L2_loss": {"[kt, kh, kw]": [step][layer][head]}}``."""
    return {name: {str(list(c)): [[layer[name][i] for layer in step] for step in results]
                   for i, c in enumerate(candidates)}
            for name in ("L2_loss", "L1_loss")}


def save_sta_search_results(self, batch) -> None:
    """FastVideo's ``DenoisingStage.save_sta_search_results`` at any resolution, in the
    layout its ``configure_sta`` reads."""
    candidates = [list(w) for w in batch.STA_param[0][0][:-1]]
    size = f"{batch.width}x{batch.height}"
    name = str(batch.prompt)[:50].replace(" ", "_")
    for sign, results in (("pos", batch.mask_search_final_result_pos), ("neg", batch.mask_search_final_result_neg)):
        if not results or not any(results):
            continue
        folder = f"output/mask_search_result_{sign}_{size}/"
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"mask_search_{name}.json"), "w") as f:
            json.dump(search_file(results, candidates), f)


def patch_denoising_stage(module) -> None:
    """Replace the two methods on FastVideo's DenoisingStage (once)."""
    stage = module.DenoisingStage
    if getattr(stage.prepare_sta_param, "_sta_dist", False):
        return
    for fn in (prepare_sta_param, save_sta_search_results):
        fn._sta_dist = True  # type: ignore[attr-defined]
        fn.__wrapped__ = getattr(stage, fn.__name__)  # type: ignore[attr-defined]
        setattr(stage, fn.__name__, fn)
