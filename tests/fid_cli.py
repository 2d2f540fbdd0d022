"""`dia-diffusion` run in-process by the fid tests: its exit status and outputs, and the one line an error reaches
the user as."""

import json

from dia_diffusion.commands.cli import main as cli_main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def the_error(err: str) -> str:
    """The one line an error reaches the user as (progress bars may share stderr; a traceback may not)."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("dia-diffusion ")]
    assert len(errors) == 1, err
    return errors[0]


def fid_json(capsys, *argv: str) -> dict:
    code, out, err = run_cli(capsys, "fid", "--json", *argv)
    assert code == 0, err
    return json.loads(out)


DIGITS_AGAINST_DIGITS = ("fid", "--real", "digits", "--fake", "digits", "--feature", "classifier")
