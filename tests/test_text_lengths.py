"""Per-sample text lengths (classifier-free guidance's two prompts in one call): clear
errors for bad values, and every backend and distributed mode against the one reference."""

import pytest
import torch

import sta_dist
from sta_dist.testing import error_bound, max_error, reference_attention
from sta_dist.validation import check_text_length
from tests import dist_workers
from tests.cases import Case
from tests.test_distributed import check_against_reference
from tests.world_spawns import shares

CANVAS, TILE = (2, 4, 4), (2, 2, 2)


def qkv(B=2, L=4, H=2):
    S = 32 + L
    return tuple(torch.randn(B, S, H, 32) for _ in range(3))


def call(q, k, v, text_length, **kw):
    return sta_dist.sliding_tile_attention(q, k, v, canvas=CANVAS, tile=TILE, window=(1, 1, 1),
                                           text_length=text_length, **kw)


def test_normalized_values():
    assert check_text_length(None, 4, 2) == 4
    assert check_text_length([3], 4, 1) == 3  # one sample: a one-element list is valid
    assert check_text_length([2, 2], 4, 2) == 2  # equal counts collapse to one launch
    assert check_text_length((1, 4), 4, 2) == (1, 4)
    assert check_text_length(torch.tensor([0, 3]), 4, 2) == (0, 3)
    assert check_text_length(torch.tensor(2), 4, 2) == 2


def test_one_element_list_for_one_sample():
    q, k, v = qkv(B=1)
    assert torch.equal(call(q, k, v, [3]), call(q, k, v, 3))


@pytest.mark.parametrize("bad, error, message", [
    ([1, 2, 3], ValueError, r"text_length must be one int or one per batch sample: expected B=2 values, got len\(text_length\)=3"),
    ([], ValueError, r"expected B=2 values, got len\(text_length\)=0"),
    ([1, -1], ValueError, r"text_length\[1\] must be an int in \[0, L\] = \[0, 4\], got text_length\[1\]=-1"),
    (torch.tensor([5, 1]), ValueError, r"text_length\[0\] must be an int in \[0, L\] = \[0, 4\], got text_length\[0\]=5"),
    (2.5, TypeError, r"text_length must be an int in \[0, L\] = \[0, 4\], got text_length=2.5 \(float\)"),
    ([1, "3"], TypeError, r"text_length\[1\] must be an int .* got text_length\[1\]='3' \(str\)"),
    (torch.tensor([1.0, 2.0]), TypeError, r"text_length must hold integers, got a tensor of dtype=torch.float32"),
    (torch.ones(2, 1, dtype=torch.long), ValueError, r"one per batch sample \(a 1-D tensor\), got a tensor of shape \(2, 1\)"),
    (True, TypeError, r"got text_length=True \(bool\)"),
])
def test_bad_text_length(bad, error, message):
    q, k, v = qkv(B=2)
    with pytest.raises(error, match=message):
        call(q, k, v, bad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lengths", [[0, 5], (5, 2, 5), "tensor"])
def test_per_sample_lengths_match_reference(backend, lengths):
    # odd canvas, partial tiles, per-head windows, GQA; samples 0 and 2 share a length
    case = Case((2, 3, 5), (1, 2, 3), [(1, 2, 1), (2, 1, 2)], 5, 0, 3, 2, 1, 32)  # small: the interpreter is slow
    if lengths == "tensor":
        lengths = torch.tensor([4, 1, 0])
    q, k, v = case.tensors(torch.float32, seed=len(str(lengths)))
    q, k, v = (x[: len(lengths)] for x in (q, k, v))
    kw = dict(canvas=case.canvas, tile=case.tile, window=case.window, text_length=lengths)
    ref, ref_lse = reference_attention(q, k, v, **kw, return_lse=True)
    base = reference_attention(q, k, v, **kw, compute_dtype=torch.float32)
    out, lse = sta_dist.sliding_tile_attention(q, k, v, **kw, backend=backend, return_lse=True)
    assert max_error(out, ref) <= error_bound(max_error(base, ref), torch.float32, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert max_error(lse[finite], ref_lse[finite]) <= 1e-5
    for b, n in enumerate(torch.as_tensor(lengths).tolist()):  # padding rows of each sample are zero
        assert torch.count_nonzero(out[b, 30 + n:]) == 0


def test_reference_per_sample_equals_one_sample_at_a_time():
    case = Case((2, 3, 4), (1, 2, 2), (1, 1, 2), 4, 0, 2, 2, 2, 32)
    q, k, v = case.tensors()
    kw = dict(canvas=case.canvas, tile=case.tile, window=case.window)
    both = reference_attention(q, k, v, **kw, text_length=[1, 3])
    assert torch.equal(both[:1], reference_attention(q[:1], k[:1], v[:1], **kw, text_length=1))
    assert torch.equal(both[1:], reference_attention(q[1:], k[1:], v[1:], **kw, text_length=3))


# every mode on 2 gloo ranks, text merged per sample (tile) and carried through the all-to-all (head)
PER_SAMPLE = Case((5, 6, 7), (2, 3, 4), [(1, 1, 1), (2, 1, 2)], 5, (5, 0), 2, 2, 2, 32)
PER_SAMPLE_GQA = Case((4, 4, 6), (2, 2, 2), (1, 1, 2), 3, (1, 3, 0), 3, 4, 2, 32)


DISTRIBUTED = [(PER_SAMPLE, dict(mode="tile")), (PER_SAMPLE, dict(mode="head")),
               (PER_SAMPLE_GQA, dict(mode="head", order="natural")), (PER_SAMPLE_GQA, dict(mode="tile"))]


@shares("gloo", 2)
def test_distributed_per_sample_lengths(world_spawn):
    cases = DISTRIBUTED
    results = world_spawn("gloo", 2, "test_text_lengths:per sample")
    for i, (case, plan_kw) in enumerate(cases):
        plan = sta_dist.ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=2,
                                  **plan_kw)
        check_against_reference(case, plan, [results[r][i][0] for r in range(2)], seed=i)


def spawn_parts(family: str, world: int, workdir) -> list:
    """This module's calls in the gloo family's shared spawn (tests/world_spawns.py)."""
    return [("per sample", dist_workers.run_cases, (DISTRIBUTED,))] if (family, world) == ("gloo", 2) else []
