"""The benchmarks run and agree with what they compare against (tiny sizes; their timings are not asserted)."""

from benchmarks import calibration
from benchmarks import early_exit as early_exit_bench


def test_calibration_benchmark_gives_identical_results(capsys):
    calibration.main(["--heldout", "300", "--test", "200", "--exits", "4", "--classes", "10"])
    assert "identical results: True" in capsys.readouterr().out


def test_early_exit_benchmark_reports_every_distribution(capsys):
    rows = early_exit_bench.main(["--preset", "msdnet-cifar100-b6", "--quick"])
    out = capsys.readouterr().out
    assert "fair baseline (fastest)" in out and "threads" in out  # the baseline and the thread count are stated
    # every distribution, as one batch per block and in chunks: the same exits and predictions as the simulation
    assert {(r["q"], r["mode"]) for r in rows} == {(q, m) for q in (0.5, 1.0, 2.0) for m in ("one batch", "chunks of 4")}
    assert all(r["agree"] for r in rows)
    assert "exits and predictions equal the simulated ones in every run: True" in out
    printed = [line.split() for line in out.splitlines() if line.strip()[:4] in ("0.50", "1.00", "2.00")]
    assert len(printed) == 6 and all("yes" in line and "NO" not in line for line in printed)
    macs = [r["macs"] for r in rows if r["mode"] == "one batch"]
    assert macs == sorted(macs) and 0 < macs[0] < 1  # more mass on late exits costs more
