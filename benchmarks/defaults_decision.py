"""Which model defaults the deciding comparison supports: the rule of docs/benchmarks.md ("Defaults"), applied.

    python benchmarks/defaults_decision.py
    python benchmarks/defaults_decision.py --summaries A/summary.json B/summary.json   # the same two, elsewhere

The rule was written down before the runs it judges. It reads the finished `digits8` and `fmnist16` comparisons of
`benchmarks/quality.py` (their `summary.json`) and, for each DIA variant chosen before the runs:

- it *meets the goal* ("DIA helps") if on both datasets its paired FD ratio to stock has a mean of at most 0.90 and
  the upper ends of both 95 % intervals (percentile bootstrap and Student-t) below 1.0;
- it *may become the default* if on both datasets the upper ends of both intervals lie below 1.0, for its FD ratio
  and for its held-out loss ratio; if several may, the one with the lowest `fmnist16` FD ratio is taken;
- both need fewer parameters than SE in every resnet and at most +1 % over stock, counted on the DDPM CIFAR-10
  layout (the layout users train; the CPU budgets' small layouts are printed beside it).

A summary that is not one of those two comparisons as their budgets define them, or whose comparison is unfinished
(a variant missing, a variant at fewer seeds than its budget, no held-out loss, an interval that is not a number),
is refused. Nothing is written; the table goes to stdout.
"""

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch
from quality_budgets import BUDGETS, DECIDING_VARIANTS, VARIANTS  # benchmarks/, beside this script

from dia_diffusion.commands.params import count_parameters, preset_unet_config
from dia_diffusion.training.presets import build_unet

REPOSITORY = Path(__file__).resolve().parent.parent
DECIDING_BUDGETS = ("digits8", "fmnist16")
TIE_BREAK = "fmnist16"
DEFAULT_SUMMARIES = [
    REPOSITORY / "benchmarks" / "results" / f"quality-{budget}" / "summary.json"
    for budget in DECIDING_BUDGETS
]
GOAL_FD_RATIO = 0.90
MAX_ADDED_PERCENT = 1.0
# Today's default model: DIAUNet2DModel's own defaults are global DIA-LSTM with the sigmoid gate.
CURRENT_DEFAULT = "dia-global"


def model_options(variant: str) -> tuple[str, dict[str, str]]:
    """A quality.py variant's `--unet` choice and its DIA options, read from its training flags."""
    flags = VARIANTS[variant]
    options = {flag.removeprefix("--"): value for flag, value in zip(flags[::2], flags[1::2])}
    return options.pop("unet"), options


def ddpm_layout_parameters(variant: str) -> int:
    """Parameters of a quality.py variant built on the DDPM CIFAR-10 layout (on the meta device: no memory)."""
    unet, options = model_options(variant)
    with torch.device("meta"):
        return count_parameters(build_unet(unet, preset_unet_config("cifar10-ddpm"), options))


def finished_rows(summary: dict, path: Path) -> dict[str, dict]:
    """The rows of one deciding comparison by variant, once every variant of its budget is there at every seed with
    its held-out loss; refused otherwise."""
    budget = summary["budget"]
    name = budget.get("name")
    if name not in DECIDING_BUDGETS:
        raise SystemExit(
            f"defaults_decision.py: error: {path} is the {name!r} comparison; the rule decides on "
            f"{' and '.join(DECIDING_BUDGETS)} only"
        )
    expected = json.loads(json.dumps({"name": name, **dataclasses.asdict(BUDGETS[name])}))
    differing = sorted(key for key in expected.keys() | budget.keys() if expected.get(key) != budget.get(key))
    if differing:
        raise SystemExit(
            f"defaults_decision.py: error: {path} was not run as the {name} budget defines it "
            f"(differs in {', '.join(differing)})"
        )
    by_variant = {row["variant"]: row for row in summary["rows"]}
    missing = [variant for variant in budget["variants"] if variant not in by_variant]
    rows = {variant: by_variant[variant] for variant in budget["variants"] if variant in by_variant}
    short = [
        f"{variant} (seeds {', '.join(map(str, row['seeds']))})"
        for variant, row in rows.items()
        if row["seeds"] != budget["seeds"]
    ]
    unmeasured = [variant for variant, row in rows.items() if row.get("heldout_ratio_ci95") is None]
    not_numbers = [
        variant
        for variant, row in rows.items()
        if variant not in unmeasured and not all(map(math.isfinite, interval_ends(row)))
    ]
    problems = [
        *([f"no run of {', '.join(missing)}"] if missing else []),
        *([f"not every seed of {', '.join(map(str, budget['seeds']))}: {'; '.join(short)}"] if short else []),
        *([f"no held-out loss for {', '.join(unmeasured)}"] if unmeasured else []),
        *([f"an interval that is not a number for {', '.join(not_numbers)}"] if not_numbers else []),
    ]
    if problems:
        raise SystemExit(
            f"defaults_decision.py: error: {path} is an unfinished comparison: {'; '.join(problems)}"
        )
    return rows


def interval_ends(row: dict) -> list[float]:
    """The FD ratio's mean and every end of its and the held-out ratio's intervals."""
    return [
        row["ratio_to_stock_mean"],
        *(
            end
            for key in ("ratio_to_stock", "heldout_ratio")
            for kind in ("ci95", "t_ci95")
            for end in row[f"{key}_{kind}"]
        ),
    ]


def upper_end(row: dict, metric: str) -> float:
    """The larger upper end of the two 95 % intervals: a claim needs both below 1."""
    return max(row[f"{metric}_ci95"][1], row[f"{metric}_t_ci95"][1])


def decide(summaries: dict[str, dict[str, dict]], parameters: dict[str, int]) -> list[dict]:
    """One verdict per DIA variant chosen before the runs (`DECIDING_VARIANTS`) that every summary has."""
    stock, se_per_layer = parameters["stock"], parameters["se-per-layer"]
    candidates = [
        variant
        for variant in DECIDING_VARIANTS
        if model_options(variant)[0] == "dia" and all(variant in rows for rows in summaries.values())
    ]
    verdicts = []
    for variant in candidates:
        added_percent = 100 * (parameters[variant] - stock) / stock
        within_cost = added_percent <= MAX_ADDED_PERCENT and parameters[variant] < se_per_layer
        per_dataset = {
            name: {
                "parameters": rows[variant]["parameters"],
                "fd_ratio": rows[variant]["ratio_to_stock_mean"],
                "fd_upper": upper_end(rows[variant], "ratio_to_stock"),
                "heldout_upper": upper_end(rows[variant], "heldout_ratio"),
            }
            for name, rows in summaries.items()
        }
        below_one = all(d["fd_upper"] < 1.0 and d["heldout_upper"] < 1.0 for d in per_dataset.values())
        meets_goal = all(d["fd_ratio"] <= GOAL_FD_RATIO and d["fd_upper"] < 1.0 for d in per_dataset.values())
        verdicts.append(
            {
                "variant": variant,
                "ddpm_parameters": parameters[variant],
                "ddpm_added_percent": added_percent,
                "within_cost": within_cost,
                "datasets": per_dataset,
                "may_become_default": within_cost and below_one,
                "meets_goal": within_cost and meets_goal,
            }
        )
    return verdicts


def chosen_default(verdicts: list[dict]) -> str:
    """The qualifying variant with the lowest `fmnist16` FD ratio; the current default when none qualifies."""
    qualifying = [verdict for verdict in verdicts if verdict["may_become_default"]]
    if not qualifying:
        return CURRENT_DEFAULT
    return min(qualifying, key=lambda verdict: verdict["datasets"][TIE_BREAK]["fd_ratio"])["variant"]


def report(verdicts: list[dict], summaries: dict[str, dict[str, dict]], parameters: dict[str, int]) -> str:
    """The verdicts as a Markdown table, then the parameter bounds, the goal and the default in words."""
    yes_no = {True: "yes", False: "no"}
    header = [
        "variant",
        "parameters, DDPM layout (added)",
        "within the parameter bounds",
        *[f"{name}: FD ratio, upper end; held-out upper end" for name in summaries],
        "may become the default",
        "meets the goal",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for verdict in verdicts:
        cells = [
            verdict["variant"],
            f"{verdict['ddpm_parameters']:,} ({verdict['ddpm_added_percent']:+.2f} %)",
            yes_no[verdict["within_cost"]],
            *[
                f"{d['fd_ratio']:.4f}, {d['fd_upper']:.4f}; {d['heldout_upper']:.5f}"
                for d in verdict["datasets"].values()
            ],
            yes_no[verdict["may_become_default"]],
            yes_no[verdict["meets_goal"]],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    stock, se = parameters["stock"], parameters["se-per-layer"]
    goal = [verdict["variant"] for verdict in verdicts if verdict["meets_goal"]]
    qualifying = any(verdict["may_become_default"] for verdict in verdicts)
    lines += [
        "",
        "Upper end: the larger of the upper ends of the two 95 % intervals (bootstrap and Student-t).",
        f"Parameter bounds, on the DDPM layout: at most +{MAX_ADDED_PERCENT:.0f} % over stock ({stock:,}) and fewer "
        f"than SE in every resnet ({se:,}, {100 * (se - stock) / stock:+.2f} %).",
        *[
            f"On the {name} layout: stock {rows['stock']['parameters']:,}, SE in every resnet "
            f"{rows['se-per-layer']['parameters']:,}, "
            + ", ".join(
                f"{verdict['variant']} {verdict['datasets'][name]['parameters']:,}" for verdict in verdicts
            )
            + "."
            for name, rows in summaries.items()
        ],
        f"Goal (FD ratio at most {GOAL_FD_RATIO:.2f} and both intervals below 1 on both datasets, within the "
        "parameter bounds): " + (f"met by {', '.join(goal)}." if goal else "met by no variant."),
        f"Default: {chosen_default(verdicts)}"
        + (
            f" (the qualifying variant with the lowest FD ratio on {TIE_BREAK})."
            if qualifying
            else " (unchanged: no variant qualifies)."
        ),
    ]
    return "\n".join(lines)


def load_summaries(paths: list[Path]) -> dict[str, dict[str, dict]]:
    """The finished rows of each deciding comparison by budget name, in `DECIDING_BUDGETS` order."""
    summaries = {}
    for path in paths:
        if not path.is_file():
            raise SystemExit(
                f"defaults_decision.py: error: no summary at {path}: run benchmarks/quality.py first"
            )
        summary = json.loads(path.read_text())
        rows = finished_rows(summary, path)
        name = summary["budget"]["name"]
        if name in summaries:
            raise SystemExit(f"defaults_decision.py: error: two summaries of {name}")
        summaries[name] = rows
    lacking = [name for name in DECIDING_BUDGETS if name not in summaries]
    if lacking:
        raise SystemExit(
            f"defaults_decision.py: error: no summary of {', '.join(lacking)}: the rule needs both datasets"
        )
    return {name: summaries[name] for name in DECIDING_BUDGETS}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--summaries",
        nargs="+",
        type=Path,
        default=DEFAULT_SUMMARIES,
        help="the digits8 and fmnist16 summary.json (default: those under benchmarks/results)",
    )
    summaries = load_summaries(parser.parse_args().summaries)
    # The variants chosen before the runs include the two references, stock and SE in every resnet.
    parameters = {variant: ddpm_layout_parameters(variant) for variant in DECIDING_VARIANTS}
    print(report(decide(summaries, parameters), summaries, parameters))


if __name__ == "__main__":
    main()
