"""What the finished runs of a `quality.py` comparison add up to: per variant, FD and held-out loss over seeds and
their paired ratios to stock with both confidence intervals, and the check that paired runs started alike."""

import json
import statistics

from paired_statistics import paired_ratio  # benchmarks/, beside this script
from quality_budgets import VARIANTS

# A retrofit with the identity gate computes at step 0 exactly what its stock checkpoint computes, and every variant
# of a seed draws the same data order and noise, so the paired runs' first logged training loss (the mean over the
# first log window) differs only by what the first updates of the DIA gain change: about 1e-6 of it on
# retrofit-fmnist16. A gap this much larger means the runs were not paired.
PAIRED_START_TOLERANCE = 1e-3


def check_paired_starts(results: list[dict]) -> list[str]:
    """Refuses a retrofit comparison whose paired runs did not start alike; returns the runs that predate the record
    it needs (`first_logged_loss`) and so were not checked."""
    stock_by_seed = {run["seed"]: run for run in results if run["variant"] == "stock"}
    unchecked = []
    for run in results:
        stock = stock_by_seed.get(run["seed"])
        if stock is None or run is stock:
            continue
        if "first_logged_loss" not in run or "first_logged_loss" not in stock:
            unchecked.append(f"{run['variant']} seed {run['seed']}")
            continue
        (step, loss), (stock_step, stock_loss) = run["first_logged_loss"], stock["first_logged_loss"]
        if step != stock_step or abs(loss - stock_loss) > PAIRED_START_TOLERANCE * abs(stock_loss):
            raise SystemExit(
                f"quality.py: error: {run['variant']} and stock at seed {run['seed']} did not start alike: first "
                f"logged training loss {loss:.6g} at step {step} against stock's {stock_loss:.6g} at step "
                f"{stock_step}, although a retrofit starts from what stock computes, on the same data and noise"
            )
    return unchecked


def summarise(results: list[dict]) -> list[dict]:
    """Per variant: FD (and held-out loss) mean ± std over seeds, and the paired ratio to stock with its CI.

    Every variant trains from the same seeds (initial backbone weights, data order, noise), so the paired ratio
    cancels the part of the seed-to-seed spread that all variants share. A run whose seed has no stock run (yet) is
    left out, so that each row's mean and ratio cover the seeds it names.
    """
    stock_by_seed = {r["seed"]: r for r in results if r["variant"] == "stock"}
    if not stock_by_seed:
        raise SystemExit(
            "quality.py: error: no stock run to pair the variants with: include stock in --variants"
        )
    heldout = all("heldout" in r for r in results)
    if heldout and len({json.dumps(heldout_protocol(r)) for r in results}) > 1:
        raise SystemExit(
            "quality.py: error: the runs' held-out losses were measured on different test images, timesteps or noise"
        )
    rows = []
    for variant in VARIANTS:
        paired = (r for r in results if r["variant"] == variant and r["seed"] in stock_by_seed)
        runs = sorted(paired, key=lambda r: r["seed"])
        if not runs:
            continue
        values = [r["fd_classifier"] for r in runs]
        fd_ratio = paired_ratio(runs, stock_by_seed, lambda run: run["fd_classifier"])
        row = {
            "variant": variant,
            "parameters": runs[0]["parameters"],
            "seeds": [r["seed"] for r in runs],
            "fd_mean": statistics.mean(values),
            "fd_std": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "fd_per_seed": values,
            "ratio_to_stock_mean": fd_ratio["mean"],
            "ratio_to_stock_std": fd_ratio["std"],
            "ratio_to_stock_ci95": fd_ratio["ci95"],
            "ratio_to_stock_t_ci95": fd_ratio["t_ci95"],
        }
        if heldout:
            row.update(summarise_heldout(runs, stock_by_seed))
        if all("class_accuracy" in run for run in runs):
            row.update(summarise_class_accuracy(runs, stock_by_seed))
        rows.append(row)
    return rows


def heldout_protocol(run: dict) -> dict:
    """What a run's held-out loss was measured on; runs are compared only when it is the same."""
    measured = run["heldout"]
    return {
        **{key: measured[key] for key in ("dataset", "split", "num_images", "seed")},
        "bands": [(band["band"], band["timesteps"]) for band in measured["per_band"]],
    }


def summarise_heldout(runs: list[dict], stock_by_seed: dict[int, dict]) -> dict:
    losses = [r["heldout"]["heldout_loss"] for r in runs]
    overall = paired_ratio(runs, stock_by_seed, lambda run: run["heldout"]["heldout_loss"])
    bands = []
    for index, band in enumerate(runs[0]["heldout"]["per_band"]):
        ratio = paired_ratio(runs, stock_by_seed, lambda run, i=index: run["heldout"]["per_band"][i]["loss"])
        bands.append({"band": band["band"], "ratio_mean": ratio["mean"], "ratio_ci95": ratio["ci95"]})
    return {
        "heldout_images": runs[0]["heldout"]["num_images"],
        "heldout_mean": statistics.mean(losses),
        "heldout_std": statistics.stdev(losses) if len(losses) > 1 else float("nan"),
        "heldout_per_seed": losses,
        "heldout_ratio_mean": overall["mean"],
        "heldout_ratio_ci95": overall["ci95"],
        "heldout_ratio_t_ci95": overall["t_ci95"],
        "heldout_band_ratios": bands,
    }


def summarise_class_accuracy(runs: list[dict], stock_by_seed: dict[int, dict]) -> dict:
    """A class-conditional comparison's class accuracy (the fraction of each class's samples the feature classifier
    calls that class), with its paired ratio to stock."""
    accuracies = [run["class_accuracy"] for run in runs]
    ratio = paired_ratio(runs, stock_by_seed, lambda run: run["class_accuracy"])
    return {
        "class_accuracy_mean": statistics.mean(accuracies),
        "class_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else float("nan"),
        "class_accuracy_per_seed": accuracies,
        "class_accuracy_ratio_mean": ratio["mean"],
        "class_accuracy_ratio_ci95": ratio["ci95"],
        "class_accuracy_ratio_t_ci95": ratio["t_ci95"],
    }
