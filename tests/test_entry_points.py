"""Ctrl-C while an entry point imports the package (seconds of torch and diffusers) ends as a Ctrl-C does later:
one line and exit status 130, no traceback, for the `dia-diffusion` console script, train/train_ddpm.py and
pipelines/sample.py. The interrupt is injected at the first `import torch`, so the test does not depend on timing."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs an entry point as `python <script>` would, with a KeyboardInterrupt raised where torch is first imported:
# what Python's SIGINT handler does when Ctrl-C arrives during that import.
INTERRUPTED_IMPORT = """
import runpy, sys

class CtrlCDuringTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlCDuringTorchImport())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

ENTRY_POINTS = {
    "dia-diffusion": [str(Path(sys.executable).parent / "dia-diffusion"), "params", "--preset", "demo"],
    "train_ddpm.py": [str(REPO_ROOT / "train" / "train_ddpm.py"), "--preset", "demo"],
    "sample.py": [str(REPO_ROOT / "pipelines" / "sample.py"), "--model", "runs/demo", "--output", "samples"],
}


@pytest.mark.parametrize("prog", list(ENTRY_POINTS))
def test_ctrl_c_while_an_entry_point_imports_is_one_line(prog, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_IMPORT, *ENTRY_POINTS[prog]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert (completed.returncode, completed.stderr) == (130, f"{prog}: interrupted\n")
    assert completed.stdout == ""
