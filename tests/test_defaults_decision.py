"""benchmarks/defaults_decision.py: the pre-registered rule that turns the deciding comparison into model defaults."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.commands.params import count_parameters, preset_unet_config

REPOSITORY = Path(__file__).resolve().parent.parent
SEEDS = [0, 1, 2, 3, 4]
VARIANTS = [
    "stock",
    "se-per-layer",
    "dia-global",
    "dia-timestep",
    "dia-widest-timestep",
    "dia-per-block-timestep",
]
DIA_VARIANTS = VARIANTS[2:]
# Stock 1000 parameters: +1 % is 1010, and SE in every resnet has 1020.
PARAMETERS = {
    "stock": 1000,
    "se-per-layer": 1020,
    "dia-global": 1004,
    "dia-timestep": 1010,
    "dia-widest-timestep": 1011,
    "dia-per-block-timestep": 1005,
}
# Every interval reaches above 1 unless a test says otherwise.
UNDECIDED = dict(fd_mean=1.0, fd_upper=(1.1, 1.1), heldout_upper=(1.01, 1.01))


@pytest.fixture
def decision(monkeypatch):
    monkeypatch.syspath_prepend(str(REPOSITORY / "benchmarks"))
    return importlib.import_module("defaults_decision")


def row(variant, fd_mean, fd_upper, heldout_upper, seeds=SEEDS):
    return {
        "variant": variant,
        "parameters": PARAMETERS[variant],
        "seeds": seeds,
        "ratio_to_stock_mean": fd_mean,
        "ratio_to_stock_ci95": [0.5, fd_upper[0]],
        "ratio_to_stock_t_ci95": [0.5, fd_upper[1]],
        "heldout_ratio_ci95": [0.9, heldout_upper[0]],
        "heldout_ratio_t_ci95": [0.9, heldout_upper[1]],
    }


def rows(**changed):
    """Every variant undecided, except those given as variant=dict(fd_mean=..., fd_upper=..., heldout_upper=...)."""
    return {
        variant: row(variant, **changed.get(variant.replace("-", "_"), UNDECIDED)) for variant in VARIANTS
    }


def verdicts_by_variant(decision, digits, fashion, parameters=PARAMETERS):
    verdicts = decision.decide({"digits8": digits, "fmnist16": fashion}, parameters)
    assert [verdict["variant"] for verdict in verdicts] == DIA_VARIANTS
    return {verdict["variant"]: verdict for verdict in verdicts}


def test_a_variant_may_become_the_default_only_with_every_upper_end_below_one_on_both_datasets(decision):
    clear = dict(fd_mean=0.95, fd_upper=(0.99, 0.999), heldout_upper=(0.998, 0.999))
    digits = rows(dia_global=clear, dia_timestep=clear, dia_per_block_timestep=clear)
    fashion = rows(
        dia_global=clear,
        # The bootstrap interval ends below 1 but the Student-t one does not.
        dia_timestep=dict(fd_mean=0.95, fd_upper=(0.99, 1.0), heldout_upper=(0.998, 0.999)),
        # Here the bootstrap interval is the one that reaches 1.
        dia_per_block_timestep=dict(fd_mean=0.95, fd_upper=(1.0, 0.99), heldout_upper=(0.998, 0.999)),
    )
    verdicts = verdicts_by_variant(decision, digits, fashion)

    assert verdicts["dia-global"]["may_become_default"]
    assert not verdicts["dia-timestep"]["may_become_default"]
    assert not verdicts["dia-per-block-timestep"]["may_become_default"]
    assert not verdicts["dia-widest-timestep"]["may_become_default"]
    # One dataset is not enough.
    assert not verdicts_by_variant(decision, digits, rows())["dia-global"]["may_become_default"]


def test_the_held_out_loss_must_also_end_below_one_in_both_intervals(decision):
    clear = dict(fd_mean=0.95, fd_upper=(0.99, 0.99), heldout_upper=(0.999, 0.999))
    digits = rows(dia_global=clear, dia_timestep=clear, dia_per_block_timestep=clear)
    fashion = rows(
        dia_global=dict(fd_mean=0.95, fd_upper=(0.99, 0.99), heldout_upper=(0.999, 1.0)),
        dia_timestep=dict(fd_mean=0.95, fd_upper=(0.99, 0.99), heldout_upper=(1.0, 0.999)),
        dia_per_block_timestep=clear,
    )
    verdicts = verdicts_by_variant(decision, digits, fashion)

    assert not verdicts["dia-global"]["may_become_default"]
    assert not verdicts["dia-timestep"]["may_become_default"]
    assert verdicts["dia-per-block-timestep"]["may_become_default"]


def test_the_goal_needs_a_ratio_of_at_most_0_90_on_both_datasets_and_ignores_the_held_out_loss(decision):
    at_goal = dict(fd_mean=0.90, fd_upper=(0.99, 0.99), heldout_upper=(1.01, 1.01))
    digits = rows(**{variant.replace("-", "_"): at_goal for variant in DIA_VARIANTS})
    fashion = rows(
        dia_global=at_goal,
        dia_timestep=dict(fd_mean=0.901, fd_upper=(0.99, 0.99), heldout_upper=(1.01, 1.01)),
        # A low mean whose interval reaches 1 is not enough.
        dia_per_block_timestep=dict(fd_mean=0.85, fd_upper=(0.99, 1.0), heldout_upper=(1.01, 1.01)),
    )
    verdicts = verdicts_by_variant(decision, digits, fashion)

    assert verdicts["dia-global"]["meets_goal"]
    assert not verdicts["dia-global"]["may_become_default"]
    assert not verdicts["dia-timestep"]["meets_goal"]
    assert not verdicts["dia-per-block-timestep"]["meets_goal"]
    assert not verdicts_by_variant(decision, digits, rows())["dia-global"]["meets_goal"]


def test_a_variant_over_one_percent_or_not_below_se_in_every_resnet_qualifies_for_nothing(decision):
    best = dict(fd_mean=0.5, fd_upper=(0.6, 0.6), heldout_upper=(0.9, 0.9))
    comparison = rows(**{variant.replace("-", "_"): best for variant in DIA_VARIANTS})
    verdicts = verdicts_by_variant(decision, comparison, comparison)
    assert [verdicts[variant]["within_cost"] for variant in DIA_VARIANTS] == [True, True, False, True]
    assert verdicts["dia-timestep"]["ddpm_added_percent"] == pytest.approx(1.0)
    assert not verdicts["dia-widest-timestep"]["meets_goal"]
    assert not verdicts["dia-widest-timestep"]["may_become_default"]

    cheaper_se = {**PARAMETERS, "se-per-layer": 1005}
    verdicts = verdicts_by_variant(decision, comparison, comparison, cheaper_se)
    assert [verdicts[variant]["may_become_default"] for variant in DIA_VARIANTS] == [
        True,
        False,
        False,
        False,
    ]


def test_fmnist16_breaks_ties_and_without_a_qualifier_the_default_stays(decision):
    def qualifying(fd_mean):
        return dict(fd_mean=fd_mean, fd_upper=(0.99, 0.99), heldout_upper=(0.99, 0.99))

    digits = rows(dia_global=qualifying(0.80), dia_timestep=qualifying(0.95))
    fashion = rows(dia_global=qualifying(0.97), dia_timestep=qualifying(0.96))
    verdicts = decision.decide({"digits8": digits, "fmnist16": fashion}, PARAMETERS)
    assert decision.chosen_default(verdicts) == "dia-timestep"

    nothing = decision.decide({"digits8": rows(), "fmnist16": rows()}, PARAMETERS)
    assert decision.chosen_default(nothing) == decision.CURRENT_DEFAULT == "dia-global"


def summary(decision, name, comparison_rows, **budget_changes):
    budget = json.loads(json.dumps({"name": name, **dataclasses.asdict(decision.BUDGETS[name])}))
    return {"budget": {**budget, **budget_changes}, "rows": list(comparison_rows.values())}


def test_an_unfinished_or_foreign_comparison_is_refused_with_what_it_lacks(decision):
    path = Path("quality-fmnist16/summary.json")
    comparison = rows()
    del comparison["dia-widest-timestep"]
    with pytest.raises(SystemExit, match="no run of dia-widest-timestep"):
        decision.finished_rows(summary(decision, "fmnist16", comparison), path)
    comparison = rows()
    comparison["dia-timestep"] = row("dia-timestep", **UNDECIDED, seeds=[0, 1, 2])
    with pytest.raises(SystemExit, match=r"not every seed of 0, 1, 2, 3, 4: dia-timestep \(seeds 0, 1, 2\)"):
        decision.finished_rows(summary(decision, "fmnist16", comparison), path)
    comparison = rows()
    comparison["dia-global"]["heldout_ratio_ci95"] = None
    with pytest.raises(SystemExit, match="no held-out loss for dia-global"):
        decision.finished_rows(summary(decision, "fmnist16", comparison), path)
    comparison = rows()
    comparison["dia-global"]["ratio_to_stock_t_ci95"] = [float("nan"), float("nan")]
    with pytest.raises(SystemExit, match="an interval that is not a number for dia-global"):
        decision.finished_rows(summary(decision, "fmnist16", comparison), path)
    for name in ("retrofit-digits8", "cpu"):
        with pytest.raises(
            SystemExit, match=f"the '{name}' comparison; the rule decides on digits8 and fmnist16"
        ):
            decision.finished_rows(summary(decision, name, rows()), path)
    with pytest.raises(SystemExit, match=r"not run as the fmnist16 budget defines it \(differs in dataset\)"):
        decision.finished_rows(summary(decision, "fmnist16", rows(), dataset="other.npz"), path)
    # A variant outside the budget's is not judged; a finished comparison comes back whole.
    extra = {**rows(), "dia-widest": {"variant": "dia-widest"}}
    assert decision.finished_rows(summary(decision, "fmnist16", extra), path) == rows()


def test_both_datasets_are_needed_once_each_and_come_back_in_a_fixed_order(decision, tmp_path):
    paths = {}
    for name in ("digits8", "fmnist16"):
        paths[name] = tmp_path / name / "summary.json"
        paths[name].parent.mkdir()
        paths[name].write_text(json.dumps(summary(decision, name, rows())))
    loaded = decision.load_summaries([paths["fmnist16"], paths["digits8"]])
    assert list(loaded) == ["digits8", "fmnist16"] and loaded["digits8"] == rows()
    with pytest.raises(SystemExit, match="no summary of fmnist16: the rule needs both datasets"):
        decision.load_summaries([paths["digits8"]])
    with pytest.raises(SystemExit, match="two summaries of digits8"):
        decision.load_summaries([paths["digits8"], paths["digits8"], paths["fmnist16"]])
    with pytest.raises(SystemExit, match="no summary at .*missing.json: run benchmarks/quality.py first"):
        decision.load_summaries([paths["digits8"], tmp_path / "missing.json"])


def test_parameters_are_those_of_the_variant_built_on_the_ddpm_layout(decision):
    config = preset_unet_config("cifar10-ddpm")
    with torch.device("meta"):
        stock = UNet2DModel(**config)
        widest_timestep = DIAUNet2DModel(
            **config,
            dia_attention="dia_lstm",
            dia_sharing="global",
            dia_global_cell="widest",
            dia_condition="timestep",
        )
        se_per_layer = DIAUNet2DModel(**config, dia_attention="se_per_layer")
    assert decision.ddpm_layout_parameters("stock") == count_parameters(stock)
    assert decision.ddpm_layout_parameters("dia-widest-timestep") == count_parameters(widest_timestep)
    assert decision.ddpm_layout_parameters("se-per-layer") == count_parameters(se_per_layer)


def test_the_command_prints_the_verdicts_and_the_default_it_supports(decision, tmp_path):
    qualifying = dict(fd_mean=0.97, fd_upper=(0.99, 0.99), heldout_upper=(0.999, 0.999))
    paths = []
    for name in ("digits8", "fmnist16"):
        path = tmp_path / name / "summary.json"
        path.parent.mkdir()
        path.write_text(json.dumps(summary(decision, name, rows(dia_timestep=qualifying))))
        paths.append(str(path))
    result = subprocess.run(
        [sys.executable, "benchmarks/defaults_decision.py", "--summaries", *paths],
        cwd=REPOSITORY,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stock = decision.ddpm_layout_parameters("stock")
    dia_timestep = decision.ddpm_layout_parameters("dia-timestep")
    added = f"{dia_timestep:,} ({100 * (dia_timestep - stock) / stock:+.2f} %)"
    lines = result.stdout.splitlines()
    verdict = (
        f"| dia-timestep | {added} | yes | 0.9700, 0.9900; 0.99900 | 0.9700, 0.9900; 0.99900 | yes | no |"
    )
    assert verdict in lines
    assert lines[-1] == "Default: dia-timestep (the qualifying variant with the lowest FD ratio on fmnist16)."
    assert lines[-2].endswith("met by no variant.")
