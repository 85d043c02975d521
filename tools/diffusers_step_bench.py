"""One denoising step (one transformer forward) of full-size random-weight Wan 2.1 14B and
HunyuanVideo in diffusers, bf16, stock vs sta_dist, on one GPU or two (torchrun).

    python tools/diffusers_step_bench.py --out DIR                          # 1 GPU
    torchrun --nproc-per-node 2 tools/diffusers_step_bench.py --out DIR     # 2 GPUs (after the 1-GPU run)
    python tools/diffusers_step_bench.py --tiny --out DIR                   # the same code path on a CPU

One GPU: the stock model (diffusers' default SDPA attention), sta_dist with window (3,3,3)
and with one sparse step of the real HunyuanVideo mask strategy (HunyuanVideo only: its
60 layers x 24 heads), each output saved. Two GPUs: sta_dist's parallel="tile" and "head"
(and "auto" for the strategy), diffusers' own Ulysses context parallelism with the stock
attention (HunyuanVideo has no plan in diffusers: sta_dist.diffusers.HUNYUAN_VIDEO_CP_PLAN
splits the video and keeps the text whole; for the stock attention each rank's attention
mask is cut to its video chunk plus the text, so diffusers' Ulysses gathers a matching
mask: the text keys then appear once per rank, +0.4% keys, timed only), and sta_dist's
processors on that Ulysses group. Every sta_dist output is compared with the one-GPU
sta_dist output of the same windows (max abs diff). Weights are random (built from the
configs on the GPU in bf16: no download); one warm-up forward before each timed one.
Each row is guarded: a failure is recorded and the rest goes on. A table is printed last
and JSON written to DIR.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback

import torch
import torch.distributed as dist

import sta_dist.diffusers as sta_diffusers
from sta_dist.mask_strategy import MaskStrategy
from sta_dist.parallel.env import init_distributed
from sta_dist.resources import packaged

WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
HUNYUAN = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
               num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
               qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
               rope_theta=256.0, rope_axes_dim=(16, 56, 56))
# latent grids after patching: Wan 69x768x1280 -> 18x48x80; HunyuanVideo 720p 129 frames -> 30x48x80 + 256 text
FULL = dict(wan=dict(config=WAN_14B, grid=(18, 48, 80), tile=(6, 8, 8), text=512, text_valid=512),
            hunyuan=dict(config=HUNYUAN, grid=(30, 48, 80), tile=(6, 8, 8), text=256, text_valid=200))
TINY = dict(wan=dict(config=dict(WAN_14B, num_attention_heads=4, attention_head_dim=32, text_dim=32, freq_dim=32,
                                 ffn_dim=64, num_layers=2, rope_max_seq_len=64), grid=(5, 8, 12), tile=(2, 2, 4),
                     text=8, text_valid=8),
            hunyuan=dict(config=dict(HUNYUAN, num_attention_heads=4, attention_head_dim=32, num_layers=1,
                                     num_single_layers=2, num_refiner_layers=1, text_embed_dim=32,
                                     pooled_projection_dim=16, rope_axes_dim=(8, 12, 12)),
                         grid=(5, 8, 12), tile=(2, 2, 4), text=8, text_valid=5))


def build(name: str, spec: dict, device, dtype):
    """The model from its config, parameters created in ``dtype`` on ``device`` (a 14B
    model built in float32 first would not fit beside its bf16 copy)."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if name == "wan" else HunyuanVideoTransformer3DModel
    torch.manual_seed(0)  # the same weights in every process and run
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**spec["config"])
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def inputs(name: str, spec: dict, device, dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    cfg = spec["config"]
    if name == "wan":
        patch = cfg["patch_size"]
        text_dim = cfg["text_dim"]
    else:
        patch = (cfg["patch_size_t"], cfg["patch_size"], cfg["patch_size"])
        text_dim = cfg["text_embed_dim"]
    shape = (1, cfg["in_channels"], *(n * p for n, p in zip(spec["grid"], patch)))
    kw = dict(hidden_states=torch.randn(shape, generator=g), timestep=torch.tensor([500]),
              encoder_hidden_states=torch.randn(1, spec["text"], text_dim, generator=g), return_dict=False)
    if name == "hunyuan":
        mask = torch.zeros(1, spec["text"], dtype=torch.long)
        mask[:, : spec["text_valid"]] = 1
        kw.update(encoder_attention_mask=mask, pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
                  guidance=torch.tensor([6000.0]))
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
            for k, v in kw.items()}


def strategy_for(model_layers: int, heads: int, step: int) -> MaskStrategy:
    """The real HunyuanVideo strategy's ``step`` (cut to a tiny model's layers and heads)."""
    real = MaskStrategy.load(packaged("mask_strategy_hunyuan.json.gz"))
    layers = tuple(tuple(row[:heads]) for row in real.windows[step][:model_layers])
    return MaskStrategy((layers,))


def timed_forward(model, kw, device, world: int) -> tuple[float, torch.Tensor]:
    """One warm-up, then one timed forward (the slowest rank's time). Returns (ms, output)."""
    for timed in (False, True):
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model(**kw)[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
    if world > 1:
        t = torch.tensor([ms], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ms = float(t.item())
    return ms, out


def ulysses_mask_hooks(model, world: int, rank: int) -> None:
    """Stock HunyuanVideo under diffusers' Ulysses with the video split and text whole: each
    block's attention mask becomes this rank's video chunk + the text (what its keys are)."""
    def cut(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[3] if len(args) > 3 else None)
        if mask is None:
            return args, kwargs
        n_text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None).shape[1]
        video = mask[..., :-n_text].tensor_split(world, dim=-1)[rank]
        local = torch.cat([video, mask[..., -n_text:]], dim=-1)
        if "attention_mask" in kwargs:
            return args, dict(kwargs, attention_mask=local)
        return (*args[:3], local, *args[4:]), kwargs

    for block in (*model.transformer_blocks, *model.single_transformer_blocks):
        block.register_forward_pre_hook(cut, with_kwargs=True)


def enable_diffusers_ulysses(model, name: str, world: int, device) -> None:
    from diffusers import ContextParallelConfig

    if device.type == "cpu":  # diffusers 0.42.1 divides by the accelerator count (0 on a CPU)
        torch.accelerator.device_count = lambda: 1
    plan = sta_diffusers.HUNYUAN_VIDEO_CP_PLAN if name == "hunyuan" else None
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world), cp_plan=plan)


def max_diff(out: torch.Tensor, ref_path: str):
    if not os.path.exists(ref_path):
        return None
    ref = torch.load(ref_path, map_location=out.device)
    return float((out.float() - ref.float()).abs().max())


def run_model(name: str, spec: dict, args, env, device, dtype, rows: list) -> None:
    world, rank = env.world_size, env.rank
    model = build(name, spec, device, dtype)
    kw = inputs(name, spec, device, dtype)
    heads = spec["config"]["num_attention_heads"]
    layers = (spec["config"]["num_layers"] + spec["config"].get("num_single_layers", 0))
    windows = {"(3,3,3)": dict(window=(3, 3, 3))}
    if name == "hunyuan":
        windows[f"strategy step {args.strategy_step}"] = dict(mask_strategy=strategy_for(layers, heads, args.strategy_step))

    def saved(kind: str) -> str:
        return os.path.join(args.out, f"{name}_{kind}_1gpu.pt".replace(" ", "_"))

    def row(mode: str, what: str, fn, save=None, compare=None) -> None:
        """Time ``fn``; save its output (one GPU) or compare it with a saved one."""
        entry = dict(model=name, gpus=world, mode=mode, windows=what)
        try:
            ms, out = fn()
            entry["ms"] = round(ms, 2)
            if save and rank == 0:
                torch.save(out.cpu(), saved(save))
            if compare:
                entry[f"max_diff_vs_{compare}"] = max_diff(out, saved(compare))
            del out
        except Exception as err:  # noqa: BLE001 - one failed row must not stop the others
            entry["error"] = f"{type(err).__name__}: {err}"
            if rank == 0:
                traceback.print_exc()
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(entry)
        if rank == 0:
            print(json.dumps(entry), flush=True)

    def sta(window_kw: dict, parallel=None):
        def fn():
            sta_diffusers.enable(model, tile=spec["tile"], parallel=parallel, **window_kw)
            try:
                return timed_forward(model, kw, device, world)
            finally:
                sta_diffusers.disable(model)
        return fn

    if world == 1:
        row("stock", "dense", lambda: timed_forward(model, kw, device, world), save="stock")
        for what, window_kw in windows.items():
            row("sta", what, sta(window_kw), save=f"sta {what}")
        if args.check_whole_grid:
            whole = tuple(-(-g // t) for g, t in zip(spec["grid"], spec["tile"]))
            row("sta whole grid", "dense", sta(dict(window=whole)), compare="stock")
    else:
        for what, window_kw in windows.items():
            for mode in (("tile", "head") if what == "(3,3,3)" else ("tile", "head", "auto")):
                row(f"sta {mode}", what, sta(window_kw, parallel=mode), compare=f"sta {what}")
        try:
            enable_diffusers_ulysses(model, name, world, device)
            if name == "hunyuan":
                ulysses_mask_hooks(model, world, rank)
        except Exception as err:  # noqa: BLE001
            rows.append(dict(model=name, gpus=world, mode="diffusers ulysses", error=f"{type(err).__name__}: {err}"))
            return
        row("diffusers ulysses (stock)", "dense", lambda: timed_forward(model, kw, device, world), compare="stock")
        row("sta on diffusers ulysses", "(3,3,3)", sta(dict(window=(3, 3, 3))), compare="sta (3,3,3)")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list) -> str:
    lines = [f"{'model':8} {'gpus':>4} {'mode':28} {'windows':18} {'ms':>10} {'max diff':>10}  note"]
    for r in rows:
        diff = next((v for k, v in r.items() if k.startswith("max_diff")), None)
        lines.append(f"{r['model']:8} {r['gpus']:>4} {r['mode']:28} {r.get('windows', ''):18} "
                     f"{r.get('ms', float('nan')):>10.1f} {'' if diff is None else f'{diff:.3g}':>10}  "
                     f"{r.get('error', '')[:80]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON and the one-GPU outputs")
    parser.add_argument("--models", default="hunyuan,wan")
    parser.add_argument("--strategy-step", type=int, default=30, help="the HunyuanVideo strategy's step (sparse from 15)")
    parser.add_argument("--check-whole-grid", action="store_true", help="1 GPU: also sta_dist with a whole-grid "
                        "window, compared with the stock output (a dense forward more)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on a CPU (float32): the code path only")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = init_distributed(timeout_s=300)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    specs = TINY if args.tiny else FULL
    rows: list = []
    for name in args.models.split(","):
        run_model(name, specs[name], args, env, device, dtype, rows)
    if env.rank == 0:
        result = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", world_size=env.world_size,
                      torch=torch.__version__, dtype=str(dtype), rows=rows)
        with open(os.path.join(args.out, f"diffusers_step_{env.world_size}gpu.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(table(rows), flush=True)
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
