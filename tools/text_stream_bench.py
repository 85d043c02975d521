"""Time the text queries' launch beside the CUDA kernel's (a second stream, the router's
default) against one after the other on the caller's stream, at the bench's text cases
(HunyuanVideo 30x48x80 with 256 text rows, 200 valid; (3,3,3)), in one process, outputs
compared. ``--parts`` times the pieces of that call one by one instead: the CUDA
launch of the video queries with 0, 128, the valid and 256 text keys, the text queries
alone, and the text queries put beside a video launch by hand.
One GPU; the same router runs a tile-mode rank's local problem, so with
``--text-after`` the script instead runs the CLI (the arguments after ``--``) with the text
launch after the video launch, the baseline for the distributed bench:

    python3 tools/text_stream_bench.py [--parts]
    torchrun --standalone --nproc-per-node 2 tools/text_stream_bench.py --text-after -- bench dist --text-len 256 ...
"""

from __future__ import annotations

import json
import sys

import torch

from sta_dist import cli, kernel_calls, sliding_tile_attention
from sta_dist.bench.common import time_ms
from sta_dist.bench.kernel import STANDARD_CASES, attended_pairs


def text_after(device):
    """The caller's stream in place of the router's second stream: text launch after video."""
    return torch.cuda.current_stream(device)


def parts(q, k, v, case, kw) -> None:
    """Time the pieces of the routed call: where its time over the no-text kernel goes."""
    from sta_dist.kernels.sta_fwd_cuda import sta_fwd_cuda
    from sta_dist.local import LocalHeads, LocalLayout, LocalText

    layout = LocalLayout.natural(case.canvas, case.tile, case.text_len)
    heads = LocalHeads.build(case.windows, layout.grid, case.heads)
    text = LocalText.single(case.text_valid)
    table = kernel_calls.head_table(heads, tuple(range(case.heads)), q.device)
    out = torch.empty_like(q)
    scale = case.head_dim**-0.5

    def video(text_keys):
        return lambda: sta_fwd_cuda(q, k, v, table, out, canvas=case.canvas, tile=case.tile, scale=scale,
                                    text_keys=text_keys)

    def text_queries():
        kernel_calls.sdpa_dense(q, k, v, layout, heads, text, tuple(range(case.heads)), scale, out,
                                   first_row=layout.q_video)

    def beside(fn):  # fn with the text queries on the second stream, as the router runs them
        def run():
            main, side = torch.cuda.current_stream(), kernel_calls.text_stream(q.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                text_queries()
            fn()
            main.wait_stream(side)
        return run

    pieces = [("routed call (text queries beside)", lambda: sliding_tile_attention(q, k, v, **kw)),
              ("video queries, no text keys", video(0)),
              ("video queries, 128 text keys", video(128)),
              (f"video queries, {case.text_valid} text keys", video(case.text_valid)),
              ("video queries, 256 text keys", video(256)),
              ("text queries alone (SDPA)", text_queries),
              ("video queries, no text keys, text queries beside", beside(video(0))),
              (f"video queries, {case.text_valid} text keys, text queries beside", beside(video(case.text_valid)))]
    for label, fn in pieces + pieces[:1]:
        fn()
        print(json.dumps(dict(piece=label, ms=round(time_ms(fn), 3))))


def main() -> None:
    if sys.argv[1:2] == ["--text-after"]:
        kernel_calls.text_stream = text_after
        sys.exit(cli.main(sys.argv[sys.argv.index("--") + 1:]))
    case = STANDARD_CASES["hunyuan_333_text"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((1, case.seq, case.heads, case.head_dim), generator=g, device="cuda",
                           dtype=torch.bfloat16) for _ in range(3))
    kw = dict(canvas=case.canvas, tile=case.tile, window=list(case.windows), text_length=case.text_valid)
    if sys.argv[1:2] == ["--parts"]:
        return parts(q, k, v, case, kw)
    fn = lambda: sliding_tile_attention(q, k, v, **kw)  # noqa: E731
    side_stream = kernel_calls.text_stream
    rows = []
    for label in ("beside", "after", "beside", "after"):
        kernel_calls.text_stream = side_stream if label == "beside" else text_after
        out = fn()
        ms = time_ms(fn)
        rows.append(dict(text_launch=label, ms=round(ms, 3), tflops=round(4 * attended_pairs(case) * 128 / ms / 1e9, 1),
                         out=out))
    kernel_calls.text_stream = side_stream
    first = rows[0].pop("out")
    for r in rows[1:]:
        r["max_diff_vs_first"] = (r.pop("out").float() - first.float()).abs().max().item()
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
