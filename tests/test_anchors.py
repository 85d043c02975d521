"""The benchmark's anchors mask what sta_dist computes: the FLASH backend's ``mask_mod``
(written for its CuTe-DSL codegen) equals the Triton backend's, and both equal the
reference's token mask."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from sta_dist import geometry
from sta_dist.bench import anchors
from sta_dist.testing import sta_mask

pytestmark = pytest.mark.timeout(300)


def test_flash_mask_mod_equals_the_triton_one_and_the_reference():
    from torch.nn.attention.flex_attention import create_mask

    canvas, tile, text_len, text_valid, windows = (4, 6, 8), (2, 2, 2), 16, 10, [(1, 3, 3), (2, 2, 1), (3, 5, 4)]
    with mock.patch.object(anchors, "_need_fa4", lambda what: None):  # no FA4 needed to build the mask
        triton, flash = (anchors.FlexSTA(canvas, tile, text_len, text_valid, 3, "cpu", backend=b).set_windows(windows)
                         for b in (None, "FLASH"))
    S = triton.seq
    a, b = (create_mask(x.mask_mod, 1, 3, S, S, device="cpu")[0] for x in (triton, flash))
    assert torch.equal(a, b)
    n = geometry.volume(canvas)
    order = torch.cat([geometry.tiled_permutation(canvas, tile), torch.arange(n, S)])  # tiled -> natural rows
    for h, window in enumerate(windows):  # the reference: natural order
        ref = sta_mask(canvas, tile, window, text_len, text_valid)
        assert torch.equal(a[h], ref[order][:, order]), window
