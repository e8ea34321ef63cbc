"""The ``wove-adapters`` command: demo, config, runs, result, doctor, bench."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="wove-adapters")
def main() -> None:
    """Hand Python tasks to the job systems you already run, and get the results back."""


@main.command("config")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A wove_config.py or .toml file (default: discovered upwards from cwd).")
@click.option("--environment", default=None, help="Show only this environment.")
@click.option("--format", "fmt", type=click.Choice(["toml", "json"]), default="toml")
def config_cmd(config_file: str | None, environment: str | None, fmt: str) -> None:
    """Print the merged configuration and where every value came from."""
    from wove_adapters.core.config import load_config, render_config

    cfg = load_config(config_file=config_file)
    click.echo(render_config(cfg, environment=environment, fmt=fmt))
