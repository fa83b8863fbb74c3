"""The docs say what the code does."""

from __future__ import annotations

import pathlib

from click.testing import CliRunner

from combiner.cli import main
from combiner.cli_docs import _commands, render

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_configuration_reference_matches_the_cli():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == render(), (
        "docs/configuration.md is stale: python -m combiner.cli_docs docs/configuration.md"
    )


def test_every_command_has_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).exit_code == 0
    for path, _ in _commands(main, []):
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: " in result.output


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text().splitlines()
    block = readme[readme.index("```sh") + 1 : readme.index("```")]
    assert [line.split()[:2] for line in block] == [["make", "demo"], ["make", "test"]]
