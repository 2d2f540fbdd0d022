"""What a comparison of `quality.py` shows: its Markdown table, the FD-vs-step figure and the sample grids."""

from __future__ import annotations

import statistics
from pathlib import Path

from quality_budgets import Budget  # benchmarks/, beside this script


def ratio_cell(mean: float, bootstrap: list[float], student: list[float], digits: int) -> str:
    """`mean [bootstrap CI] t [Student-t CI]`."""
    return f"{mean:.{digits}f} [{bootstrap[0]:.{digits}f}, {bootstrap[1]:.{digits}f}] t [{student[0]:.{digits}f}, {student[1]:.{digits}f}]"


def table(rows: list[dict], budget: Budget, name: str) -> str:
    """The comparison as a Markdown table, its first line stating what each number is made of."""
    heldout = "heldout_mean" in rows[0]
    classes = "class_accuracy_mean" in rows[0]
    seeds = rows[0]["seeds"]
    # A comparison still running has some variants at fewer seeds: then each row names its own.
    uniform = all(row["seeds"] == seeds for row in rows)
    seed_text = (
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))})" if uniform else "the seeds each row names"
    )
    header = (
        f"`{name}`: {seed_text}, {budget.steps} steps at batch {budget.batch}; "
        f"FD (classifier features) of {budget.samples} DDIM-{budget.ddim_steps} samples per run"
    )
    if classes:
        header += " (class-balanced), with their class accuracy"
    if heldout:
        header += f"; held-out loss on {rows[0]['heldout_images']} test images"
    header += (
        ". Ratios are to stock at the same seed: mean [95 % percentile-bootstrap CI over seeds] "
        "t [95 % Student-t CI over seeds]."
    )
    columns = ["variant", *([] if uniform else ["seeds"]), "parameters", "FD mean ± std", "FD ratio to stock"]
    if classes:
        columns += ["class accuracy mean ± std", "class accuracy ratio to stock"]
    if heldout:
        columns += [
            "held-out loss mean ± std",
            "held-out ratio to stock",
            "held-out ratio per band, low t → high t",
        ]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        cells = [
            row["variant"],
            *([] if uniform else [", ".join(map(str, row["seeds"]))]),
            f"{row['parameters']:,}",
            f"{row['fd_mean']:.3f} ± {row['fd_std']:.3f}",
            ratio_cell(
                row["ratio_to_stock_mean"], row["ratio_to_stock_ci95"], row["ratio_to_stock_t_ci95"], 3
            ),
        ]
        if classes:
            cells += [
                f"{row['class_accuracy_mean']:.3f} ± {row['class_accuracy_std']:.3f}",
                ratio_cell(
                    row["class_accuracy_ratio_mean"],
                    row["class_accuracy_ratio_ci95"],
                    row["class_accuracy_ratio_t_ci95"],
                    3,
                ),
            ]
        if heldout:
            cells += [
                f"{row['heldout_mean']:.5f} ± {row['heldout_std']:.5f}",
                ratio_cell(
                    row["heldout_ratio_mean"], row["heldout_ratio_ci95"], row["heldout_ratio_t_ci95"], 4
                ),
                ", ".join(f"{band['ratio_mean']:.3f}" for band in row["heldout_band_ratios"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_fd_vs_step(results: list[dict], variants: list[str], path: Path) -> None:
    """FD during training: each seed's curve thin, the variant's mean over its seeds bold, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4))
    curves_by_variant = {
        variant: [dict(r["fd_vs_step"]) for r in results if r["variant"] == variant and r["fd_vs_step"]]
        for variant in variants
    }
    drawn = [(variant, curves) for variant, curves in curves_by_variant.items() if curves]
    for colour, (variant, curves) in enumerate(drawn):
        for curve in curves:
            axes.plot(list(curve), list(curve.values()), color=f"C{colour}", alpha=0.3, linewidth=0.8)
        steps = sorted(set.intersection(*(set(curve) for curve in curves)))
        mean = [statistics.mean(curve[step] for curve in curves) for step in steps]
        label = f"{variant} (mean of {len(curves)})" if len(curves) > 1 else variant
        axes.plot(steps, mean, color=f"C{colour}", linewidth=2, marker="o", markersize=3, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("FD (classifier features), during training")
    axes.set_yscale("log")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def last_sample_grid(out: Path, variant: str, seed: int) -> Path | None:
    """The last grid a run wrote, if its model folder (not committed) is still there."""
    samples = sorted((out / variant / f"seed-{seed}" / "model" / "samples").glob("*.png"))
    return samples[-1] if samples else None


def sample_grid_seeds(results: list[dict], variants: list[str], out: Path) -> dict[str, int]:
    """The seed whose grid each variant shows: the lowest seed every variant still has a grid for.

    A comparison finished over several sittings may keep its model folders at different seeds per variant; then
    each variant shows its own lowest seed (the figure's titles name them).
    """
    seeds = {
        variant: sorted(
            r["seed"]
            for r in results
            if r["variant"] == variant and last_sample_grid(out, variant, r["seed"])
        )
        for variant in variants
    }
    seeds = {variant: found for variant, found in seeds.items() if found}
    shared = set.intersection(*map(set, seeds.values())) if seeds else set()
    return {variant: min(shared) if shared else found[0] for variant, found in seeds.items()}


def draw_sample_grids(results: list[dict], variants: list[str], out: Path, path: Path) -> None:
    """The final sample grid of each variant side by side, each titled with the seed it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    grids = [
        (f"{variant} (seed {seed})", matplotlib.image.imread(last_sample_grid(out, variant, seed)))
        for variant, seed in sample_grid_seeds(results, variants, out).items()
    ]
    if not grids:
        return
    figure, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), squeeze=False)
    for axis, (title, grid) in zip(axes[0], grids):
        axis.imshow(grid, cmap="gray")
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
