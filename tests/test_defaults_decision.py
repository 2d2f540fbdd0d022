"""benchmarks/defaults_decision.py: the pre-registered rule that turns the deciding comparison into model defaults."""

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
from dia_diffusion.parameter_count import count_parameters, preset_unet_config

REPOSITORY = Path(__file__).resolve().parent.parent
SEEDS = [0, 1, 2, 3, 4]
VARIANTS = ["stock", "se-per-layer", "dia-global", "dia-timestep", "dia-widest-timestep"]
# Stock 1000 parameters: +1 % is 1010, and SE in every resnet has 1020.
PARAMETERS = {
    "stock": 1000,
    "se-per-layer": 1020,
    "dia-global": 1004,
    "dia-timestep": 1010,
    "dia-widest-timestep": 1011,
}


@pytest.fixture
def decision(monkeypatch):
    monkeypatch.syspath_prepend(str(REPOSITORY / "benchmarks"))
    return importlib.import_module("defaults_decision")


def row(variant, fd_mean=1.0, fd_upper=(1.1, 1.1), heldout_upper=(1.01, 1.01), seeds=SEEDS):
    return {
        "variant": variant,
        "seeds": seeds,
        "ratio_to_stock_mean": fd_mean,
        "ratio_to_stock_ci95": [0.5, fd_upper[0]],
        "ratio_to_stock_t_ci95": [0.5, fd_upper[1]],
        "heldout_ratio_ci95": [0.9, heldout_upper[0]],
        "heldout_ratio_t_ci95": [0.9, heldout_upper[1]],
    }


def rows(*changed):
    by_variant = {variant: row(variant) for variant in VARIANTS}
    by_variant.update({changed_row["variant"]: changed_row for changed_row in changed})
    return by_variant


def verdict_of(verdicts, variant):
    return next(verdict for verdict in verdicts if verdict["variant"] == variant)


def test_a_variant_may_become_the_default_only_with_every_upper_end_below_one_on_every_dataset(decision):
    clear = dict(fd_mean=0.95, fd_upper=(0.99, 0.999), heldout_upper=(0.998, 0.999))
    digits = rows(row("dia-global", **clear), row("dia-timestep", **clear))
    fashion = rows(
        row("dia-global", **clear),
        # The bootstrap interval ends below 1 but the Student-t one does not.
        row("dia-timestep", fd_mean=0.95, fd_upper=(0.99, 1.0), heldout_upper=(0.998, 0.999)),
    )
    verdicts = decision.decide([("digits8", digits), ("fmnist16", fashion)], PARAMETERS)

    assert [verdict["variant"] for verdict in verdicts] == [
        "dia-global",
        "dia-timestep",
        "dia-widest-timestep",
    ]
    assert verdict_of(verdicts, "dia-global")["may_become_default"]
    assert not verdict_of(verdicts, "dia-timestep")["may_become_default"]
    assert not verdict_of(verdicts, "dia-widest-timestep")["may_become_default"]


def test_the_held_out_loss_must_also_end_below_one(decision):
    clear = dict(fd_mean=0.95, fd_upper=(0.99, 0.99), heldout_upper=(0.999, 0.999))
    digits = rows(row("dia-global", **clear), row("dia-timestep", **clear))
    fashion = rows(
        row("dia-global", fd_mean=0.95, fd_upper=(0.99, 0.99), heldout_upper=(0.999, 1.0)),
        # Here the bootstrap interval is the one that reaches 1.
        row("dia-timestep", fd_mean=0.95, fd_upper=(0.99, 0.99), heldout_upper=(1.0, 0.999)),
    )
    verdicts = decision.decide([("digits8", digits), ("fmnist16", fashion)], PARAMETERS)

    assert not verdict_of(verdicts, "dia-global")["may_become_default"]
    assert not verdict_of(verdicts, "dia-timestep")["may_become_default"]
    assert verdict_of(decision.decide([("digits8", digits)], PARAMETERS), "dia-global")["may_become_default"]


def test_the_goal_needs_a_ratio_of_at_most_0_90_on_every_dataset_and_ignores_the_held_out_loss(decision):
    at_goal = dict(fd_mean=0.90, fd_upper=(0.99, 0.99), heldout_upper=(1.01, 1.01))
    digits = rows(*(row(variant, **at_goal) for variant in VARIANTS[2:]))
    fashion = rows(
        row("dia-global", **at_goal),
        row("dia-timestep", fd_mean=0.901, fd_upper=(0.99, 0.99), heldout_upper=(1.01, 1.01)),
        # A low mean whose interval reaches 1 is not enough.
        row("dia-widest-timestep", fd_mean=0.85, fd_upper=(0.99, 1.0), heldout_upper=(1.01, 1.01)),
    )
    affordable = {**PARAMETERS, "dia-widest-timestep": 1005}
    verdicts = decision.decide([("digits8", digits), ("fmnist16", fashion)], affordable)

    assert verdict_of(verdicts, "dia-global")["meets_goal"]
    assert not verdict_of(verdicts, "dia-global")["may_become_default"]
    assert not verdict_of(verdicts, "dia-timestep")["meets_goal"]
    assert not verdict_of(verdicts, "dia-widest-timestep")["meets_goal"]


def test_a_variant_over_one_percent_or_not_below_se_in_every_resnet_qualifies_for_nothing(decision):
    best = dict(fd_mean=0.5, fd_upper=(0.6, 0.6), heldout_upper=(0.9, 0.9))
    comparison = rows(*(row(variant, **best) for variant in VARIANTS[2:]))
    verdicts = decision.decide([("digits8", comparison)], PARAMETERS)
    assert [verdict["within_cost"] for verdict in verdicts] == [True, True, False]
    assert verdict_of(verdicts, "dia-timestep")["ddpm_added_percent"] == pytest.approx(1.0)
    assert not verdict_of(verdicts, "dia-widest-timestep")["meets_goal"]

    cheaper_se = {**PARAMETERS, "se-per-layer": 1004}
    verdicts = decision.decide([("digits8", comparison)], cheaper_se)
    assert [verdict["may_become_default"] for verdict in verdicts] == [False, False, False]


def test_the_last_dataset_breaks_ties_and_without_a_qualifier_the_default_stays(decision):
    def qualifying(variant, fd_mean):
        return row(variant, fd_mean=fd_mean, fd_upper=(0.99, 0.99), heldout_upper=(0.99, 0.99))

    digits = rows(qualifying("dia-global", 0.80), qualifying("dia-timestep", 0.95))
    fashion = rows(qualifying("dia-global", 0.97), qualifying("dia-timestep", 0.96))
    verdicts = decision.decide([("digits8", digits), ("fmnist16", fashion)], PARAMETERS)
    assert decision.chosen_default(verdicts, "fmnist16") == "dia-timestep"
    assert decision.chosen_default(verdicts, "digits8") == "dia-global"

    nothing = decision.decide([("digits8", rows()), ("fmnist16", rows())], PARAMETERS)
    assert decision.chosen_default(nothing, "fmnist16") == decision.CURRENT_DEFAULT == "dia-global"


def summary(name, comparison_rows, seeds=SEEDS, variants=VARIANTS, heldout_images=100):
    budget = {"name": name, "seeds": seeds, "variants": variants, "heldout_images": heldout_images}
    return {"budget": budget, "rows": list(comparison_rows.values())}


def test_an_unfinished_comparison_is_refused_with_what_it_lacks(decision):
    path = Path("quality-fmnist16/summary.json")
    with pytest.raises(SystemExit, match="no run of dia-widest-timestep"):
        comparison = rows()
        del comparison["dia-widest-timestep"]
        decision.finished_rows(summary("fmnist16", comparison), path)
    with pytest.raises(SystemExit, match=r"not every seed of 0, 1, 2, 3, 4: dia-timestep \(seeds 0, 1, 2\)"):
        decision.finished_rows(summary("fmnist16", rows(row("dia-timestep", seeds=[0, 1, 2]))), path)
    unmeasured = row("dia-global")
    unmeasured["heldout_ratio_ci95"] = None
    with pytest.raises(SystemExit, match="no held-out loss for dia-global"):
        decision.finished_rows(summary("fmnist16", rows(unmeasured)), path)
    with pytest.raises(SystemExit, match="not one of the deciding comparisons"):
        decision.finished_rows(summary("cpu", rows(), heldout_images=0), path)
    assert decision.finished_rows(summary("fmnist16", rows()), path) == rows()


def test_parameters_are_those_of_the_variant_built_on_the_ddpm_layout(decision):
    config = preset_unet_config("cifar10-ddpm")
    with torch.device("meta"):
        widest_timestep = DIAUNet2DModel(
            **config,
            dia_attention="dia_lstm",
            dia_sharing="global",
            dia_global_cell="widest",
            dia_condition="timestep",
        )
        se_per_layer = DIAUNet2DModel(**config, dia_attention="se_per_layer")
    assert decision.ddpm_layout_parameters("dia-widest-timestep") == count_parameters(widest_timestep)
    assert decision.ddpm_layout_parameters("se-per-layer") == count_parameters(se_per_layer)
    assert decision.ddpm_layout_parameters("stock") < decision.ddpm_layout_parameters("dia-global")


def test_the_command_prints_the_verdicts_and_the_default_it_supports(tmp_path):
    qualifying = dict(fd_mean=0.97, fd_upper=(0.99, 0.99), heldout_upper=(0.999, 0.999))
    paths = []
    for name in ("digits8", "fmnist16"):
        path = tmp_path / name / "summary.json"
        path.parent.mkdir()
        path.write_text(json.dumps(summary(name, rows(row("dia-timestep", **qualifying)))))
        paths.append(str(path))
    result = subprocess.run(
        [sys.executable, "benchmarks/defaults_decision.py", "--summaries", *paths],
        cwd=REPOSITORY,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = preset_unet_config("cifar10-ddpm")
    with torch.device("meta"):
        stock = count_parameters(UNet2DModel(**config))
        dia_timestep = count_parameters(
            DIAUNet2DModel(**config, dia_attention="dia_lstm", dia_sharing="global", dia_condition="timestep")
        )
    added = f"{dia_timestep:,} ({100 * (dia_timestep - stock) / stock:+.2f} %)"
    lines = result.stdout.splitlines()
    assert f"| dia-timestep | {added} | 0.970 (0.990); 0.9990 | 0.970 (0.990); 0.9990 | yes | no |" in lines
    assert lines[-1] == "Default: dia-timestep (the qualifying variant with the lowest FD ratio on fmnist16)."
    assert "met by no variant." in lines[-2]
