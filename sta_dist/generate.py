"""``sta-dist generate``: a diffusers video pipeline (Wan 2.1 or HunyuanVideo, a local
folder) with sta_dist in its transformer, on one device or under torchrun, writing the
video and a JSON summary (time per step, attention share, mode, bytes moved).

``--pipeline tiny`` builds a tiny random-weight Wan 2.1 pipeline offline from configs
(tokenizer included: a word-level vocabulary made here), so the whole path runs on a CPU
without weights; its video is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

TINY_VOCAB = ["<pad>", "</s>", "<unk>", "a", "the", "cat", "dog", "walks", "runs", "on", "in", "beach", "snow", "city"]


class GenerateError(Exception):
    """A user error of ``sta-dist generate``: printed as one line, exit code 2."""


EXTRA = "pip install -e '.[diffusers]'"
"""How to install what ``sta-dist generate`` imports (pyproject.toml's ``diffusers`` extra)."""


def _check_installed() -> None:
    """diffusers and transformers (the pipelines' text encoders) are importable, or a
    :class:`GenerateError` that names the extra to install."""
    for name in ("diffusers", "transformers"):
        try:
            __import__(name)
        except ImportError as err:
            raise GenerateError(f"sta-dist generate needs {name}, which does not import here ({err}): install the "
                                f"diffusers extra with {EXTRA}") from None


def register(subparsers) -> None:
    """Add the ``generate`` subcommand to ``sta-dist``'s parser."""
    g = subparsers.add_parser("generate", help="generate a video with a diffusers pipeline (Wan 2.1 / HunyuanVideo) "
                              "running sta_dist")
    g.add_argument("--pipeline", required=True, help="a local diffusers pipeline folder, or 'tiny' (random weights, "
                   "built offline)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--tile", type=int, nargs=3, default=None, help="tile (t, h, w) in latent tokens after patching "
                   "(default 6 8 8; tiny: 1 2 2)")
    g.add_argument("--window", type=int, nargs=3, default=None, help="window (t, h, w) in tiles (default 3 3 3)")
    g.add_argument("--mask-strategy", default=None, help="FastVideo-format JSON (per step, layer, head), or 'hunyuan' "
                   "for the packaged HunyuanVideo strategy")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; tiny: 2)")
    g.add_argument("--mode", default="auto", choices=["auto", "head", "tile", "hybrid"],
                   help="how ranks share the tokens under torchrun")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-frames", type=int, default=None)
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--fps", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on a GPU, float32 on a CPU")
    g.add_argument("--out", default="video.mp4", help="the video (.mp4 needs imageio-ffmpeg; .gif needs nothing)")
    g.add_argument("--summary", default=None, help="the JSON summary (default: --out with .json)")
    g.set_defaults(func=main)


class StepProgress:
    """A progress line per step: redrawn in place (``\\r``) on a terminal, one line per step
    in a log file."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, done: int, seconds: float, elapsed: float) -> None:
        width = 24
        bar = "#" * (width * done // self.total) + "-" * (width - width * done // self.total)
        line = f"step {done}/{self.total} [{bar}] {seconds:.2f} s/step, {elapsed:.1f} s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def tiny_pipeline():
    """A tiny random-weight ``WanPipeline`` built from configs, offline."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(TINY_VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=2, rope_max_seq_len=32).eval()
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def load_pipeline(path: str, dtype):
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "model_index.json")):
        raise GenerateError(f"--pipeline must be 'tiny' or a local diffusers pipeline folder (with model_index.json), "
                            f"got --pipeline={path!r}")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)


def _write_video(frames, out: str, fps: int) -> None:
    from diffusers.utils import export_to_gif, export_to_video

    if out.lower().endswith(".gif"):
        from PIL import Image

        export_to_gif([Image.fromarray((f * 255).round().astype("uint8")) for f in frames], out, fps=fps)
    else:
        export_to_video(frames, out, fps=fps)


def _check(args, tiny: bool) -> None:
    if args.window is not None and args.mask_strategy is not None:
        raise GenerateError("give --window or --mask-strategy, not both")
    if not args.out.lower().endswith((".mp4", ".gif", ".mov", ".mkv", ".webm")):
        raise GenerateError(f"--out must name a video file (.mp4, .gif, ...), got --out={args.out!r}")
    if args.steps is not None and args.steps < 1:
        raise GenerateError(f"--steps must be >= 1, got --steps={args.steps}")
    if not args.out.lower().endswith(".gif"):
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise GenerateError(f"--out={args.out!r} needs imageio-ffmpeg ({EXTRA}); or write a .gif") from None


def run(args) -> dict:
    """Generate; returns the summary (written by rank 0, which prints where)."""
    _check_installed()
    import torch

    import sta_dist.diffusers as sta_diffusers
    from sta_dist.parallel.env import init_distributed

    tiny = args.pipeline == "tiny"
    _check(args, tiny)
    env = init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    pipe = tiny_pipeline() if tiny else load_pipeline(args.pipeline, dtype)
    pipe = pipe.to(device) if dtype == torch.float32 or not tiny else pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)  # ours below: one line per step in a log file
    strategy = args.mask_strategy
    if strategy == "hunyuan":
        from sta_dist.resources import packaged

        strategy = packaged("mask_strategy_hunyuan.json.gz")
    window = None if strategy else tuple(args.window or (3, 3, 3))
    tile = tuple(args.tile or ((1, 2, 2) if tiny else (6, 8, 8)))
    parallel = args.mode if env.distributed else None
    handle = sta_diffusers.enable(pipe.transformer, tile=tile, window=window, mask_strategy=strategy,
                                  parallel=parallel)
    handle.measure = True
    steps = args.steps or (2 if tiny else 50)
    progress = StepProgress(steps) if env.rank == 0 else None
    step_seconds: list[float] = []
    last = [time.perf_counter()]
    start = last[0]

    def on_step_end(pipeline, i, t, callback_kwargs):
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_seconds.append(now - last[0])
        last[0] = now
        if progress:
            progress.update(i + 1, step_seconds[-1], now - start)
        return handle.callback(pipeline, i, t, callback_kwargs)

    call = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=steps,
                generator=torch.Generator(device="cpu").manual_seed(args.seed), output_type="np",
                callback_on_step_end=on_step_end)
    sizes = dict(height=args.height, width=args.width, num_frames=args.num_frames)
    if tiny:
        sizes = {k: v or d for (k, v), d in zip(sizes.items(), (64, 64, 9))}
        call["max_sequence_length"] = 16
    call.update({k: v for k, v in sizes.items() if v is not None})
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    frames = pipe(**call).frames[0]
    total = sum(step_seconds)
    plan = handle.last_plan
    summary = dict(
        pipeline=args.pipeline, model=handle.spec.name, prompt=args.prompt, steps=steps, world_size=env.world_size,
        device=str(device), dtype=str(dtype).replace("torch.", ""), tile=list(tile),
        window=list(window) if window else None, mask_strategy=strategy,
        mode=(plan.describe() if plan else ("one process" if not env.distributed else "diffusers")),
        step_seconds=[round(s, 4) for s in step_seconds], seconds_total=round(total, 4),
        attention_seconds=round(handle.attention_seconds, 4),
        attention_share=round(handle.attention_seconds / total, 4) if total else None,
        bytes_sent_rank0=handle.bytes_sent(), frames=int(len(frames)), out=args.out,
    )
    if env.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        _write_video(frames, args.out, args.fps)
        summary_path = args.summary or os.path.splitext(args.out)[0] + ".json"
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote the video to {os.path.abspath(args.out)} and its summary to {os.path.abspath(summary_path)}",
              flush=True)
    return summary


def main(args) -> int:
    try:
        run(args)
    except (GenerateError, ValueError, TypeError, FileNotFoundError, ImportError) as err:
        extra = f": install the diffusers extra with {EXTRA}" if isinstance(err, ImportError) else ""
        print(f"sta-dist generate: error: {' '.join(str(err).split())}{extra}", file=sys.stderr)
        return 2
    return 0


def cli(argv: Optional[list] = None) -> int:
    """``python -m sta_dist.generate ...`` (the same as ``sta-dist generate ...``)."""
    parser = argparse.ArgumentParser(prog="sta-dist")
    register(parser.add_subparsers(dest="command", required=True))
    return main(parser.parse_args(["generate", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(cli())
