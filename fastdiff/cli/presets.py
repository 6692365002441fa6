"""``fastdiff presets``: the named models and their guided-diffusion flags (printed by rank 0
alone under torchrun; every rank checks NAME)."""

from __future__ import annotations

import click


@click.command("presets")
@click.argument("name", required=False)
def presets_command(name):
    """List the model presets, or print one preset's flags as a guided-diffusion flag string."""
    from fastdiff import distributed  # torch: not for --help
    from fastdiff.models.flags import flags_of, format_flags
    from fastdiff.models.presets import PRESETS, get_preset

    try:
        p = None if name is None else get_preset(name)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if distributed.launched_rank() != 0:  # one listing per job, not one per rank
        return
    if p is not None:
        click.echo(format_flags(flags_of(p.net, p.process)))
        return
    width = max(map(len, PRESETS))
    for p in PRESETS.values():
        click.echo(f"{p.name:<{width}}  {p.kind:<10}  {p.description}")
