"""The selection benchmark's code path on a CPU at tiny shapes (the Triton interpreter,
FlexAttention eager): every row runs and every checked output agrees with the reference,
so GPU time goes to timing, not to bugs."""

import pytest
import torch

import sta_dist
from sta_dist.bench.selection import SELECTION_CASES, SelectionCase, case_functions, case_inputs, check_outputs, \
    format_table

TINY = [SelectionCase("tiny_topk", (4, 8, 16), (1, 1, 1), sta_dist.TopK(1), tile=(2, 8, 8), text_len=130,
                      text_valid=70, heads=2, head_dim=32),
        SelectionCase("tiny_mass", (4, 8, 16), (1, 1, 1), sta_dist.Mass(0.9), tile=(2, 8, 8), text_len=130,
                      text_valid=70, heads=2, head_dim=32)]


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
def test_every_row_runs_and_is_checked(case):
    q, k, v = case_inputs(case, "cpu", torch.float16)  # float32 would meet a float32 "reference"
    fns = case_functions(case, q, k, v, compile_flex=False)
    assert any(name.startswith("FlexAttention (") for name in fns)
    checks = check_outputs(case, q, k, v, fns, n_rows=48)
    for name, check in checks.items():
        if isinstance(check, dict):
            assert check["ok"], (name, check)
    assert checks["ours (selection included)"]["selection_equal"]
    fns["selection alone"]()
    fns["FlexAttention mask build alone"]()
    rows = {name: dict(ms=1.0 + i, check=checks.get(name)) for i, name in enumerate(fns)}
    table = format_table([dict(name=case.name, rows=rows, attended_tiles_per_query_tile=2.0)])
    assert "ours (selection included)" in table and "NO" not in table


def test_the_issue_cases_are_registered():
    topk, mass = SELECTION_CASES["hunyuan_topk8"], SELECTION_CASES["hunyuan_mass09"]
    assert (topk.canvas, topk.tile, topk.window, topk.text_len, topk.text_valid) == ((30, 48, 80), (6, 8, 8),
                                                                                     (3, 3, 3), 256, 200)
    assert topk.select == sta_dist.TopK(8, share_heads=True) and mass.select == sta_dist.Mass(0.9)


def test_selection_table_reads_the_json(tmp_path, capsys):
    import json
    import sys

    sys.path.insert(0, "tools")
    import selection_table

    rows = {"ours (selection included)": dict(ms=30.0, check=dict(ok=True)),
            "window alone (as routed)": dict(ms=25.0, check=dict(ok=True)),
            "FlexAttention (selection + mask build + attention)": dict(ms=60.0, check=dict(ok=True))}
    (tmp_path / "kernel_bench.json").write_text(json.dumps(dict(env=dict(card="H100"), selection=[
        dict(name="hunyuan_topk8", rows=rows, attended_tiles_per_query_tile=34.5)])))
    selection_table.main(str(tmp_path))
    out = capsys.readouterr().out
    assert "| hunyuan_topk8 | 30.00 | 25.00 | 1.20x | 60.00 | 2.00x | 34.5 | yes |" in out


def test_cli_names_the_selection_cases_and_parses_select():
    from sta_dist.cli import CLIError, parse_select

    assert parse_select("topk:8") == sta_dist.TopK(8) and parse_select("mass:0.9") == sta_dist.Mass(0.9)
    assert parse_select("") is None
    for bad in ("topk:0", "mass:2", "top:8", "topk:x"):
        with pytest.raises(CLIError, match=r"--select must be topk:K or mass:P"):
            parse_select(bad)
