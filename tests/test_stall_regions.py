"""``tools/stall_regions.py`` on a small source page of Nsight Compute's CSV form: the hot
loop is found by its execution count, cut at its synchronisation points (each wgmma wait a
region of its own), and each region's share of the samples is printed."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "stall_regions.py"
REASONS = ["stall_barrier", "stall_wait", "stall_selected"]


def load_tool():
    spec = importlib.util.spec_from_file_location("stall_regions", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_page(path: Path):
    """A prologue run once, then a loop body (run 40 times) of six instructions: an issue
    region, the wait on S (60 barrier samples), a softmax region; the tail after the loop."""
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"] + REASONS + [
        "stall_wait (Not Issued)"]
    body = [  # (source, executed, barrier, wait, selected)
        ("MOV R1, c[0x0][0x28]", 1, 0, 0, 5),
        ("WARPGROUP.ARRIVE", 40, 0, 2, 1),
        ("HGMMA.64x128x16.F32.BF16 R88, gdesc[UR48], RZ, !UPT", 40, 0, 20, 3),
        ("WARPGROUP.DEPBAR.LE gsb0, 0x1", 40, 60, 0, 1),
        ("FMNMX R3, R12, R3, !PT", 40, 0, 4, 1),
        ("MUFU.EX2 R5, R5", 40, 0, 7, 1),
        ("@!P1 BRA 0x7f00", 40, 0, 0, 5),
        ("EXIT", 1, 0, 0, 2),
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "sta_fwd_kernel"])
        w.writerow(head)
        for i, (src, n, bar, wait, sel) in enumerate(body):
            w.writerow([hex(i * 16), "      " + src, bar + wait + sel, n, bar, wait, sel, 0])


def test_regions_cut_at_waits(tmp_path):
    tool = load_tool()
    write_page(tmp_path / "page.csv")
    parts = tool.regions(tool.read(str(tmp_path / "page.csv")))
    assert [[tool.opcode(r["source"]).split(".")[0] for r in part] for part in parts] == [
        ["WARPGROUP", "HGMMA"], ["WARPGROUP"], ["FMNMX", "MUFU", "BRA"]]
    assert parts[1][0]["stalls"]["barrier"] == 60


def test_picks_kernel_by_name(tmp_path):
    tool = load_tool()
    write_page(tmp_path / "a.csv")
    text = (tmp_path / "a.csv").read_text()
    (tmp_path / "two.csv").write_text(text.replace("sta_fwd_kernel", "other_kernel") + text)
    assert len(tool.read(str(tmp_path / "two.csv"), "sta_fwd")) == 8
    assert tool.read(str(tmp_path / "two.csv"), "other")[0]["source"] == "MOV R1, c[0x0][0x28]"
    out = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "two.csv"), "--kernel", "flash"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "no kernel whose name contains 'flash'" in out.stderr
    assert "Traceback" not in out.stderr


def test_report_shares(tmp_path):
    write_page(tmp_path / "page.csv")
    out = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "page.csv")], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "hot loop: 6 instructions, 105 samples, 3 regions"
    shares = [float(line.split("%")[0]) for line in out[1:] if "instr" in line]
    assert shares == [round(100 * n / 105, 1) for n in (26, 61, 18)]
    assert "barrier 98%" in out[3]
