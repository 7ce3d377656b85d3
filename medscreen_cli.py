"""The ``medscreen`` command: one subcommand per job, composed from the three packages."""

import logging
import os
import signal
import sys

import typer

from datasets.cli import app as datasets_app
from datasets.download import TrackingServerError
from serving.audit_cli import audit_app, keys_app
from serving.cli import predict_command, serve_command
from training.cli import evaluate_command, export_command, train_command
from training.models_cli import app as models_app
from training.runs_cli import app as runs_app

# The embedded store announces its schema migrations on first use; an error must stay one line.
for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
# Artifacts here are small files; a bar per download would push an error line out of sight.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

app = typer.Typer(
    help="medscreen: train, track, export, register and serve medical screening models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(datasets_app, name="datasets")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.command("train")(train_command)
app.command("export")(export_command)
app.command("evaluate")(evaluate_command)
app.command("serve")(serve_command)
app.command("predict")(predict_command)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C is, so that every ``with`` and ``finally`` runs.

    Not a ``KeyboardInterrupt``: Lightning turns that into exit code 1 during training.
    """


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main() -> None:
    """The ``medscreen`` command: click's own usage errors are one line, as every other error."""
    # Killed by default, a command left its MLflow run RUNNING for good and a partial download
    # on disk; unwound, the run is marked FAILED and the partial file removed. (``serve``
    # replaces this process with BentoML's, which resets the handler.)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = app(standalone_mode=False, prog_name="medscreen")
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C: one line, as click's own handling gave
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Terminated:
        typer.echo("terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
    except SystemExit as leaving:
        # Lightning answers Ctrl-C during training with its own exit code 1, after cleaning up.
        if isinstance(leaving.__context__, KeyboardInterrupt):
            typer.echo("aborted", err=True)
            sys.exit(130)
        raise
    except TrackingServerError as error:  # any command that reads or writes the tracking store
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except typer.exceptions.TyperException as error:  # click's usage errors, as typer bundles it
        if type(error).__name__ == "NoArgsIsHelpError":
            sys.exit(2)  # the help has been shown
        # A bad or missing option or argument: the message names it.
        typer.echo(f"error: {error.format_message()}", err=True)
        sys.exit(getattr(error, "exit_code", 2))
    if code == 130:  # typer turns Ctrl-C into exit code 130 itself, silently
        typer.echo("aborted", err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
