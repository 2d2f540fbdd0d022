"""Which model defaults the deciding comparison supports: the rule of docs/benchmarks.md ("Defaults"), applied.

    python benchmarks/defaults_decision.py
    python benchmarks/defaults_decision.py --summaries A/summary.json B/summary.json

The rule was written down before the runs it judges. For each DIA variant of the comparison:

- it *meets the goal* ("DIA helps") if on every dataset its paired FD ratio to stock has a mean of at most 0.90 and
  the upper ends of both 95 % intervals (percentile bootstrap and Student-t) below 1.0;
- it *may become the default* if on every dataset the upper ends of both intervals lie below 1.0, for its FD ratio
  and for its held-out loss ratio; if several may, the one with the lowest FD ratio on the last summary
  (`fmnist16` by default) is taken;
- both need fewer parameters than SE in every resnet and at most +1 % over stock on the DDPM CIFAR-10 layout.

Each summary is a `benchmarks/quality.py` comparison's `summary.json`. One whose comparison is unfinished (a
variant missing, a variant at fewer seeds than its budget, no held-out loss) is refused: the rule judges finished
comparisons only. Nothing is written; the table goes to stdout.
"""

import argparse
import json
from pathlib import Path

import torch
from quality import VARIANTS  # benchmarks/quality.py, beside this script

from dia_diffusion.parameter_count import count_parameters, preset_unet_config
from dia_diffusion.presets import build_unet

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_SUMMARIES = [
    REPOSITORY / "benchmarks" / "results" / f"quality-{budget}" / "summary.json"
    for budget in ("digits8", "fmnist16")
]
GOAL_FD_RATIO = 0.90
MAX_ADDED_PERCENT = 1.0
# The current defaults: global DIA (`dia_sharing="global"`), the variant every other is measured against here.
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
    """The summary's rows by variant, once every variant of its budget is there at every seed, held-out loss included."""
    budget = summary["budget"]
    if not budget.get("heldout_images") or "variants" not in budget:
        raise SystemExit(
            f"defaults_decision.py: error: {path} is not one of the deciding comparisons (its budget measures no "
            "held-out loss)"
        )
    rows = {row["variant"]: row for row in summary["rows"]}
    missing = [variant for variant in budget["variants"] if variant not in rows]
    short = [
        f"{row['variant']} (seeds {', '.join(map(str, row['seeds']))})"
        for row in rows.values()
        if row["seeds"] != budget["seeds"]
    ]
    unmeasured = [variant for variant, row in rows.items() if row.get("heldout_ratio_ci95") is None]
    problems = [
        *([f"no run of {', '.join(missing)}"] if missing else []),
        *([f"not every seed of {', '.join(map(str, budget['seeds']))}: {'; '.join(short)}"] if short else []),
        *([f"no held-out loss for {', '.join(unmeasured)}"] if unmeasured else []),
    ]
    if problems:
        raise SystemExit(
            f"defaults_decision.py: error: {path} is an unfinished comparison: {'; '.join(problems)}"
        )
    return rows


def upper_end(row: dict, metric: str) -> float:
    """The larger upper end of the two 95 % intervals: a claim needs both below 1."""
    return max(row[f"{metric}_ci95"][1], row[f"{metric}_t_ci95"][1])


def decide(summaries: list[tuple[str, dict[str, dict]]], parameters: dict[str, int]) -> list[dict]:
    """One verdict per DIA variant present in every summary, in the order of the first summary's rows."""
    stock, se_per_layer = parameters["stock"], parameters["se-per-layer"]
    first_rows = summaries[0][1]
    candidates = [
        variant
        for variant in first_rows
        if model_options(variant)[0] == "dia" and all(variant in rows for _, rows in summaries)
    ]
    verdicts = []
    for variant in candidates:
        added_percent = 100 * (parameters[variant] - stock) / stock
        within_cost = added_percent <= MAX_ADDED_PERCENT and parameters[variant] < se_per_layer
        per_dataset = {
            name: {
                "fd_ratio": rows[variant]["ratio_to_stock_mean"],
                "fd_upper": upper_end(rows[variant], "ratio_to_stock"),
                "heldout_upper": upper_end(rows[variant], "heldout_ratio"),
            }
            for name, rows in summaries
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


def chosen_default(verdicts: list[dict], tie_break: str) -> str:
    """The qualifying variant with the lowest FD ratio on `tie_break`; the current default when none qualifies."""
    qualifying = [verdict for verdict in verdicts if verdict["may_become_default"]]
    if not qualifying:
        return CURRENT_DEFAULT
    return min(qualifying, key=lambda verdict: verdict["datasets"][tie_break]["fd_ratio"])["variant"]


def report(verdicts: list[dict], names: list[str], parameters: dict[str, int]) -> str:
    yes_no = {True: "yes", False: "no"}
    header = [
        "variant",
        "DDPM-layout parameters (added)",
        *[f"{name}: FD ratio (upper end); held-out upper end" for name in names],
        "may become the default",
        "meets the goal",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for verdict in verdicts:
        cells = [
            verdict["variant"],
            f"{verdict['ddpm_parameters']:,} ({verdict['ddpm_added_percent']:+.2f} %)",
            *[
                f"{d['fd_ratio']:.3f} ({d['fd_upper']:.3f}); {d['heldout_upper']:.4f}"
                for d in (verdict["datasets"][name] for name in names)
            ],
            yes_no[verdict["may_become_default"]],
            yes_no[verdict["meets_goal"]],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    stock, se = parameters["stock"], parameters["se-per-layer"]
    default = chosen_default(verdicts, names[-1])
    goal = [verdict["variant"] for verdict in verdicts if verdict["meets_goal"]]
    lines += [
        "",
        f"Stock has {stock:,} parameters on the DDPM layout, SE in every resnet {se:,} "
        f"({100 * (se - stock) / stock:+.2f} %). Upper end: the larger of the two 95 % intervals' upper ends.",
        f"Goal (FD ratio <= {GOAL_FD_RATIO:.2f}, both intervals below 1, on every dataset): "
        + (f"met by {', '.join(goal)}." if goal else "met by no variant."),
        f"Default: {default}"
        + (
            " (unchanged: no variant qualifies)."
            if not any(verdict["may_become_default"] for verdict in verdicts)
            else f" (the qualifying variant with the lowest FD ratio on {names[-1]})."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--summaries",
        nargs="+",
        type=Path,
        default=DEFAULT_SUMMARIES,
        help="quality.py summary.json files; the last breaks ties (default: digits8, fmnist16)",
    )
    args = parser.parse_args()
    summaries = []
    for path in args.summaries:
        if not path.is_file():
            raise SystemExit(
                f"defaults_decision.py: error: no summary at {path}: run benchmarks/quality.py first"
            )
        summary = json.loads(path.read_text())
        summaries.append((summary["budget"]["name"], finished_rows(summary, path)))
    names = [name for name, _ in summaries]
    if len(set(names)) != len(names):
        raise SystemExit(f"defaults_decision.py: error: one budget given twice: {', '.join(names)}")
    variants = {variant for _, rows in summaries for variant in rows} | {"stock", "se-per-layer"}
    parameters = {variant: ddpm_layout_parameters(variant) for variant in sorted(variants)}
    print(report(decide(summaries, parameters), names, parameters))


if __name__ == "__main__":
    main()
