"""The benchmarks run and agree with what they compare against (tiny sizes; their timings are not asserted)."""

from benchmarks import calibration
from benchmarks import early_exit as early_exit_bench


def test_calibration_benchmark_gives_identical_results(capsys):
    calibration.main(["--heldout", "300", "--test", "200", "--exits", "4", "--classes", "10"])
    assert "identical results: True" in capsys.readouterr().out


def test_early_exit_benchmark_reports_every_distribution(capsys):
    early_exit_bench.main(["--preset", "msdnet-cifar100-b6", "--batch", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:4] in ("0.50", "1.00", "2.00")]
    assert len(rows) == 3
    macs = [float(r[1].rstrip("x")) for r in rows]
    assert macs == sorted(macs) and 0 < macs[0] < 1  # more mass on late exits costs more
