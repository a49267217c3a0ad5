"""The ``pipeline`` command.

Every command reports a failure the user can fix as one line on stderr and exits non-zero
(1 for a :class:`~pipeline.errors.PipelineError`, 2 for a usage error); ``--verbose`` adds the
traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from pipeline import __version__
from pipeline.errors import PipelineError


class _Group(click.Group):
    """Turns :class:`PipelineError` into a one-line message and exit status 1."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pipeline")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Out-of-core neural-network training on Dask.

    \b
    Typical session:
      pipeline ingest data/letter/letter-recognition.data letter.zarr --target 0
      pipeline inspect letter.zarr
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipeline`` console script; returns the exit status."""
    try:
        cli.main(args=argv, prog_name="pipeline", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
