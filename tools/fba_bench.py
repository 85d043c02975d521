"""HunyuanVideo-1.5's own block-sparse kernel as an anchor for window plus selected tiles
(issue 16), one GPU: ``flex_block_attn`` (Tencent-Hunyuan/flex-block-attn, a ThunderKittens
kernel; what its SSTA calls), built on the machine from its source (``gpu.sh fba``).

The case is ``hunyuan_topk8`` (HunyuanVideo 30x48x80 + 256 text, tile (6,8,8), window (3,3,3),
``TopK(8)`` shared, bf16). Its kernel wants tokens in block (tiled) order, ``[B, H, S, D]``,
every block whole: the text is padded with zero tokens to one 384-token block, which every
query attends (HunyuanVideo-1.5's own padding, see docs/design.md). Rows:

- ``ours``: ``sta_dist.sliding_tile_attention(..., select=TopK(8))``, the selection included;
- ``flex_block_attn``: its kernel given the block mask of the tiles ours attended (its
  selection not timed, nor the reorder into its layout: the anchor at its best);
- the check: both without text, its output against the reference (sampled rows) under the
  same mask, and against ours.

A table on stdout; ``fba_bench.json`` in ``--out``.

    PYTHONPATH=.fba/src python3 tools/fba_bench.py [--out out]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from sta_dist import geometry, sliding_tile_attention, to_natural
from sta_dist.bench.common import time_ms
from sta_dist.bench.kernel import environment
from sta_dist.bench.selection import SELECTION_CASES, case_inputs
from sta_dist.testing import max_error, sampled_check


def to_blocks(x_bshd: torch.Tensor, canvas, tile, pad_to: int) -> torch.Tensor:
    """``[B, S, H, D]`` natural order -> ``[B, H, S', D]``: video in tiled order, then the
    text, then zero rows up to ``pad_to`` tokens."""
    n = geometry.volume(canvas)
    order = geometry.tiled_permutation(canvas, tile).to(x_bshd.device)
    rows = [x_bshd[:, order], x_bshd[:, n:]]
    pad = pad_to - x_bshd.shape[1]
    if pad:
        rows.append(x_bshd.new_zeros(x_bshd.shape[0], pad, *x_bshd.shape[2:]))
    return torch.cat(rows, 1).transpose(1, 2).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    from flex_block_attn import flex_block_attn_func

    case = SELECTION_CASES["hunyuan_topk8"]
    block = geometry.volume(case.tile)
    n_video = geometry.volume(case.canvas)
    q, k, v = case_inputs(case, "cuda", torch.bfloat16)
    kw = dict(canvas=case.canvas, tile=case.tile, window=case.window)
    result = dict(env=environment(), case=case.name, block=block)

    # The check, without text: the same mask, its output against the reference and ours.
    qv, kv, vv = (x[:, :n_video] for x in (q, k, v))
    ours_v, attended = sliding_tile_attention(qv, kv, vv, **kw, select=case.select, return_selection=True)
    mask = attended[0, 0].contiguous()  # [n, n]: one selection for every head
    with torch.no_grad():
        theirs_v = flex_block_attn_func(*(to_blocks(x, case.canvas, case.tile, n_video) for x in (qv, kv, vv)),
                                        block, block, mask)
    theirs_v = to_natural(theirs_v.transpose(1, 2), case.canvas, case.tile)
    result["check"] = dict(theirs=sampled_check(qv, kv, vv, theirs_v, **kw, select=mask[None, None], n_rows=384),
                           ours=sampled_check(qv, kv, vv, ours_v, **kw, select=mask[None, None], n_rows=384),
                           max_diff_theirs_vs_ours=max_error(theirs_v, ours_v))
    del ours_v, theirs_v

    # The timed case, with text: one more block (the 256 text tokens, padded).
    seq = -(-case.seq // block) * block
    blocks = seq // block
    full = torch.ones(blocks, blocks, dtype=torch.bool, device=q.device)
    full[:-1, :-1] = mask  # video rows: their tiles and the text block; the text block: everything
    qb, kb, vb = (to_blocks(x, case.canvas, case.tile, seq) for x in (q, k, v))
    text = dict(text_length=case.text_valid)

    def theirs():
        with torch.no_grad():
            return flex_block_attn_func(qb, kb, vb, block, block, full)

    result["rows"] = {
        "ours (selection included)": time_ms(lambda: sliding_tile_attention(q, k, v, **kw, **text, select=case.select)),
        "ours, window alone": time_ms(lambda: sliding_tile_attention(q, k, v, **kw, **text)),
        "flex_block_attn (mask given; text padded to one block)": time_ms(theirs),
    }
    ours = result["rows"]["ours (selection included)"]
    print(f"card: {result['env'].get('card')}; {case.name}, blocks of {block} tokens, "
          f"{mask.float().sum(-1).mean().item():.1f} key tiles per query tile")
    print("| row | ms | vs ours |\n|---|---|---|")
    for name, ms in result["rows"].items():
        print(f"| {name} | {ms:.2f} | {ms / ours:.2f}x |")
    print("check (no text):", json.dumps(result["check"]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fba_bench.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
