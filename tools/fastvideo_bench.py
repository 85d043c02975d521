"""FastVideo 0.1.7's STA path with sta_dist, beside FastVideo's own STA kernel, on one GPU.

HunyuanVideo 30x48x80 + 256 text tokens (200 valid), bf16, B=1, 24 heads, D=128, tile
6x8x8; window (3,3,3) for every head, and one layer of the real HunyuanVideo strategy
(``sta_dist/configs/mask_strategy_hunyuan.json.gz``, per-head windows).

What is timed (CUDA events, median of ``--iters`` after warm-up), in one process:

- ``fv_layer``: FastVideo's own ``DistributedAttention.forward`` (sequence parallel size 1)
  with sta_dist installed as its SLIDING_TILE_ATTN backend: stack, ``preprocess_qkv``
  (tiled order), text appended, ``forward``, ``postprocess_output`` (natural order);
- ``sta_tiled``: the kernel call that Impl's ``forward`` makes, on the tiled q/k/v;
- ``fastvideo_kernel``: FastVideo's own kernel as FastVideo's Impl calls it (its CUDA op
  where the wheel's extension loads, else its Triton kernel; transposes included, as in
  FastVideo's Impl.forward), on the same tiled q/k/v;
- ``flex``: FlexAttention with FastVideo's mask in tiled order, where FastVideo's kernel
  cannot run (or with ``--flex``);
- ``sta_natural``: ``sta_dist.sliding_tile_attention`` on natural order (what a model calls
  without FastVideo's tiling).

Checked: sta_dist's layer output against FastVideo's kernel (or flex) on the video rows and
the valid text rows, and both against a float32 reference on sampled rows
(``sta_dist.testing.sampled_check``: bf16 against twice torch's own bf16 error; in ``--tiny``,
float32, torch's own error is 0, so read the direct differences there). Each step has its own error handling; the JSON goes to
``OUT_DIR/fastvideo_bench.json`` and a short table is printed last.

Usage: ``python tools/fastvideo_bench.py OUT_DIR`` (GPU), ``python tools/fastvideo_bench.py
OUT_DIR --tiny`` (CPU, tiny shapes, float32: the same code path).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if "--tiny" in sys.argv:  # the Triton interpreter must be chosen before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

RESULTS: dict = {"steps": {}, "errors": {}}


def step(name):
    """Run ``fn`` and record its result or its error, never stopping the bench."""

    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                RESULTS["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - start, 2)}
                return out
            except Exception as err:  # noqa: BLE001 - recorded, the bench goes on
                RESULTS["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - start, 2)}
                RESULTS["errors"][name] = f"{type(err).__name__}: {err}"
                print(f"[{name}] failed: {type(err).__name__}: {err}", flush=True)
                traceback.print_exc()
                return None
        return run
    return wrap


def timed(fn, iters: int, warmup: int = 2) -> dict:
    """Median and min of ``iters`` calls, in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": round(times[len(times) // 2], 3), "min_ms": round(times[0], 3), "iters": iters}


# -- setup --------------------------------------------------------------------------------


@step("import_fastvideo")
def import_fastvideo(cfg):
    import sta_dist.integrations.fastvideo as sfv

    sfv.install(tile=cfg["tile"])
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - this CPU: FastVideo's utils import it, the layers never use it
        from tests.fastvideo_support import guard_torchvision

        guard_torchvision()
    os.environ.setdefault("FASTVIDEO_LOGGING_LEVEL", "WARNING")
    import fastvideo

    RESULTS["versions"]["fastvideo"] = getattr(fastvideo, "__version__", "?")
    return True


@step("fastvideo_kernel")
def load_fastvideo_kernel():
    import fastvideo_kernel
    from fastvideo_kernel import ops

    RESULTS["versions"]["fastvideo_kernel"] = getattr(fastvideo_kernel, "__version__", "?")
    RESULTS["fastvideo_kernel_path"] = ("CUDA op (ThunderKittens sta_fwd)" if getattr(ops, "sta_fwd", None) is not None
                                        else "Triton (st_attn_triton; the wheel's CUDA extension did not load)")
    if getattr(ops, "sta_fwd", None) is None:
        # FastVideo's Triton STA autotunes 72 configs on first use; keep the 8 with 128-row
        # query blocks, so the bench stays within its time budget.
        from fastvideo_kernel.triton_kernels import st_attn_triton as st

        st.triton_sta_kernel.configs = [c for c in st.triton_sta_kernel.configs
                                        if c.kwargs["BLOCK_Q"] == 128 and c.num_stages in (2, 3)]
    return fastvideo_kernel.sliding_tile_attention


@step("fastvideo_state")
def fastvideo_state(cfg, strategy_path):
    """FastVideo's world / sequence-parallel groups (one rank), and its backend choice."""
    import torch.distributed as dist
    from fastvideo.distributed import parallel_state as ps

    from sta_dist.parallel.spawn import free_port

    os.environ["FASTVIDEO_ATTENTION_BACKEND"] = "SLIDING_TILE_ATTN"
    os.environ["FASTVIDEO_ATTENTION_CONFIG"] = strategy_path
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0)
    ps.initialize_model_parallel(tensor_model_parallel_size=1, sequence_model_parallel_size=1)
    from fastvideo.attention import selector
    from fastvideo.platforms import AttentionBackendEnum, current_platform

    selector._cached_get_attn_backend.cache_clear()
    try:
        cls = selector.get_attn_backend(cfg["D"], cfg["dtype"], (AttentionBackendEnum.SLIDING_TILE_ATTN,))
        RESULTS["selection"] = "FastVideo's selector"
    except Exception as err:  # noqa: BLE001 - CPU platform (selects nothing), or a kernel import failure
        path = "fastvideo.attention.backends.sliding_tile_attn.SlidingTileAttentionBackend"
        type(current_platform).get_attn_backend_cls = classmethod(lambda c, s, h, d: path)
        selector._cached_get_attn_backend.cache_clear()
        cls = selector.get_attn_backend(cfg["D"], cfg["dtype"], (AttentionBackendEnum.SLIDING_TILE_ATTN,))
        RESULTS["selection"] = f"the CUDA platform's answer put in place ({type(err).__name__}: {err})"
    RESULTS["backend_class"] = f"{cls.__module__}.{cls.__qualname__}"
    return cls


def strategy_file(cfg, out_dir) -> tuple[str, list]:
    """A FastVideo-format strategy JSON with one step x two layers: layer 0 all (3,3,3),
    layer 1 the real HunyuanVideo strategy's step/layer (scaled to the grid in --tiny)."""
    from sta_dist import MaskStrategy
    from sta_dist.geometry import grid_shape

    real = MaskStrategy.load(importlib.resources.files("sta_dist.configs") / "mask_strategy_hunyuan.json.gz")
    layer = [list(w) for w in real.layer_windows(cfg["strategy_step"], cfg["strategy_layer"])][: cfg["H"]]
    grid = grid_shape(cfg["canvas"], cfg["tile"])
    layer = [[min(k, n) for k, n in zip(w, grid)] for w in layer]
    entries = {}
    for l, windows in enumerate(([[3, 3, 3]] * cfg["H"], layer)):
        for h, w in enumerate(windows):
            entries[f"0_{l}_{h}"] = w
    path = os.path.join(out_dir, "bench_mask_strategy.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path, [[[3, 3, 3]] * cfg["H"], layer]


def make_inputs(cfg):
    g = torch.Generator(device="cpu").manual_seed(0)
    n = cfg["canvas"][0] * cfg["canvas"][1] * cfg["canvas"][2]
    shape = (1, n + cfg["L"], cfg["H"], cfg["D"])
    return tuple(torch.randn(shape, generator=g).to(cfg["device"], cfg["dtype"]) for _ in range(3))


# -- the measured paths -------------------------------------------------------------------


def fastvideo_mask_mod(cfg, windows):
    """FastVideo's STA mask in tiled order (its rule, whole tiles), for FlexAttention."""
    T, Hc, W = cfg["canvas"]
    tt, th, tw = cfg["tile"]
    nt, nh, nw = T // tt, Hc // th, W // tw
    vol, n, valid = tt * th * tw, T * Hc * W, cfg["valid"]
    win = torch.tensor(windows, device=cfg["device"], dtype=torch.int64)  # [H, 3]

    def axis_ok(qa, ka, k, n_a):
        half = k // 2
        centre = torch.minimum(torch.maximum(qa, half), n_a - 1 - half)
        return (centre - ka).abs() <= half

    def mask_mod(b, h, q_idx, kv_idx):
        qt, kt = q_idx // vol, kv_idx // vol
        q3 = (qt // (nh * nw), (qt // nw) % nh, qt % nw)
        k3 = (kt // (nh * nw), (kt // nw) % nh, kt % nw)
        inside = (axis_ok(q3[0], k3[0], win[h, 0], nt) & axis_ok(q3[1], k3[1], win[h, 1], nh)
                  & axis_ok(q3[2], k3[2], win[h, 2], nw))
        q_video, k_video = q_idx < n, kv_idx < n
        k_text_valid = (kv_idx >= n) & (kv_idx < n + valid)
        q_text_valid = (q_idx >= n) & (q_idx < n + valid)
        return (q_video & ((k_video & inside) | k_text_valid)) | (q_text_valid & (k_video | k_text_valid))

    return mask_mod


@step("flex_setup")
def flex_setup(cfg, windows):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    S = cfg["canvas"][0] * cfg["canvas"][1] * cfg["canvas"][2] + cfg["L"]
    block = create_block_mask(fastvideo_mask_mod(cfg, windows), B=None, H=cfg["H"], Q_LEN=S, KV_LEN=S,
                              device=cfg["device"])
    fn = torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention
    return lambda q, k, v: fn(q, k, v, block_mask=block)


def run_case(cfg, name, layer_idx, windows, fv_kernel, tiled, natural, attn_cls):
    """Every path of one window set; returns their outputs (natural order) and times."""
    from fastvideo.attention.layer import DistributedAttention
    from fastvideo.forward_context import set_forward_context
    from fastvideo.platforms import AttentionBackendEnum

    import sta_dist
    from sta_dist.geometry import fastvideo_window, grid_shape
    from sta_dist.testing import max_error, sampled_check

    case = RESULTS["cases"].setdefault(name, {"windows": sorted({tuple(w) for w in windows}), "times": {},
                                              "checks": {}})
    q, k, v = natural
    qt, kt, vt = tiled
    n = cfg["canvas"][0] * cfg["canvas"][1] * cfg["canvas"][2]
    valid = cfg["valid"]
    outputs = {}
    builder = attn_cls.get_builder_cls()()
    meta = builder.build(current_timestep=0, STA_param=[cfg["sta_param"]], raw_latent_shape=cfg["raw"],
                         patch_size=(1, 2, 2), VSA_sparsity=0.0, device=cfg["device"])
    meta.text_length = valid  # 200 of the 256 text tokens are valid (FastVideo's has all valid)

    @step(f"{name}/fv_layer")
    def fv_layer():
        layer = DistributedAttention(num_heads=cfg["H"], head_size=cfg["D"], prefix=f"model.blocks.{layer_idx}.attn",
                                     supported_attention_backends=(AttentionBackendEnum.SLIDING_TILE_ATTN,))
        call = lambda: layer(q[:, :n], k[:, :n], v[:, :n], q[:, n:], k[:, n:], v[:, n:])  # noqa: E731
        with set_forward_context(current_timestep=0, attn_metadata=meta, forward_batch=None):
            out, text = call()
            outputs["fv_layer"] = torch.cat([out, text], 1)
            case["times"]["fv_layer"] = timed(call, cfg["iters"])
        return layer

    fv_layer()

    grid = grid_shape(cfg["canvas"], cfg["tile"])
    sta_windows = [fastvideo_window(tuple(w), grid) for w in windows]

    @step(f"{name}/sta_tiled")
    def sta_tiled():
        """The kernel call the Impl's forward makes on FastVideo's tiled q/k/v (text last)."""
        call = lambda: sta_dist.sliding_tile_attention(qt, kt, vt, canvas=cfg["canvas"], tile=cfg["tile"],  # noqa: E731
                                                       window=sta_windows, text_length=valid, layout="tiled")
        case["times"]["sta_tiled"] = timed(call, cfg["iters"])

    sta_tiled()
    shape_str = "x".join(str(c) for c in cfg["canvas"])

    @step(f"{name}/fastvideo_kernel")
    def fastvideo_kernel_path():
        def call():  # FastVideo's Impl.forward body: [B, H, S, D] contiguous, the kernel, back
            o = fv_kernel(qt.transpose(1, 2).contiguous(), kt.transpose(1, 2).contiguous(),
                          vt.transpose(1, 2).contiguous(), windows, valid, True, shape_str)
            return o.transpose(1, 2)
        outputs["fastvideo_kernel"] = sta_dist.to_natural(call(), cfg["canvas"], cfg["tile"])
        case["times"]["fastvideo_kernel"] = timed(call, cfg["iters"])

    if fv_kernel is not None and cfg["fastvideo_shape"]:
        fastvideo_kernel_path()

    @step(f"{name}/flex")
    def flex_path():
        flex = flex_setup(cfg, windows)
        call = lambda: flex(qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2)).transpose(1, 2)  # noqa: E731
        outputs["flex"] = sta_dist.to_natural(call(), cfg["canvas"], cfg["tile"])
        case["times"]["flex"] = timed(call, cfg["iters"])

    if cfg["flex"] or "fastvideo_kernel" not in outputs:
        flex_path()

    @step(f"{name}/sta_natural")
    def sta_natural():
        call = lambda: sta_dist.sliding_tile_attention(q, k, v, canvas=cfg["canvas"], tile=cfg["tile"],  # noqa: E731
                                                       window=sta_windows, text_length=valid)
        case["times"]["sta_natural"] = timed(call, cfg["iters"])

    sta_natural()

    @step(f"{name}/checks")
    def checks():
        rows = slice(0, n + valid)  # padding text rows: sta_dist gives zeros, FastVideo's kernel does not
        for other in ("fastvideo_kernel", "flex"):
            if "fv_layer" in outputs and other in outputs:
                case["checks"][f"fv_layer vs {other}: max abs diff"] = max_error(outputs["fv_layer"][:, rows],
                                                                                 outputs[other][:, rows])
        for key, out in outputs.items():
            out = out.clone()
            out[:, n + valid:] = 0  # padding text rows: zero in DESIGN §1; FastVideo's kernel fills them
            res = sampled_check(q, k, v, out, canvas=cfg["canvas"], tile=cfg["tile"], window=sta_windows,
                                text_length=valid, n_rows=cfg["sample_rows"])
            case["checks"][f"{key} vs fp32 reference (sampled)"] = res

    checks()


def config(args) -> dict:
    if args.tiny:
        return dict(canvas=(4, 8, 12), tile=(2, 4, 4), raw=(4, 16, 24), L=6, valid=4, H=4, D=32, device="cpu",
                    dtype=torch.float32, iters=2, sample_rows=32, strategy_step=30, strategy_layer=7,
                    fastvideo_shape=False, flex=True)
    return dict(canvas=(30, 48, 80), tile=(6, 8, 8), raw=(30, 96, 160), L=256, valid=200, H=24, D=128, device="cuda",
                dtype=torch.bfloat16, iters=args.iters, sample_rows=384, strategy_step=30, strategy_layer=7,
                fastvideo_shape=True, flex=args.flex)


def table() -> str:
    lines = [f"{'case':<24}{'path':<20}{'median ms':>11}{'min ms':>9}{'speed-up':>10}  (over FastVideo's kernel, else flex)"]
    for name, case in RESULTS.get("cases", {}).items():
        base_path = "fastvideo_kernel" if "fastvideo_kernel" in case["times"] else "flex"
        base = case["times"].get(base_path, {}).get("median_ms")
        for path, t in case["times"].items():
            ratio = f"{base / t['median_ms']:.2f}x" if base and path != base_path else ""
            lines.append(f"{name:<24}{path:<20}{t['median_ms']:>11.3f}{t['min_ms']:>9.3f}{ratio:>10}")
        for key, value in case["checks"].items():
            shown = f"{value:.3g}" if not isinstance(value, dict) else \
                f"error {value['error']:.3g}, bound {value['bound']:.3g} (2x torch's {value['torch_error']:.3g}): ok={value['ok']}"
            lines.append(f"  {key}: {shown}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, float32 (the same code path)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--flex", action="store_true", help="time FlexAttention too, not only where FastVideo's kernel fails")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    cfg = config(args)
    start = time.perf_counter()
    RESULTS.update(config={k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()},
                   versions={"torch": torch.__version__, "python": platform.python_version()},
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
                   cases={})
    try:
        import triton

        RESULTS["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    strategy_path, sta_param = strategy_file(cfg, args.out_dir)
    cfg["sta_param"] = sta_param
    if import_fastvideo(cfg):
        fv_kernel = load_fastvideo_kernel() if cfg["fastvideo_shape"] else None
        attn_cls = fastvideo_state(cfg, strategy_path)
        natural = make_inputs(cfg)
        import sta_dist

        tiled = tuple(sta_dist.to_tiled(x, cfg["canvas"], cfg["tile"]) for x in natural)
        if attn_cls is not None:
            run_case(cfg, "window (3,3,3)", 0, [[3, 3, 3]] * cfg["H"], fv_kernel, tiled, natural, attn_cls)
            run_case(cfg, f"strategy s{cfg['strategy_step']} l{cfg['strategy_layer']}", 1, sta_param[1], fv_kernel,
                     tiled, natural, attn_cls)
    RESULTS["total_seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.out_dir, "fastvideo_bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    print(f"\n{RESULTS['device']}, torch {torch.__version__}, {RESULTS.get('fastvideo_kernel_path', 'no FastVideo kernel')}; "
          f"{len(RESULTS['errors'])} failed steps; {RESULTS['total_seconds']} s")
    print(table())
    return 0 if not RESULTS["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
