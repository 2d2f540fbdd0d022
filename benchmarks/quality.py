"""Quality at equal budget: does DIA help, trained from scratch and as a retrofit of a trained stock UNet?

    python benchmarks/quality.py --budget digits8 --pilot            # stock, seed 0, long, FD vs step (see below)
    python benchmarks/quality.py --budget digits8 --jobs 2           # 6 variants x 5 seeds, 8x8 digits
    python benchmarks/quality.py --budget fmnist16 --jobs 2          # 6 variants x 5 seeds, Fashion-MNIST 16x16
    python benchmarks/quality.py --budget retrofit-fmnist16 --jobs 2 # continue each seed's stock model, paired
    python benchmarks/quality.py --budget class-fmnist16 --jobs 2    # class-conditional: 4 variants x 5 seeds
    python benchmarks/quality.py --budget gpu                        # the same questions at 32x32, on a GPU
    python benchmarks/quality.py --budget gpu-cifar10 --dataset cifar-10-python.tar.gz
    python benchmarks/quality.py --budget cpu --jobs 2               # the earlier comparison: 7 variants x 3 seeds
    python benchmarks/quality.py --budget smoke --out /tmp/q         # seconds; checks the plumbing only
    python benchmarks/quality.py --budget retrofit-smoke --out /tmp/r --base_out /tmp/q  # and of a retrofit

Every run is the public training command (`train/train_ddpm.py`, the budget's preset with identical settings for
all variants) followed by `dia-diffusion fid --feature classifier` on DDIM samples from its EMA weights and, for
the budgets that set `heldout_images`, `dia-diffusion heldout-loss` on the test split (same test images, timesteps
and noise for every run). The metric is the Fréchet distance in the features of a classifier trained on the same
dataset: "FD (classifier features)", not FID.

Paired design: every variant trains from the same seeds, so the same seed gives the same initial backbone weights,
data order and noise in every variant. For every variant the table gives the FD mean ± std over seeds and the
ratio to stock at the same seed with a 95 % percentile-bootstrap confidence interval over seeds and the Student-t
interval of the same mean; likewise for the held-out loss, and per timestep band its ratio with the bootstrap
interval. With 5 seeds the percentile bootstrap is about a third narrower than the t interval: "differs" needs both
to exclude 1.

Interruptions: each run's folder ends with `result.json`, so a finished run is never trained again; the new budgets
checkpoint every 500 (CPU) to 2000 (GPU) steps and the training command always carries `--resume_from_checkpoint
latest`, so an interrupted run continues from its last checkpoint, not from step 0. A comparison can span several
sittings. `result.json` records the settings the run was trained and measured with (and a retrofit's the sha256 of
the model it started from): a cached run whose settings differ from the budget's is refused, never mixed into a
table.

Budgets. `digits8` and `fmnist16` take about 3 and 7 hours on a 2-core CPU with `--jobs 2` (their `retrofit-`
budgets about 1 and 1.5-2 hours); their default variants were chosen before any of their runs. Their step counts are
taken from the pilot: `--pilot` trains stock at seed 0 for `pilot_steps` with an FD evaluation every
`pilot_eval_every` steps and draws FD vs step (`<out>/pilot/fd_vs_step.png`). With the constant learning rate of
these recipes, the pilot run up to step N is the budget's N-step stock run at seed 0, so `steps` is set where
stock's FD has flattened. A retrofit budget continues, for each seed, the stock model of its base budget (trained
there first if missing) for `steps` more steps: as stock, and, paired, as DIA retrofitted with the identity gate
(`--init_unet`). Its training seed is offset, so the continuation sees a data order and noise of its own rather
than a replay of the base run's first steps; the same in every variant. Paired runs must start alike: a retrofit
comparison whose runs' first logged training losses differ is refused (`check_paired_starts`).
"""

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

from quality_budgets import BUDGETS, RESULT_NEUTRAL_FIELDS, VARIANTS, Budget, guidance_scale
from quality_report import draw_fd_vs_step, draw_sample_grids, table
from quality_summary import check_paired_starts, summarise

from dia_diffusion.commands.params import count_parameters
from dia_diffusion.pipelines.sampling import load_pipeline
from dia_diffusion.runtime.file_digests import folder_weights_sha256
from dia_diffusion.runtime.folder_lock import LOCK_FILENAME, FolderInUseError, take_lock
from dia_diffusion.runtime.output_files import write_atomically
from dia_diffusion.training.presets import PRESETS

REPOSITORY = Path(__file__).resolve().parent.parent


def train_command(
    variant: str, seed: int, budget: Budget, run_dir: Path, init_unet: Path | None = None
) -> list[str]:
    """The training command of one (variant, seed) run of `budget`, writing its model to `run_dir/model`."""
    preset = PRESETS[budget.preset].settings
    # Only settings that differ from the preset's, so the earlier budgets' commands stay as they were run.
    data = [] if budget.dataset == preset["dataset"] else ["--dataset", budget.dataset]
    data += [] if budget.channels == preset["channels"] else ["--channels", str(budget.channels)]
    data += ["--checkpointing_steps", str(budget.checkpointing_steps)] if budget.checkpointing_steps else []
    start = [] if init_unet is None else ["--init_unet", str(init_unet)]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "train/train_ddpm.py",
        "--preset", budget.preset, *VARIANTS[variant], "--seed", str(seed + budget.seed_offset), "--resolution", str(budget.resolution),
        "--max_train_steps", str(budget.steps), "--train_batch_size", str(budget.batch),
        "--eval_every", str(budget.eval_every), "--eval_num_samples", str(budget.eval_samples),
        "--output_dir", str(run_dir / "model"), "--resume_from_checkpoint", "latest", *data, *start, *budget.flags,
    ]  # fmt: skip


def run_command(
    command: list[str], log: Path, threads: int | None = None, stdout: Path | None = None
) -> None:
    """Runs `command`, appending its output to `log`; its standard output goes to the file `stdout` if given, which
    appears only when the command succeeds (it is written beside it and renamed)."""
    # A killed earlier sitting may have left its last line unfinished: the command starts a line of its own.
    earlier = log.read_text() if log.is_file() else ""
    fresh_line = "\n" if earlier and not earlier.endswith("\n") else ""
    partial = stdout.with_name(f".{stdout.name}.partial") if stdout else Path(os.devnull)
    with log.open("a") as handle, open(partial, "w") as output:
        handle.write(f"{fresh_line}$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(
            command,
            stdout=output if stdout else handle,
            stderr=handle if stdout else subprocess.STDOUT,
            cwd=REPOSITORY,
            env=thread_environment(threads),
        )
    if result.returncode != 0:
        if stdout:
            partial.unlink()
        raise SystemExit(f"command failed (exit {result.returncode}), see {log}: {' '.join(command)}")
    if stdout:
        os.replace(partial, stdout)


@contextmanager
def run_folder(run_dir: Path) -> Iterator[None]:
    """One benchmark process at a time per run folder (the lock inside it; the commands it runs lock their own
    outputs): a second sitting of the same comparison is refused by name instead of writing into the same files."""
    try:
        lock = take_lock(run_dir / LOCK_FILENAME, "run folder", run_dir, "benchmark")
    except FolderInUseError as error:
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {error}") from None
    try:
        yield
    finally:
        lock.release()


def thread_environment(threads: int | None) -> dict[str, str]:
    """The environment of a child process, limited to `threads` CPU threads when runs share the machine."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)


def reference_statistics(budget: Budget, out: Path) -> Path:
    """Classifier-feature statistics of the whole training split, computed once for every run."""
    dataset = budget.dataset
    path = out / f"reference-{Path(dataset).name}-{budget.resolution}.npz"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "dia_diffusion.commands.cli", "ref", dataset, "--feature", "classifier",
            "--resolution", str(budget.resolution), "--channels", str(budget.channels), "--num_samples", "100000",
            "--out", str(path),
        ]  # fmt: skip
        run_command(command, out / "reference.log")
    return path


def train_and_measure(
    variant: str,
    seed: int,
    budget: Budget,
    run_dir: Path,
    reference: Path,
    threads: int | None = None,
    init_unet: Path | None = None,
) -> dict:
    """Trains one (variant, seed) and measures it; cached in run_dir/result.json."""
    with run_folder(run_dir):
        return measured_run(variant, seed, budget, run_dir, reference, threads, init_unet)


def measured_run(
    variant: str,
    seed: int,
    budget: Budget,
    run_dir: Path,
    reference: Path,
    threads: int | None,
    init_unet: Path | None,
) -> dict:
    """`train_and_measure`'s work, with the run folder locked."""
    result_file = run_dir / "result.json"
    settings = run_settings(budget, init_unet)
    if result_file.is_file():
        return cached_result(result_file, settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "benchmark.log"
    start = time.time()
    run_command(train_command(variant, seed, budget, run_dir, init_unet), log, threads)
    train_seconds = time.time() - start
    # Each sitting that trained this run logged its training command once; with several, the training's whole wall
    # time is unknown (an interruption records no end), so it is recorded only for runs trained in one sitting.
    sittings = sum(line.startswith("$ ") and "train_ddpm.py" in line for line in log.read_text().splitlines())
    model = run_dir / "model"
    trained_from = json.loads((model / "training_config.json").read_text())["init_unet_sha256"]
    if trained_from != settings.get("init_unet_sha256"):
        raise SystemExit(
            f"quality.py: error: {model} was trained from {trained_from}, not the base run's model"
        )
    measure = [
        sys.executable, "-m", "dia_diffusion.commands.cli", "fid", "--real", str(reference), "--fake", str(model),
        "--feature", "classifier", "--num_samples", str(budget.samples), "--scheduler", "ddim",
        "--num_inference_steps", str(budget.ddim_steps), "--seed", "0", "--json",
    ]  # fmt: skip
    guidance = guidance_scale(budget)
    if guidance is not None:
        measure += ["--guidance_scale", str(guidance)]
    run_command(measure, log, threads, stdout=run_dir / "fd.json")
    fd = json.loads((run_dir / "fd.json").read_text())
    metrics = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    result = {
        "variant": variant,
        "seed": seed,
        "fd_classifier": fd["fd_classifier"],
        "fd_record": fd,
        "parameters": count_parameters(load_pipeline(model, "ddpm").unet),
        "unet_class": json.loads((model / "unet" / "config.json").read_text())["_class_name"],
        "unet_sha256": folder_weights_sha256(model / "unet"),
        "settings": settings,
        "train_sittings": sittings,
        "train_seconds": train_seconds if sittings == 1 else None,
        "fd_vs_step": [(row["step"], row["fd_classifier"]) for row in metrics if "fd_classifier" in row],
        "first_logged_loss": next((row["step"], row["loss"]) for row in metrics if "loss" in row),
    }
    if guidance is not None:
        result["class_accuracy"] = fd["fake"]["class_accuracy"]
    if init_unet is not None:
        result["init_unet"] = str(init_unet)
    if budget.heldout_images:
        heldout = [
            sys.executable, "-m", "dia_diffusion.commands.cli", "heldout-loss", "--model", str(model),
            "--dataset", budget.dataset, "--split", "test", "--num_images", str(budget.heldout_images),
            "--seed", "0",
        ]  # fmt: skip
        run_command(heldout, log, threads, stdout=run_dir / "heldout.json")
        result["heldout"] = json.loads((run_dir / "heldout.json").read_text())
    write_atomically(result_file, lambda partial: partial.write_text(json.dumps(result, indent=1)))
    return result


def run_settings(budget: Budget, init_unet: Path | None) -> dict:
    """What a run of `budget` is trained and measured with, as result.json holds it."""
    settings = {
        key: value for key, value in dataclasses.asdict(budget).items() if key not in RESULT_NEUTRAL_FIELDS
    }
    if init_unet is not None:
        # The base run's own record of its weights, so the check needs no model files (a fresh checkout has none).
        settings["init_unet_sha256"] = json.loads((init_unet.parent / "result.json").read_text())[
            "unet_sha256"
        ]
    return json.loads(json.dumps(settings))


def cached_result(result_file: Path, settings: dict) -> dict:
    """A finished run's result, refused if it was trained or measured with other settings than `settings`."""
    result = json.loads(result_file.read_text())
    # The `cpu` and `digits` budgets' results predate the record; their settings are those of the docs' tables.
    recorded = result.get("settings", settings)
    differing = sorted(
        key for key in settings.keys() | recorded.keys() if settings.get(key) != recorded.get(key)
    )
    if differing:
        raise SystemExit(
            f"quality.py: error: {result_file.parent} was run with other settings ({', '.join(differing)}) than "
            "this budget's; move it away to run it again"
        )
    return result


def run_pilot(budget: Budget, out: Path, threads: int | None) -> None:
    """Stock at seed 0 for `pilot_steps`, FD every `pilot_eval_every` steps: the curve the step count comes from."""
    if not budget.pilot_steps:
        raise SystemExit("quality.py: error: this budget has no pilot (pilot_steps is 0)")
    pilot = dataclasses.replace(budget, steps=budget.pilot_steps, eval_every=budget.pilot_eval_every)
    result = train_and_measure(
        "stock", 0, pilot, out / "stock" / "seed-0", reference_statistics(pilot, out), threads
    )
    draw_fd_vs_step([result], ["stock"], out / "fd_vs_step.png")
    seconds = result.get("train_seconds")
    seconds_per_step = seconds / pilot.steps if seconds is not None else None
    summary = {
        "budget": dataclasses.asdict(pilot),
        "fd_vs_step": result["fd_vs_step"],
        "seconds_per_step": seconds_per_step,
    }
    (out / "pilot.json").write_text(json.dumps(summary, indent=1))
    timing = (
        f"{seconds_per_step:.3f} s per step including evaluations"
        if seconds_per_step is not None
        else f"trained in {result['train_sittings']} sittings, so its time per step is unknown"
    )
    print(f"pilot: stock, seed 0, {pilot.steps} steps, {timing}")
    for step, fd in result["fd_vs_step"]:
        print(f"  step {step:>7}: FD (classifier features) {fd:.3f}")


def retrofit_starting_points(
    budget: Budget, seeds: list[int], base_out: Path, jobs: int, threads: int | None
) -> dict[int, Path]:
    """Each seed's stock model of the retrofit's base budget (trained there first if missing), by seed."""
    base_budget = dataclasses.replace(BUDGETS[budget.base], dataset=budget.dataset)
    base_reference = reference_statistics(base_budget, base_out)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda seed: train_and_measure(
            "stock", seed, base_budget, base_out / "stock" / f"seed-{seed}", base_reference, threads), seeds))  # fmt: skip
    return {seed: base_out / "stock" / f"seed-{seed}" / "model" for seed in seeds}


def train_all(
    runs: list[tuple[str, int]],
    budget: Budget,
    out: Path,
    jobs: int,
    threads: int | None,
    initial: dict[int, Path],
) -> list[dict]:
    """Every (variant, seed) run, `jobs` at a time, each printed as it finishes; cached runs come back at once."""
    reference = reference_statistics(budget, out)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = [
            pool.submit(
                train_and_measure,
                variant,
                seed,
                budget,
                out / variant / f"seed-{seed}",
                reference,
                threads,
                initial.get(seed),
            )
            for variant, seed in runs
        ]
        results = []
        for finished in as_completed(pending):
            result = finished.result()
            results.append(result)
            print(
                f"{result['variant']:<24} seed {result['seed']}: FD (classifier features) {result['fd_classifier']:.3f}",
                flush=True,
            )
    return results


def write_summary(results: list[dict], budget: Budget, name: str, out: Path) -> str:
    """summary.json, summary.md, the FD-vs-step figure and the sample grids of a comparison; returns the table."""
    rows = summarise(results)
    summary = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "budget": {"name": name, **dataclasses.asdict(budget)},
        "dataset": budget.dataset,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": rows,
    }
    write_atomically(out / "summary.json", lambda partial: partial.write_text(json.dumps(summary, indent=1)))
    markdown = table(rows, budget, name)
    write_atomically(out / "summary.md", lambda partial: partial.write_text(markdown))
    draw_fd_vs_step(results, list(VARIANTS), out / "fd_vs_step.png")
    draw_sample_grids(results, list(VARIANTS), out, out / "samples.png")
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=None, help="default: the budget's"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the budget's")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once on a CPU machine, each with cores/jobs threads",
    )
    parser.add_argument(
        "--dataset", default=None, help="train and measure on this dataset spec instead of the budget's own"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/quality-<budget>)"
    )
    parser.add_argument(
        "--base_out", default=None, help="a retrofit budget's base comparison (default: that budget's folder)"
    )
    parser.add_argument(
        "--pilot", action="store_true", help="train stock at seed 0 long, for the FD-vs-step curve"
    )
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    budget = BUDGETS[args.budget]
    if args.dataset:
        budget = dataclasses.replace(budget, dataset=args.dataset)
    out = Path(args.out or REPOSITORY / "benchmarks" / "results" / f"quality-{args.budget}")
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    if args.pilot:
        run_pilot(budget, out / "pilot", threads)
        return
    variants = args.variants or list(budget.variants)
    if "stock" not in variants:
        parser.error("--variants must include stock: every variant is compared with stock at the same seed")
    seeds = args.seeds or list(budget.seeds)

    initial = {}
    if budget.base is not None:
        base_out = Path(args.base_out or REPOSITORY / "benchmarks" / "results" / f"quality-{budget.base}")
        initial = retrofit_starting_points(budget, seeds, base_out, args.jobs, threads)
    # Seed-major order: an interrupted comparison still has every variant at some seeds.
    runs = [(variant, seed) for seed in seeds for variant in variants]
    results = train_all(runs, budget, out, args.jobs, threads, initial)
    unchecked = check_paired_starts(results) if budget.base is not None else []
    if unchecked:
        print(f"\npaired start not checked (recorded without first_logged_loss): {', '.join(unchecked)}")
    print("\n" + write_summary(results, budget, args.budget, out))


if __name__ == "__main__":
    main()
