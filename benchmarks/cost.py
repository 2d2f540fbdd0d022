"""What DIA costs: stock UNet2DModel vs DIA variants of the same config, measured in one process, interleaved.

    python benchmarks/cost.py --quick          # small config, < 1 minute on 2 CPU cores
    python benchmarks/cost.py                  # the DDPM CIFAR-10 config (35.7 M parameters)
    python benchmarks/cost.py --dtype float32 bfloat16 # also the achieved FLOP/s in fp32 and under bf16 autocast
    python benchmarks/cost.py --layout fmnist16 --batch_size 32   # the 16x16 Fashion-MNIST layout of quality.py
    python benchmarks/cost.py --device cuda --dtype bfloat16 --compile --channels_last   # on a GPU

Every variant is timed once per round, in an order that reverses from round to round, and the rounds repeat, so
drifts in machine load hit all variants alike. The report gives medians over rounds and, for the training step, the
spread of the per-round ratios to the stock UNet (median, quartiles, min-max): each round's ratio compares steps taken
seconds apart. On the CPU the step is also timed in process CPU seconds, which a machine shared with other jobs
disturbs less than wall time. Memory is the CUDA peak on a GPU; on the CPU it is the bytes of activations saved for
the backward pass (the part of training memory that attention changes).

How close a step comes to what the machine can do: torch's FLOP counter counts one train step's FLOPs (forward and
backward), and every round also times a square matmul of each dtype measured, with the same threads; a variant's
achieved FLOP/s divided by that matmul's is the fraction of the limit it reaches. With several `--dtype`s each is
timed in every round (autocast for bfloat16/float16, as `--mixed_precision` trains), and the speed-up over float32
is reported per round. The first dtype is the one of the memory, sampling and ratio columns.
The last line printed is one JSON object of ratios.
"""

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.commands.params import preset_unet_config
from dia_diffusion.models.model_facts import count_parameters
from dia_diffusion.training.presets import PRESETS, unet_arguments

DDPM_CIFAR10 = preset_unet_config("cifar10-ddpm")
QUICK = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
LAYOUTS = {
    "ddpm-cifar10": DDPM_CIFAR10,
    # quality.py's fmnist16 budget: the fmnist-32 preset's UNet at 16x16, grey.
    "fmnist16": unet_arguments(PRESETS["fmnist-32"].settings["unet_config"], 16, 1),
    "quick": QUICK,
}
VARIANTS = {
    "stock": None,
    "dia_lstm/global": dict(dia_attention="dia_lstm", dia_sharing="global"),
    "dia_lstm/per_width": dict(dia_attention="dia_lstm", dia_sharing="per_width"),
    "se_shared/global": dict(dia_attention="se_shared", dia_sharing="global"),
    "se_per_layer": dict(dia_attention="se_per_layer"),
}


def build(variant: str, config: dict, device: torch.device, dtype: torch.dtype, channels_last: bool):
    torch.manual_seed(0)
    options = VARIANTS[variant]
    model = UNet2DModel(**config) if options is None else DIAUNet2DModel(**config, **options)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, dtype


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, optimizer, batch, timesteps, dtype) -> None:
    with torch.autocast(batch.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = torch.nn.functional.mse_loss(model(batch, timesteps).sample.float(), batch.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step_flops(model, batch, timesteps) -> int:
    """FLOPs of one train step's forward and backward, by torch's FLOP counter (the optimizer's elementwise update
    is not counted; it is a small part of the step)."""
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.mse_loss(model(batch, timesteps).sample.float(), batch.float()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_seconds(size: int, dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """Median time of one `size` x `size` matmul in `dtype`: what this machine's threads reach on the densest work."""
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    left @ right
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        left @ right
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_activation_bytes(model, batch, timesteps, dtype) -> int:
    """Bytes of every tensor autograd saves for backward during one forward pass."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    autocast = torch.autocast(batch.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(batch, timesteps).sample.float().mean().backward()
    model.zero_grad(set_to_none=True)
    return total


def measure(args) -> tuple[dict, dict]:
    """The primary dtype's results per variant, and per dtype: the matmul's and every variant's step times."""
    device = torch.device(args.device)
    dtypes = {name: getattr(torch, name) for name in args.dtype}
    dtype = dtypes[args.dtype[0]]
    config = LAYOUTS[args.layout]
    size = config["sample_size"]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(args.batch_size, config.get("in_channels", 3), size, size, generator=generator).to(
        device
    )
    timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(device)
    if args.channels_last:
        batch = batch.to(memory_format=torch.channels_last)

    models, optimizers, step_times, step_cpu_times, sample_rates, results = {}, {}, {}, {}, {}, {}
    for variant in args.variants:
        model, _ = build(variant, config, device, dtype, args.channels_last)
        models[variant] = torch.compile(model) if args.compile else model
        optimizers[variant] = torch.optim.AdamW(model.parameters(), lr=1e-4)
        results[variant] = {"parameters": count_parameters(model)}
        results[variant]["train_step_flops"] = train_step_flops(model, batch, timesteps)
        step_times[variant], step_cpu_times[variant], sample_rates[variant] = [], [], []
        for other in dtypes.values():
            for _ in range(args.warmup):
                train_step(models[variant], optimizers[variant], batch, timesteps, other)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            train_step(models[variant], optimizers[variant], batch, timesteps, dtype)
            results[variant]["memory_bytes"] = torch.cuda.max_memory_allocated()
        else:
            results[variant]["memory_bytes"] = saved_activation_bytes(model, batch, timesteps, dtype)

    precisions = {
        name: {"matmul_rounds_s": [], "train_step_rounds_s": {v: [] for v in args.variants}}
        for name in dtypes
    }
    for round_index in range(args.rounds):
        for name, other in dtypes.items():
            precisions[name]["matmul_rounds_s"].append(matmul_seconds(args.matmul_size, other, device))
            for variant in args.variants if round_index % 2 == 0 else args.variants[::-1]:
                synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                train_step(models[variant], optimizers[variant], batch, timesteps, other)
                synchronize(device)
                precisions[name]["train_step_rounds_s"][variant].append(time.perf_counter() - start)
                if other == dtype:
                    step_times[variant].append(time.perf_counter() - start)
                    step_cpu_times[variant].append(time.process_time() - start_cpu)

    for _ in range(args.sampling_rounds):
        for variant in args.variants:
            pipeline = DDIMPipeline(unet=models[variant].eval(), scheduler=DDIMScheduler())
            pipeline.set_progress_bar_config(disable=True)
            synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                pipeline(
                    batch_size=args.sample_batch_size,
                    num_inference_steps=args.ddim_steps,
                    generator=torch.Generator(device).manual_seed(0),
                    output_type="np",
                )
            synchronize(device)
            sample_rates[variant].append(args.sample_batch_size / (time.perf_counter() - start))
            models[variant].train()

    for variant in args.variants:
        results[variant]["train_step_s"] = statistics.median(step_times[variant])
        results[variant]["train_step_rounds_s"] = step_times[variant]
        if device.type == "cpu":
            results[variant]["train_step_cpu_s"] = statistics.median(step_cpu_times[variant])
            results[variant]["train_step_rounds_cpu_s"] = step_cpu_times[variant]
        results[variant]["ddim_images_per_s"] = (
            statistics.median(sample_rates[variant]) if sample_rates[variant] else None
        )
    return results, flop_rates(results, precisions, args.matmul_size)


def flop_rates(results: dict, precisions: dict, matmul_size: int) -> dict:
    """Per dtype: the matmul's FLOP/s, and each variant's step time, achieved FLOP/s and fraction of the matmul's;
    with float32 among several dtypes, each other dtype's per-round speed-up over it."""
    table = {}
    for name, timings in precisions.items():
        matmul_rate = 2 * matmul_size**3 / statistics.median(timings["matmul_rounds_s"])
        table[name] = {"matmul_size": matmul_size, "matmul_flop_per_s": matmul_rate, "variants": {}}
        for variant, rounds in timings["train_step_rounds_s"].items():
            rate = results[variant]["train_step_flops"] / statistics.median(rounds)
            table[name]["variants"][variant] = {
                "train_step_s": statistics.median(rounds),
                "train_step_rounds_s": rounds,
                "train_step_flop_per_s": rate,
                "fraction_of_matmul": rate / matmul_rate,
            }
        table[name]["matmul_rounds_s"] = timings["matmul_rounds_s"]
    if "float32" in precisions:
        baseline = precisions["float32"]["train_step_rounds_s"]
        for name in set(precisions) - {"float32"}:
            for variant, rounds in precisions[name]["train_step_rounds_s"].items():
                table[name]["variants"][variant]["speedup_over_float32_per_round"] = spread(
                    [fp32 / mine for fp32, mine in zip(baseline[variant], rounds)]
                )
    return table


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and range of a sample (the quartiles of one value are that value)."""
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {
        "median": quartiles[1],
        "q1": quartiles[0],
        "q3": quartiles[2],
        "min": min(values),
        "max": max(values),
    }


def ratios(results: dict) -> dict:
    stock = results["stock"]
    table = {}
    for variant, row in results.items():
        if variant == "stock":
            continue
        table[variant] = {
            "parameters": row["parameters"] / stock["parameters"],
            "train_step_time": row["train_step_s"] / stock["train_step_s"],
            "memory": row["memory_bytes"] / stock["memory_bytes"],
            "ddim_throughput": row["ddim_images_per_s"] / stock["ddim_images_per_s"]
            if stock["ddim_images_per_s"]
            else None,
        }
        for clock in ("", "_cpu"):
            if f"train_step_rounds{clock}_s" in row:
                per_round = [
                    mine / theirs
                    for mine, theirs in zip(
                        row[f"train_step_rounds{clock}_s"], stock[f"train_step_rounds{clock}_s"]
                    )
                ]
                table[variant][f"train_step_time{clock}_per_round"] = spread(per_round)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="--layout quick: under a minute on 2 CPU cores")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="ddpm-cifar10", help="the UNet config")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16", "float16"],
        help="one or more; the first sets memory, sampling and ratios",
    )
    parser.add_argument(
        "--matmul_size",
        type=int,
        default=None,
        help="side of the reference matmul (default 2048; 8192 on a GPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's); 1 on a machine shared with other jobs",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="training batch (default 16; 128 on a GPU)"
    )
    parser.add_argument("--sample_batch_size", type=int, default=None)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="timed training steps per variant")
    parser.add_argument(
        "--sampling_rounds", type=int, default=None, help="timed DDIM runs per variant (0: no sampling)"
    )
    parser.add_argument("--json_out", default=None, help="also write the full results to this JSON file")
    args = parser.parse_args()
    if "stock" not in args.variants:
        parser.error("--variants must include stock: every ratio is relative to it")
    on_gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (128 if on_gpu else 16)
    args.sample_batch_size = args.sample_batch_size or (256 if on_gpu else 8)
    if args.quick:
        args.layout = "quick"
    args.matmul_size = args.matmul_size or (8192 if on_gpu else 2048)
    args.rounds = args.rounds or (20 if args.quick else 10)
    if args.sampling_rounds is None:
        args.sampling_rounds = 3 if args.quick else 2
    torch.backends.cudnn.benchmark = on_gpu
    if args.threads:
        torch.set_num_threads(args.threads)

    results, precisions = measure(args)
    primary = precisions[args.dtype[0]]
    for variant, row in results.items():
        row["train_step_flop_per_s"] = primary["variants"][variant]["train_step_flop_per_s"]
        row["fraction_of_matmul"] = primary["variants"][variant]["fraction_of_matmul"]
    machine = (
        torch.cuda.get_device_name()
        if on_gpu
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"machine: {machine}; torch {torch.__version__}; config: {args.layout}; "
        f"batch {args.batch_size}; dtype {', '.join(args.dtype)}; compile {args.compile}; channels_last {args.channels_last}"
    )
    memory_label = "peak MB" if on_gpu else "saved-act MB"
    print(
        f"{'variant':<20}{'params':>12}{'step ms':>10}{memory_label:>14}{'DDIM img/s':>12}  step ratio per round"
    )
    summary = {
        "machine": machine,
        "args": vars(args),
        "results": results,
        "ratios": ratios(results),
        "precisions": precisions,
    }
    for variant, row in results.items():
        per_round = [
            f"{clock} {r['median']:.3f} (IQR {r['q1']:.3f}-{r['q3']:.3f}, range {r['min']:.3f}-{r['max']:.3f})"
            for clock, key in (
                ("wall", "train_step_time_per_round"),
                ("CPU", "train_step_time_cpu_per_round"),
            )
            if (r := summary["ratios"].get(variant, {}).get(key))
        ]
        print(
            f"{variant:<20}{row['parameters']:>12,}{1000 * row['train_step_s']:>10.1f}"
            f"{row['memory_bytes'] / 2**20:>14.1f}{row['ddim_images_per_s'] or float('nan'):>12.2f}"
            f"  {'; '.join(per_round)}"
        )
    print_flop_rates(precisions)
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(summary, handle, indent=2)
    print(json.dumps(summary["ratios"]))


def print_flop_rates(precisions: dict) -> None:
    print(
        f"{'dtype':<10}{'variant':<20}{'GFLOP/step':>12}{'step ms':>10}{'GFLOP/s':>10}{'of matmul':>11}  vs fp32"
    )
    for name, table in precisions.items():
        print(f"{name:<10}{'matmul':<20}{'':>12}{'':>10}{table['matmul_flop_per_s'] / 1e9:>10.1f}{1:>11.1%}")
        for variant, row in table["variants"].items():
            speedup = row.get("speedup_over_float32_per_round")
            print(
                f"{name:<10}{variant:<20}{row['train_step_flop_per_s'] * row['train_step_s'] / 1e9:>12.1f}"
                f"{1000 * row['train_step_s']:>10.1f}{row['train_step_flop_per_s'] / 1e9:>10.1f}"
                f"{row['fraction_of_matmul']:>11.1%}"
                + (
                    f"  {speedup['median']:.2f}x (IQR {speedup['q1']:.2f}-{speedup['q3']:.2f})"
                    if speedup
                    else ""
                )
            )


if __name__ == "__main__":
    main()
