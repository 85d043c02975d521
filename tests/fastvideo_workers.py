"""What each rank runs in the FastVideo tests: FastVideo 0.1.7's own DistributedAttention,
LocalAttention, forward context, parallel state and denoising-stage methods, with sta_dist
installed the user's way (``sta_dist.integrations.fastvideo.install()``). The parent test
compares the returned outputs with the single reference."""

from __future__ import annotations

import json
import os
import types

import torch

CANVAS, H, D, L, B = (9, 10, 14), 6, 32, 5, 1
RAW = (CANVAS[0], 2 * CANVAS[1], 2 * CANVAS[2])  # the latent; patch (1, 2, 2)
PATCH = (1, 2, 2)
N = CANVAS[0] * CANVAS[1] * CANVAS[2]
TILE_MODE_TILE = (1, 4, 4)  # grid 9x3x4: boxes along t or w whose halos stay partial


def inputs(seed: int):
    """Full q, k, v ``[B, N + L, H, D]`` (natural order, text last) and RoPE tables."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N + L, H, D, generator=g) for _ in range(3))
    angles = torch.rand(N, D // 2, generator=g) * 6.3
    return q, k, v, (angles.cos(), angles.sin())


def _setup(rank, world, config_path, parallel="head", tile=(6, 8, 8)):
    import sta_dist.integrations.fastvideo as sfv
    from tests.fastvideo_support import import_fastvideo, init_sequence_parallel, select_like_cuda

    os.environ["FASTVIDEO_ATTENTION_CONFIG"] = config_path
    sfv.install(parallel=parallel, tile=tile)
    import_fastvideo()
    init_sequence_parallel(rank, world)
    select_like_cuda("SLIDING_TILE_ATTN")


def _layer(backend: str, layer: int, local: bool = False, **extra):
    from fastvideo.attention.layer import DistributedAttention, LocalAttention
    from fastvideo.platforms import AttentionBackendEnum
    from tests.fastvideo_support import select_like_cuda

    select_like_cuda(backend)
    enum = (getattr(AttentionBackendEnum, backend),)
    if local:
        return LocalAttention(num_heads=H, head_size=D, supported_attention_backends=enum, **extra)
    return DistributedAttention(num_heads=H, head_size=D, supported_attention_backends=enum,
                                prefix=f"model.blocks.{layer}.attn", **extra)


def _meta(sta_param, step: int):
    """What the denoising stage builds each step, with the selected backend's builder."""
    from fastvideo.attention.backends.sliding_tile_attn import SlidingTileAttentionBackend

    builder = SlidingTileAttentionBackend.get_builder_cls()()
    return builder.build(current_timestep=step, raw_latent_shape=RAW, patch_size=PATCH, STA_param=sta_param,
                         VSA_sparsity=0.0, device=torch.device("cpu"))


def _strategy(path: str, steps: int, layers: int):
    """The STA_param FastVideo's stage loads from the file (its own configure_sta)."""
    from fastvideo.attention.backends.STA_configuration import configure_sta

    return configure_sta(mode="STA_inference", layer_num=layers, head_num=H, time_step_num=steps, load_path=path)


def _run_distributed(attn, meta, rank, world, seed, text=True, batch=None):
    """FastVideo's natural contiguous shard of the video, text replicated."""
    from fastvideo.forward_context import set_forward_context

    q, k, v, _ = inputs(seed)
    n = N // world
    chunk = slice(rank * n, (rank + 1) * n)
    rep = (q[:, N:], k[:, N:], v[:, N:]) if text else (None, None, None)
    with set_forward_context(current_timestep=meta.current_timestep, attn_metadata=meta, forward_batch=batch):
        out, text_out = attn(q[:, chunk], k[:, chunk], v[:, chunk], *rep)
    return out, text_out


def head_mode(rank, world, config_path, step=1):
    """FastVideo's head all-to-all, sta_dist's kernel: per-head even/odd windows (layer 1),
    text; and FastVideo's SDPA beside sta_dist with the whole grid."""
    _setup(rank, world, config_path)
    sta_param = _strategy(config_path, steps=2, layers=2)
    out = {}
    meta = _meta(sta_param, step)
    out["windows"] = _run_distributed(_layer("SLIDING_TILE_ATTN", 1), meta, rank, world, seed=1)
    out["no_text"] = _run_distributed(_layer("SLIDING_TILE_ATTN", 1), meta, rank, world, seed=2, text=False)
    whole = [[[2, 2, 2]] * H] * 2  # grid (2, 2, 2): the whole canvas
    out["whole"] = _run_distributed(_layer("SLIDING_TILE_ATTN", 0), _meta([whole], 0), rank, world, seed=3)
    out["sdpa"] = _run_distributed(_layer("TORCH_SDPA", 0), _meta([whole], 0), rank, world, seed=3)
    # tile (3, 4, 4): grid (3, 3, 4), where FastVideo's even windows take k + 1 tiles
    import sta_dist.integrations.fastvideo as sfv

    sfv.install(tile=(3, 4, 4))
    out["small_tile"] = _run_distributed(_layer("SLIDING_TILE_ATTN", 1), _meta(sta_param, step), rank, world, seed=4)
    return out


def local_attention(rank, world, config_path):
    """LocalAttention calls forward alone (natural order), with RoPE; the layer index
    comes from a prefix in its extra arguments."""
    _setup(rank, world, config_path)
    from fastvideo.forward_context import set_forward_context

    sta_param = _strategy(config_path, steps=2, layers=2)
    attn = _layer("SLIDING_TILE_ATTN", 1, local=True, prefix="model.blocks.1.attn.impl", dropout_p=0.0)
    q, k, v, _ = inputs(5)
    angles = torch.rand(N + L, D // 2, generator=torch.Generator().manual_seed(5))
    with set_forward_context(current_timestep=1, attn_metadata=_meta(sta_param, 1), forward_batch=None):
        return attn(q, k, v, freqs_cis=(angles.cos(), angles.sin()))


def tile_mode(rank, world, config_path, parallel="tile"):
    """sta_dist's plan in FastVideo's sequence-parallel group: the model's shard and gather
    points give and take tile boxes, DistributedAttention applies RoPE to the rank's rows
    and exchanges halos only (FastVideo's all-to-all is counted: it must not run)."""
    _setup(rank, world, config_path, parallel=parallel, tile=TILE_MODE_TILE)
    from fastvideo.distributed import communication_op as co
    from fastvideo.distributed import parallel_state as ps
    from fastvideo.forward_context import set_forward_context

    from sta_dist.integrations.fastvideo import parallel as fp

    sp, calls = ps.get_sp_group(), {"all_to_all_4D": 0}
    real = sp.all_to_all_4D
    sp.all_to_all_4D = lambda *a, **kw: calls.__setitem__("all_to_all_4D", calls["all_to_all_4D"] + 1) or real(*a, **kw)
    comm = fp._comm(sp.device_group)
    before = dict(comm.bytes_sent)
    try:
        meta = _meta(_strategy(config_path, steps=2, layers=2), 1)
        attn = _layer("SLIDING_TILE_ATTN", 1)
        q, k, v, freqs = inputs(6)
        with set_forward_context(current_timestep=1, attn_metadata=meta, forward_batch=None):
            shards = [co.sequence_model_parallel_shard(x[:, :N], dim=1) for x in (q, k, v)]
            out, text_out = attn(*(x for x, _ in shards), q[:, N:], k[:, N:], v[:, N:], freqs_cis=freqs)
            full = co.sequence_model_parallel_all_gather(out, dim=1)
        moved = {step: n - before.get(step, 0) for step, n in comm.bytes_sent.items() if n != before.get(step, 0)}
        return dict(full=full, text=text_out, held=shards[0][0].shape[1], original=shards[0][1], calls=calls,
                    bytes=moved, mode=fp.plan_for(meta).mode)
    finally:
        sp.all_to_all_4D = real
        _setup(rank, world, config_path)  # back to FastVideo's head all-to-all, tile 6x8x8


def search_and_tune(rank, world, config_path, workdir, steps=2, layers=2):
    """FastVideo's STA_searching then STA_tuning flow through its own configure_sta, at a
    canvas its stage refuses, with sta_dist's stage methods: returns the losses it saved
    and the strategy it wrote."""
    _setup(rank, world, config_path, tile=(3, 4, 4))
    from fastvideo.configs.pipelines.base import STA_Mode
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
    from fastvideo.pipelines.stages.denoising import DenoisingStage

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return _search_and_tune(rank, world, steps, layers, STA_Mode, ForwardBatch, DenoisingStage)
    finally:
        os.chdir(cwd)
        _setup(rank, world, config_path)


def _search_and_tune(rank, world, steps, layers, STA_Mode, ForwardBatch, DenoisingStage):
    stage = types.SimpleNamespace(transformer=types.SimpleNamespace(
        config=types.SimpleNamespace(num_layers=layers, num_attention_heads=H)))
    args = types.SimpleNamespace(STA_mode=STA_Mode.STA_SEARCHING, skip_time_steps=1,
                                 pipeline_config=types.SimpleNamespace(dit_config=types.SimpleNamespace(patch_size=PATCH)))
    batch = ForwardBatch(data_type="video", timesteps=torch.arange(steps), raw_latent_shape=(1, 16, *RAW),
                         width=RAW[2] * 8, height=RAW[1] * 8, prompt="a test prompt")
    DenoisingStage.prepare_sta_param(stage, batch, args)
    attns = [_layer("SLIDING_TILE_ATTN", l) for l in range(layers)]
    for step in range(steps):
        meta = _meta(batch.STA_param, step)
        for negative in (False, True):
            batch.is_cfg_negative = negative
            for l, attn in enumerate(attns):
                _run_distributed(attn, meta, rank, world, seed=100 + 10 * step + l + 50 * negative, batch=batch)
    if rank == 0:
        DenoisingStage.save_sta_search_results(stage, batch)
    torch.distributed.barrier()
    size = f"{batch.width}x{batch.height}"
    with open(f"output/mask_search_result_pos_{size}/mask_search_a_test_prompt.json") as f:
        losses = json.load(f)
    result = dict(candidates=batch.STA_param[0][0], losses=losses)
    for mode in (STA_Mode.STA_TUNING, STA_Mode.STA_TUNING_CFG):
        args.STA_mode = mode
        if rank == 0:
            DenoisingStage.prepare_sta_param(stage, batch, args)
        torch.distributed.barrier()
        with open(f"output/mask_search_strategy_{size}/mask_strategy_s1.json") as f:
            result[mode.value] = json.load(f)
        torch.distributed.barrier()  # every rank has read it before rank 0 writes the next mode's
    return result


def errors(rank, world, config_path, missing_path):
    """Bad input: the messages name the setting."""
    _setup(rank, world, config_path)
    out = {}
    for name, make in {
        "missing_file": lambda: (os.environ.__setitem__("FASTVIDEO_ATTENTION_CONFIG", missing_path),
                                 _layer("SLIDING_TILE_ATTN", 0)),
        "head_size": lambda: (os.environ.__setitem__("FASTVIDEO_ATTENTION_CONFIG", config_path),
                              __import__("fastvideo.attention.layer", fromlist=["x"]).DistributedAttention(
                                  num_heads=H, head_size=48, prefix="m.blocks.0.attn",
                                  supported_attention_backends=(_enum(),))),
        "no_layer": lambda: _run_distributed(_layer("SLIDING_TILE_ATTN", 5),
                                             _meta(_strategy(config_path, steps=2, layers=2), 1), rank, world, seed=0),
    }.items():
        try:
            make()
            out[name] = "no error"
        except Exception as err:  # noqa: BLE001 - the test reads the message
            out[name] = f"{type(err).__name__}: {err}"
    os.environ["FASTVIDEO_ATTENTION_CONFIG"] = config_path
    return out


def run_all(rank, world, config_path, workdir, missing_path):
    """Every scenario of one world size in one spawn (FastVideo takes ~10 s to import)."""
    out = {"head": head_mode(rank, world, config_path)}
    if world == 1:
        out["local"] = local_attention(rank, world, config_path)
        out["errors"] = errors(rank, world, config_path, missing_path)
    else:
        out["tile"] = tile_mode(rank, world, config_path, "tile")
    if world == 2:
        out["auto"] = tile_mode(rank, world, config_path, "auto")
    if world < 3:
        out["search"] = search_and_tune(rank, world, config_path, workdir)
    return out


def _enum():
    from fastvideo.platforms import AttentionBackendEnum

    return AttentionBackendEnum.SLIDING_TILE_ATTN
