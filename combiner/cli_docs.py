"""Write docs/configuration.md from the CLI itself: `python -m combiner.cli_docs`.

tests/test_docs.py regenerates it and fails when the committed file differs, so the
configuration reference always says what `--help` says.
"""

from __future__ import annotations

import pathlib
import sys

import click

from combiner.cli import main

HEADER = """# Configuration reference

Generated from the CLI by `python -m combiner.cli_docs` (a test keeps it in sync).
Every flag also reads the environment variable shown (`COMBINER_<FLAG>`).
"""


def _commands(group: click.Group, path: list[str]):
    for name in sorted(group.commands):
        cmd = group.commands[name]
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, [*path, name])
        else:
            yield [*path, name], cmd


def render() -> str:
    out = [HEADER]
    for path, cmd in _commands(main, ["combiner"]):
        ctx = click.Context(cmd, info_name=" ".join(path))
        out.append(f"\n## `{' '.join(path)}`\n")
        out.append(" ".join((cmd.help or "").split()) + "\n")
        args = [p for p in cmd.params if isinstance(p, click.Argument)]
        if args:
            out.append("Arguments: " + ", ".join(f"`{a.human_readable_name}`" for a in args) + "\n")
        out.append("\n| flag | env | default | meaning |\n|---|---|---|---|")
        for param in cmd.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            flags = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
            env = f"`{param.envvar}`" if isinstance(param.envvar, str) else ""
            default = param.get_default(ctx, call=True)
            if param.required:
                shown = "required"
            elif default in (None, "") or type(default).__name__ == "Sentinel":
                shown = ""
            else:
                shown = f"`{default}`"
            help_text = " ".join((param.help or "").split()).replace("|", "\\|")
            out.append(f"| {flags} | {env} | {shown} | {help_text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else None
    text = render()
    if target:
        target.write_text(text)
    else:
        sys.stdout.write(text)
