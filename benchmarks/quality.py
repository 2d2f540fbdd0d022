"""Quality at equal budget: stock vs SE in every resnet vs one shared SE vs DIA (each sharing mode), several seeds.

    python benchmarks/quality.py --budget cpu --jobs 2     # Fashion-MNIST 16x16, about 2 hours on 2 CPU cores
    python benchmarks/quality.py --budget gpu              # the same comparison at a larger budget, on a GPU
    python benchmarks/quality.py --budget digits           # reduced stand-in: 8x8 digits, ~20 min on 2 CPU cores
    python benchmarks/quality.py --budget smoke --out /tmp/q   # seconds; checks the plumbing only

Every run is the public training command (`train/train_ddpm.py`, the budget's preset with identical settings
for all variants) followed by `dia-diffusion fid --feature classifier` on DDIM samples from its EMA weights. Each
finished run leaves `result.json` in its folder, so an interrupted comparison continues where it stopped. The table
(mean ± std over seeds) and the figures are written to the output folder. The metric is the Fréchet distance in the
features of a classifier trained on the same dataset: "FD (classifier features)", not FID.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from diffusers import DDPMPipeline

# Importing the package also registers DIAUNet2DModel for the pipeline loader.
from dia_diffusion.parameter_count import count_parameters

REPOSITORY = Path(__file__).resolve().parent.parent
VARIANTS = {
    "stock": ["--unet", "stock"],
    "se-per-layer": ["--unet", "se-per-layer"],
    "se-shared": ["--unet", "se-shared"],
    "dia-global": ["--unet", "dia", "--dia_sharing", "global"],
    "dia-per-width": ["--unet", "dia", "--dia_sharing", "per_width"],
    "dia-per-block": ["--unet", "dia", "--dia_sharing", "per_block"],
    # The gate question: the same model with an identity-at-init gate instead of the paper's sigmoid.
    "dia-identity-gate": ["--unet", "dia", "--dia_sharing", "global", "--dia_gate", "identity"],
}
# Budgets: preset, dataset and resolution, training steps and batch, evaluation samples and DDIM steps, the
# FD-vs-step evaluation during training, and any other training flags (the same for every variant).
# `cpu` is Fashion-MNIST with the fmnist-32 UNet layout at 16x16: 32x32 costs 1.8 s per step on one CPU thread,
# 16x16 0.43 s, which puts 7 variants x 3 seeds at about 2 hours on 2 cores (`--jobs 2`). Its 1000 steps need a
# larger learning rate and a shorter warmup than the preset's 20k-step recipe. `digits` is a smaller stand-in.
BUDGETS = {
    "smoke": dict(preset="demo", dataset="digits", resolution=8, steps=4, batch=8, samples=64, ddim_steps=5,
                  eval_every=2, eval_samples=32, flags=("--sample_inference_steps", "5")),
    "digits": dict(preset="demo", dataset="digits", resolution=8, steps=800, batch=64, samples=1000, ddim_steps=25,
                   eval_every=200, eval_samples=300, flags=("--eval_inference_steps", "100")),
    "cpu": dict(preset="fmnist-32", dataset="fashion_mnist", resolution=16, steps=1000, batch=64, samples=2000,
                ddim_steps=25, eval_every=500, eval_samples=200,
                flags=("--learning_rate", "1e-3", "--lr_warmup_steps", "100", "--sample_inference_steps", "100")),
    "gpu": dict(preset="fmnist-32", dataset="fashion_mnist", resolution=32, steps=20000, batch=128, samples=10000,
                ddim_steps=50, eval_every=2500, eval_samples=2000, flags=()),
}  # fmt: skip


def run_command(command: list[str], log: Path, threads: int | None = None) -> None:
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPOSITORY, env=thread_environment(threads)
        )
    if result.returncode != 0:
        raise SystemExit(f"command failed (exit {result.returncode}), see {log}: {' '.join(command)}")


def thread_environment(threads: int | None) -> dict[str, str]:
    """The environment of a child process, limited to `threads` CPU threads when runs share the machine."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)


def reference_statistics(dataset: str, resolution: int, out: Path) -> Path:
    """Classifier-feature statistics of the whole training split, computed once for every run."""
    path = out / f"reference-{dataset}-{resolution}.npz"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "dia_diffusion.cli", "ref", dataset, "--feature", "classifier",
            "--resolution", str(resolution), "--channels", "1", "--num_samples", "100000", "--out", str(path),
        ]  # fmt: skip
        run_command(command, out / "reference.log")
    return path


def train_and_measure(
    variant: str, seed: int, budget: dict, run_dir: Path, reference: Path, threads: int | None = None
) -> dict:
    """Trains one (variant, seed) and measures its FD; cached in run_dir/result.json."""
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "benchmark.log"
    start = time.time()
    train = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "train/train_ddpm.py",
        "--preset", budget["preset"], *VARIANTS[variant], "--seed", str(seed), "--resolution", str(budget["resolution"]),
        "--max_train_steps", str(budget["steps"]), "--train_batch_size", str(budget["batch"]),
        "--eval_every", str(budget["eval_every"]), "--eval_num_samples", str(budget["eval_samples"]),
        "--output_dir", str(run_dir / "model"), "--resume_from_checkpoint", "latest", *budget["flags"],
    ]  # fmt: skip
    run_command(train, log, threads)
    train_seconds = time.time() - start
    fd_json = run_dir / "fd.json"
    measure = [
        sys.executable, "-m", "dia_diffusion.cli", "fid", "--real", str(reference), "--fake", str(run_dir / "model"),
        "--feature", "classifier", "--num_samples", str(budget["samples"]), "--scheduler", "ddim",
        "--num_inference_steps", str(budget["ddim_steps"]), "--seed", "0", "--json",
    ]  # fmt: skip
    with fd_json.open("w") as handle, log.open("a") as log_handle:
        subprocess.run(
            measure,
            stdout=handle,
            stderr=log_handle,
            cwd=REPOSITORY,
            env=thread_environment(threads),
            check=True,
        )
    fd = json.loads(fd_json.read_text())
    unet_config = json.loads((run_dir / "model" / "unet" / "config.json").read_text())
    history = [json.loads(line) for line in (run_dir / "model" / "metrics.jsonl").read_text().splitlines()]
    result = {
        "variant": variant,
        "seed": seed,
        "fd_classifier": fd["fd_classifier"],
        "fd_record": fd,
        "parameters": count_parameters(DDPMPipeline.from_pretrained(run_dir / "model").unet),
        "unet_class": unet_config["_class_name"],
        "train_seconds": train_seconds,
        "fd_vs_step": [(row["step"], row["fd_classifier"]) for row in history if "fd_classifier" in row],
    }
    partial = result_file.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=1))
    os.replace(partial, result_file)
    return result


def summarise(results: list[dict]) -> list[dict]:
    """Per variant: FD mean ± std over seeds, and the FD ratio to the stock run of the same seed.

    Every variant trains from the same seeds (initial backbone weights, data order, noise), so the paired ratio
    cancels the part of the seed-to-seed spread that all variants share.
    """
    stock_by_seed = {r["seed"]: r["fd_classifier"] for r in results if r["variant"] == "stock"}
    rows = []
    for variant in VARIANTS:
        runs = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["seed"])
        if not runs:
            continue
        values = [r["fd_classifier"] for r in runs]
        paired = [r["fd_classifier"] / stock_by_seed[r["seed"]] for r in runs if r["seed"] in stock_by_seed]
        rows.append(
            {
                "variant": variant,
                "parameters": runs[0]["parameters"],
                "seeds": [r["seed"] for r in runs],
                "fd_mean": statistics.mean(values),
                "fd_std": statistics.stdev(values) if len(values) > 1 else float("nan"),
                "fd_per_seed": values,
                "ratio_to_stock_mean": statistics.mean(paired) if paired else float("nan"),
                "ratio_to_stock_std": statistics.stdev(paired) if len(paired) > 1 else float("nan"),
            }
        )
    return rows


def draw_fd_vs_step(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4))
    for index, variant in enumerate(VARIANTS):
        for run in (r for r in results if r["variant"] == variant):
            if run["fd_vs_step"]:
                steps, values = zip(*run["fd_vs_step"])
                label = (
                    variant
                    if run["seed"] == min(r["seed"] for r in results if r["variant"] == variant)
                    else None
                )
                axes.plot(steps, values, color=f"C{index}", alpha=0.8, label=label, marker="o", markersize=3)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("FD (classifier features), during training")
    axes.set_yscale("log")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def draw_sample_grids(results: list[dict], out: Path, path: Path) -> None:
    """The final sample grid of each variant's first seed, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    grids = []
    for variant in VARIANTS:
        runs = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["seed"])
        samples = (
            sorted((out / variant / f"seed-{runs[0]['seed']}" / "model" / "samples").glob("*.png"))
            if runs
            else []
        )
        if samples:
            grids.append((variant, matplotlib.image.imread(samples[-1])))
    if not grids:
        return
    figure, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), squeeze=False)
    for axis, (variant, grid) in zip(axes[0], grids):
        axis.imshow(grid, cmap="gray")
        axis.set_title(variant, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once on a CPU machine, each with cores/jobs threads",
    )
    parser.add_argument(
        "--dataset", default=None, help="reference data for FD (default: the preset's dataset)"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/quality-<budget>)"
    )
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    budget = BUDGETS[args.budget]
    dataset = args.dataset or budget["dataset"]
    out = Path(args.out or REPOSITORY / "benchmarks" / "results" / f"quality-{args.budget}")

    reference = reference_statistics(dataset, budget["resolution"], out)
    # Seed-major order: an interrupted comparison still has every variant at some seeds.
    runs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    results = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending = [
            pool.submit(
                train_and_measure, variant, seed, budget, out / variant / f"seed-{seed}", reference, threads
            )
            for variant, seed in runs
        ]
        for finished in as_completed(pending):
            result = finished.result()
            results.append(result)
            print(
                f"{result['variant']:<18} seed {result['seed']}: FD (classifier features) {result['fd_classifier']:.3f}",
                flush=True,
            )

    rows = summarise(results)
    summary = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "budget": {"name": args.budget, **budget},
        "dataset": dataset,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    draw_fd_vs_step(results, out / "fd_vs_step.png")
    draw_sample_grids(results, out, out / "samples.png")
    print(
        f"\n{'variant':<18}{'parameters':>12}  {'FD (classifier features)':>26}  {'vs stock, same seed':>20}"
    )
    for row in rows:
        print(
            f"{row['variant']:<18}{row['parameters']:>12,}  {row['fd_mean']:9.3f} ± {row['fd_std']:.3f} (n={len(row['seeds'])})"
            f"  {row['ratio_to_stock_mean']:11.3f} ± {row['ratio_to_stock_std']:.3f}"
        )


if __name__ == "__main__":
    main()
