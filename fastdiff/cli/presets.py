"""``fastdiff presets``: the named models and their guided-diffusion flags."""

from __future__ import annotations

import click

from fastdiff.models.flags import flags_of, format_flags
from fastdiff.models.presets import PRESETS, get_preset


@click.command("presets")
@click.argument("name", required=False)
def presets_command(name):
    """List the model presets, or print one preset's flags as a guided-diffusion flag string."""
    if name is None:
        width = max(map(len, PRESETS))
        for p in PRESETS.values():
            click.echo(f"{p.name:<{width}}  {p.kind:<10}  {p.description}")
        return
    try:
        p = get_preset(name)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_flags(flags_of(p.net, p.process)))
