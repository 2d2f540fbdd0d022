"""The evaluator the training script calls: the same number as `dia-diffusion fid`, the model left as it was, and
two processes that split the generation and both get the single-process result."""

import json
import os
import subprocess
import sys

import pytest
from fid_cli import fid_json, run_cli

from dia_diffusion.evaluation.pipeline_evaluator import PipelineEvaluator
from dia_diffusion.pipelines.sampling import load_pipeline


def test_evaluator_matches_the_fid_command_and_leaves_the_model_as_it_was(
    pipeline_folder, cache_dir, tmp_path, capsys
):
    evaluator = PipelineEvaluator(
        "digits", num_samples=16, num_inference_steps=2, seed=1, cache_dir=str(cache_dir)
    )
    pipeline = load_pipeline(pipeline_folder, "ddpm")
    pipeline.unet.train()
    result = evaluator(pipeline)
    assert list(result) == ["fd_classifier"] and result["fd_classifier"] > 0
    assert pipeline.unet.training
    assert evaluator(pipeline) == result
    assert evaluator.provenance["feature_extractor"]["accuracy"] > 0.9
    assert evaluator.provenance["generated"]["guidance_scale"] == 1.0

    # The same number from the command line: all 1500 training digits against the same 16 DDIM samples.
    reference = str(tmp_path / "digits.npz")
    common = ["--feature", "classifier", "--cache_dir", str(cache_dir)]
    assert run_cli(capsys, "ref", "digits", "--out", reference, "--num_samples", "1500", *common)[0] == 0
    sampling = ["--num_samples", "16", "--scheduler", "ddim", "--num_inference_steps", "2", "--seed", "1"]
    from_command = fid_json(capsys, "--real", reference, "--fake", str(pipeline_folder), *common, *sampling)
    assert result["fd_classifier"] == pytest.approx(from_command["fd_classifier"], rel=1e-9)


EVALUATE_ON_EVERY_PROCESS = """
import json, sys
from accelerate import Accelerator
from dia_diffusion.evaluation.pipeline_evaluator import PipelineEvaluator
from dia_diffusion.pipelines.sampling import load_pipeline

accelerator = Accelerator(cpu=True)
evaluator = PipelineEvaluator("digits", num_samples=9, num_inference_steps=2, cache_dir=sys.argv[2],
                              accelerator=accelerator)
result = evaluator(load_pipeline(sys.argv[1], "ddpm"))
with open(f"{sys.argv[3]}/rank-{accelerator.process_index}-of-{accelerator.num_processes}.json", "w") as file:
    json.dump(result, file)
# Both processes leave the process group together: a process that exits with gloo's threads still running can abort.
accelerator.end_training()
"""


@pytest.mark.slow
def test_two_processes_split_generation_and_both_get_the_single_process_result(
    pipeline_folder, cache_dir, tmp_path
):
    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE_ON_EVERY_PROCESS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [*command, str(script), str(pipeline_folder), str(cache_dir), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = [
        json.loads((tmp_path / f"rank-{rank}-of-2.json").read_text())["fd_classifier"] for rank in (0, 1)
    ]
    assert results[0] == results[1]

    single = PipelineEvaluator("digits", num_samples=9, num_inference_steps=2, cache_dir=str(cache_dir))
    assert results[0] == pytest.approx(
        single(load_pipeline(pipeline_folder, "ddpm"))["fd_classifier"], rel=1e-9
    )
