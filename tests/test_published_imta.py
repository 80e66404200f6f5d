"""IMTA's published numbers (pipelines/published/imta.yaml, for its reproduction) against our presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import methods  # noqa: F401  (fills the registries)
from tests.presets import preset_model

IMTA = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines" / "published" / "imta.yaml").read_text())


def test_table1_costs_and_parameters_are_the_7_block_lin_grow_msdnet():
    """Table 1's 7-exit MSDNet (not among section 4.1's configurations) is lin_grow, step 1, with 7
    blocks: its printed MADDs (4 significant digits) and parameters (2 decimals) are our preset's."""
    table = IMTA["tables"]["table1-cifar100"]
    model = preset_model(table["preset"])
    assert [float(f"{m / 1e6:.4g}") for m in model.cost_table.macs] == table["cost"]
    assert [round(p / 1e6, 2) for p in model.cost_table.params] == pytest.approx(table["params_m"], abs=0.03)


def test_every_table_has_its_source_and_rows_of_one_length():
    for name, table in IMTA["tables"].items():
        assert table["source"].startswith("Table"), name
        assert len({len(v) for v in table["rows"].values()}) == 1, name
    assert len(IMTA["errata"]) >= 3 and IMTA["settings"]["not_in_paper"]


def test_costs_tables_2_and_3_do_not_print_are_marked_and_are_their_presets():
    """Tables 2 and 3 print no costs: their cost rows are marked as ours and equal their presets'
    measured costs at 4 significant digits (so the report's join by cost is a join by preset)."""
    for name in ("table2-cifar100-ablation", "table3-imagenet-ablation"):
        table = IMTA["tables"][name]
        assert table["cost_printed"] is False and "costs not printed" in table["source"]
        assert [float(f"{m / 1e6:.4g}") for m in preset_model(table["preset"]).cost_table.macs] == table["cost"], name
