"""Attention correlation and what the attention depends on, for every attention variant of a quality budget.

    python benchmarks/correlation.py --budget cpu --jobs 2      # Fashion-MNIST 16x16, seed 0
    python benchmarks/correlation.py --budget digits --jobs 2   # 8x8 digits, seed 0

For each variant with channel attention, trains the budget's seed-0 model (one run of the quality budget, without
its final FD) with exactly the command
`benchmarks/quality.py` uses (cached in benchmarks/results/correlation-<budget>/<variant>/model, resumable), then runs
`dia-diffusion analyze-correlation` on the budget's test images. Writes each variant's correlation.json and figures
next to its model, and summary.json with one row per variant: the three correlations (all equal-width pairs, pairs
in one residual stream, mean profiles of those pairs) and the attention's variation across images and timesteps.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from quality import BUDGETS, REPOSITORY, VARIANTS, run_command, run_folder, train_command

from dia_diffusion.runtime.output_files import write_atomically

# Every variant with channel attention; the stock UNet has none to analyse.
ATTENTION_VARIANTS = [variant for variant in VARIANTS if variant != "stock"]
SUMMARY_KEYS = (
    "mean_r_all_pairs",
    "mean_r_aligned_pairs",
    "mean_r_profiles",
    "aligned_pairs",
    "input_variation_mean",
    "timestep_variation_mean",
)


def analyse_variant(variant: str, budget_name: str, out: Path, num_images: int, threads: int | None) -> dict:
    """Trains (or reuses) the variant's seed-0 model and analyses it; cached in its correlation.json."""
    run_dir = out / variant
    with run_folder(run_dir):
        return analysed_model(variant, budget_name, run_dir, num_images, threads)


def analysed_model(
    variant: str, budget_name: str, run_dir: Path, num_images: int, threads: int | None
) -> dict:
    """`analyse_variant`'s work, with the run folder locked."""
    report_file = run_dir / "correlation.json"
    if report_file.is_file():
        return json.loads(report_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "benchmark.log"
    budget = BUDGETS[budget_name]
    if not (run_dir / "model" / "model_index.json").is_file():
        run_command(train_command(variant, 0, budget, run_dir), log, threads)
    analyse = [
        sys.executable, "-m", "dia_diffusion.commands.cli", "analyze-correlation", "--model", str(run_dir / "model"),
        "--dataset", budget.dataset, "--split", "test", "--num_images", str(num_images),
        "--out_dir", str(run_dir),
    ]  # fmt: skip
    run_command(analyse, log, threads)
    return json.loads(report_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    parser.add_argument("--variants", nargs="+", choices=ATTENTION_VARIANTS, default=ATTENTION_VARIANTS)
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once on a CPU machine")
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/correlation-<budget>)"
    )
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    out = Path(args.out or REPOSITORY / "benchmarks" / "results" / f"correlation-{args.budget}")
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    start = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        reports = list(
            pool.map(
                lambda variant: analyse_variant(variant, args.budget, out, args.num_images, threads),
                args.variants,
            )
        )
    rows = [
        {"variant": variant, **{key: report[key] for key in SUMMARY_KEYS}}
        for variant, report in zip(args.variants, reports)
    ]
    summary = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "budget": {"name": args.budget, **dataclasses.asdict(BUDGETS[args.budget])},
        "seed": 0,
        "num_images": args.num_images,
        "timesteps": reports[0]["timesteps"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "wall_seconds_this_invocation": round(time.time() - start),
        "rows": rows,
    }
    write_atomically(out / "summary.json", lambda partial: partial.write_text(json.dumps(summary, indent=1)))
    print(
        f"\n{'variant':<24}{'r all pairs':>12}{'r aligned':>11}{'r profiles':>12}{'input var':>11}{'timestep var':>14}"
    )
    for row in rows:
        print(
            f"{row['variant']:<24}{row['mean_r_all_pairs']:>12.3f}{row['mean_r_aligned_pairs']:>11.3f}"
            f"{row['mean_r_profiles']:>12.3f}{row['input_variation_mean']:>11.4f}{row['timestep_variation_mean']:>14.4f}"
        )


if __name__ == "__main__":
    main()
