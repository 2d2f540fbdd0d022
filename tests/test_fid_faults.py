"""What `fid` and `ref` do with damaged inputs and outputs: bad or cut statistics files, cached classifiers and
Inception weights cut short, an --out that cannot be written or that another `ref` writes, and Ctrl-C while
writing: one line naming the file and what to do, and the previous output left whole."""

from pathlib import Path

import numpy as np
import pytest
import torch
from fid_cli import DIGITS_AGAINST_DIGITS, run_cli, the_error

from dia_diffusion.evaluation import frechet
from dia_diffusion.evaluation.frechet import FeatureStatistics
from dia_diffusion.runtime.folder_lock import lock_output


def write_numpy_array(path: Path) -> None:
    with open(path, "wb") as file:
        np.save(file, np.zeros(3))


def write_cut_statistics(path: Path) -> None:
    FeatureStatistics.of(np.eye(3)).save(path, {})
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda path: path.write_text("not numbers"), "is not a feature statistics file"),
        (write_numpy_array, "is not a feature statistics file"),
        (lambda path: np.savez(path, mean=np.zeros(3)), "is not a feature statistics file"),
        (write_cut_statistics, "cannot read feature statistics"),
    ],
    ids=["text", "npy", "other npz", "cut short"],
)
def test_a_bad_statistics_file_is_named_in_one_line(tmp_path, capsys, write, message):
    statistics = tmp_path / "reference.npz"
    write(statistics)
    code, out, err = run_cli(
        capsys, "fid", "--real", str(statistics), "--fake", "digits", "--feature", "classifier"
    )
    assert code == 2 and out == ""
    assert message in the_error(err) and str(statistics) in the_error(err)


def test_ref_refuses_an_output_it_cannot_write_before_measuring(tmp_path, capsys):
    (tmp_path / "taken.npz").mkdir()
    (tmp_path / "a-file").write_text("")
    for out, message in (
        (tmp_path / "taken.npz", "is a folder"),
        (tmp_path / "a-file" / "ref.npz", "lies under"),
    ):
        code, _, err = run_cli(capsys, "ref", "digits", "--out", str(out), "--feature", "classifier")
        assert code == 2 and message in the_error(err)
        assert "real images" not in err  # refused before a single image was measured


def test_ctrl_c_while_ref_writes_leaves_the_previous_statistics(cache_dir, tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference.npz"
    argv = [
        "ref",
        "digits",
        "--out",
        str(reference),
        "--feature",
        "classifier",
        "--cache_dir",
        str(cache_dir),
    ]
    assert run_cli(capsys, *argv, "--num_samples", "20")[0] == 0
    before = reference.read_bytes()

    def interrupted_savez(path, **arrays):
        Path(path).write_bytes(b"PK half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(frechet.np, "savez", interrupted_savez)
    code, out, err = run_cli(capsys, *argv, "--num_samples", "30")
    assert code == 130, err[-500:]
    assert err.endswith("dia-diffusion ref: interrupted\n") and "Traceback" not in err
    assert reference.read_bytes() == before
    # No partial file left; the lock file beside the output stays (deleting it would race).
    assert sorted(path.name for path in tmp_path.iterdir()) == [".reference.npz.lock", "reference.npz"]


# Cut at 1000 bytes, torch fails inside the zip header (RuntimeError); at 5000, reading a record (OSError EINVAL).
@pytest.mark.parametrize("kept_bytes", [1000, 5000])
def test_a_damaged_cached_classifier_is_named_with_the_way_out(cache_dir, tmp_path, capsys, kept_bytes):
    cached = next((cache_dir / "classifiers").glob("digits-8-1.pt"))
    damaged = tmp_path / "classifiers" / cached.name
    damaged.parent.mkdir()
    damaged.write_bytes(cached.read_bytes()[:kept_bytes])
    code, out, err = run_cli(capsys, *DIGITS_AGAINST_DIGITS, "--cache_dir", str(tmp_path))
    assert code == 2 and out == "" and str(damaged) in the_error(err) and "delete it" in the_error(err)


def test_inception_weights_cut_short_are_named_with_the_way_out(tmp_path, capsys):
    weights = tmp_path / "partial-download.pth"
    torch.save({"weight": torch.zeros(100_000)}, weights)
    weights.write_bytes(weights.read_bytes()[:5000])
    argv = [*DIGITS_AGAINST_DIGITS[:-1], "inception", "--inception_weights", str(weights)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert str(weights) in the_error(err) and "download it again from https://" in the_error(err)


def test_a_second_ref_into_the_same_file_is_refused_before_measuring(tmp_path, capsys):
    reference = tmp_path / "reference.npz"
    holder = lock_output(reference.absolute(), "--out", "dia-diffusion ref")
    try:
        code, out, err = run_cli(capsys, "ref", "digits", "--out", str(reference), "--feature", "classifier")
    finally:
        holder.release()
    assert code == 2 and out == "" and "real images" not in err
    assert f"--out '{reference.absolute()}' is in use by another dia-diffusion ref" in the_error(err)
    assert not reference.exists()
