"""What DIA costs: stock UNet2DModel vs DIA variants of the same config, measured in one process, interleaved.

    python benchmarks/cost.py --quick          # small config, < 1 minute on 2 CPU cores
    python benchmarks/cost.py                  # the DDPM CIFAR-10 config (35.7 M parameters)
    python benchmarks/cost.py --device cuda --dtype bfloat16 --compile --channels_last   # on a GPU

Every variant is timed once per round, in an order that reverses from round to round, and the rounds repeat, so
drifts in machine load hit all variants alike. The report gives medians over rounds and, for the training step, the
spread of the per-round ratios to the stock UNet (median, quartiles, min-max): each round's ratio compares steps taken
seconds apart. On the CPU the step is also timed in process CPU seconds, which a machine shared with other jobs
disturbs less than wall time. Memory is the CUDA peak on a GPU; on the CPU it is the bytes of activations saved for
the backward pass (the part of training memory that attention changes).
The last line printed is one JSON object of ratios.
"""

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.commands.params import count_parameters, preset_unet_config

DDPM_CIFAR10 = preset_unet_config("cifar10-ddpm")
QUICK = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
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


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = QUICK if args.quick else DDPM_CIFAR10
    size = config["sample_size"]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(args.batch_size, 3, size, size, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(device)
    if args.channels_last:
        batch = batch.to(memory_format=torch.channels_last)

    models, optimizers, step_times, step_cpu_times, sample_rates, results = {}, {}, {}, {}, {}, {}
    for variant in args.variants:
        model, _ = build(variant, config, device, dtype, args.channels_last)
        models[variant] = torch.compile(model) if args.compile else model
        optimizers[variant] = torch.optim.AdamW(model.parameters(), lr=1e-4)
        results[variant] = {"parameters": count_parameters(model)}
        step_times[variant], step_cpu_times[variant], sample_rates[variant] = [], [], []
        for _ in range(args.warmup):
            train_step(models[variant], optimizers[variant], batch, timesteps, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            train_step(models[variant], optimizers[variant], batch, timesteps, dtype)
            results[variant]["memory_bytes"] = torch.cuda.max_memory_allocated()
        else:
            results[variant]["memory_bytes"] = saved_activation_bytes(model, batch, timesteps, dtype)

    for round_index in range(args.rounds):
        for variant in args.variants if round_index % 2 == 0 else args.variants[::-1]:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(models[variant], optimizers[variant], batch, timesteps, dtype)
            synchronize(device)
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
    return results


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
    parser.add_argument("--quick", action="store_true", help="small config, under a minute on 2 CPU cores")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
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
    args.rounds = args.rounds or (20 if args.quick else 10)
    if args.sampling_rounds is None:
        args.sampling_rounds = 3 if args.quick else 2
    torch.backends.cudnn.benchmark = on_gpu
    if args.threads:
        torch.set_num_threads(args.threads)

    results = measure(args)
    machine = (
        torch.cuda.get_device_name()
        if on_gpu
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"machine: {machine}; torch {torch.__version__}; config: {'quick' if args.quick else 'ddpm-cifar10'}; "
        f"batch {args.batch_size}; dtype {args.dtype}; compile {args.compile}; channels_last {args.channels_last}"
    )
    memory_label = "peak MB" if on_gpu else "saved-act MB"
    print(
        f"{'variant':<20}{'params':>12}{'step ms':>10}{memory_label:>14}{'DDIM img/s':>12}  step ratio per round"
    )
    summary = {"machine": machine, "args": vars(args), "results": results, "ratios": ratios(results)}
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
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(summary, handle, indent=2)
    print(json.dumps(summary["ratios"]))


if __name__ == "__main__":
    main()
