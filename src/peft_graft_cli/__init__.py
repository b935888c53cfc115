"""The ``peft-graft`` command line.

It lives beside `peft_graft`, not inside it: importing anything under `peft_graft` runs its ``__init__``, which
registers the tuner with PEFT and so imports torch (seconds). Here ``peft-graft --help`` and ``--version`` import
click alone; a command imports what it needs when it is chosen.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import click

# name -> (builder in .commands, one-line help): the group lists these without importing any command
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("extract", "Compress a fine-tune's delta against its base into a SkillPack."),
    "inspect": ("inspect", "Show what a pack or router folder holds: sizes, forms, ranks and bits by role."),
    "eval": ("evaluate", "Compare base, fine-tune and packs on the same questions or texts."),
    "push": ("push", "Upload a pack or router folder to the Hub, with its model card."),
    "pull": ("pull", "Download a pack or router from the Hub into a folder."),
    "export": ("export", "Write packs for other engines: a PEFT LoRA, vLLM's LoRA set, or a GGUF LoRA."),
    "serve": ("serve", "Serve packs through an OpenAI-compatible API (model: a pack, the base, or 'auto')."),
    "merge": ("merge", "Add several packs' deltas into one static model (sum, mean or TIES), no router."),
    "transfer": ("transfer", "Teach a target model another model's skill, then pack it."),
}


@dataclass
class Settings:
    """The global flags, for the commands (``click.get_current_context().obj``) and for :func:`main`."""

    quiet: bool = False
    debug: bool = False


class _LazyGroup(click.Group):
    """Commands are built on first use: listing them (``--help``) imports nothing."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        from . import commands

        return getattr(commands, COMMANDS[name][0])()

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_text) for name, (_, help_text) in COMMANDS.items()])


_settings = Settings()
# --quiet: no progress bars, no transformers notes (tqdm and transformers read these when first imported, which the
# commands do after the group has set them)
_QUIET_ENVIRONMENT = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="peft-graft", prog_name="peft-graft", message="%(prog)s %(version)s")
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    callback=lambda context, parameter, quiet: _be_quiet(quiet),
    help="Print only results and errors: no progress bars, notes or library warnings.",
)
@click.option("--debug", is_flag=True, help="On an error, show the full traceback.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """GraftLLM SkillPacks for Hugging Face PEFT: compress a fine-tune into a pack, inspect, evaluate, share,
    export and serve packs.

    In Python, `import peft_graft` first, then use the usual PEFT calls (PeftModel.from_pretrained(base, pack)).
    """
    _settings.quiet, _settings.debug = quiet, debug
    ctx.obj = _settings


def _be_quiet(quiet: bool) -> bool:
    """--quiet, applied as soon as it is parsed: before a command is built (which imports torch and transformers,
    whose import-time warnings it silences too). Errors still show."""
    if quiet:
        os.environ.update(_QUIET_ENVIRONMENT)
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
    return quiet


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (``sys.argv[1:]`` when None) and return its exit status: 0 on success, 2 for
    a usage error or an error peft-graft explains (one line on stderr), 1 for anything unexpected, 130 when
    interrupted. ``--debug`` raises instead, with the traceback."""
    global _settings
    _settings = Settings()
    saved_environment = {name: os.environ.get(name) for name in _QUIET_ENVIRONMENT}
    saved_warnings, saved_logging = warnings.filters[:], logging.root.manager.disable
    try:
        # standalone_mode=False: errors come back here (one line each), --help / --version return their status
        status = cli.main(
            args=list(sys.argv[1:] if argv is None else argv), prog_name="peft-graft", standalone_mode=False
        )
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:  # a usage error: one line, and where the help is
        context = getattr(error, "ctx", None)
        hint = f" (see {context.command_path} --help)" if context is not None else ""
        click.echo(f"peft-graft: error: {one_line(error.format_message())}{hint}", err=True)
        return error.exit_code
    except (KeyboardInterrupt, click.Abort):
        if _settings.debug:
            raise
        click.echo("peft-graft: interrupted", err=True)
        return 130
    except Exception as error:
        if _settings.debug:
            raise
        explained = _is_explained(error)
        hint = "" if explained else " (an unexpected error: --debug shows the traceback)"
        click.echo(f"peft-graft: error: {one_line(error)}{hint}", err=True)
        return 2 if explained else 1
    finally:  # --quiet's settings end with the command (main may run many times in one process)
        warnings.filters[:] = saved_warnings
        logging.disable(saved_logging)
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return status if isinstance(status, int) else 0


def _is_explained(error: BaseException) -> bool:
    """A GraftError (whose message says what to do), a missing extra, or the OS refusing a file operation."""
    errors = sys.modules.get("peft_graft.errors")  # imported by any command that can raise one
    return isinstance(error, OSError) or (errors is not None and isinstance(error, errors.GraftError))


def one_line(error: BaseException | str) -> str:
    """The error as one line, with what to do where the OS refused a write (no space, read-only, no permission)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENOTDIR):
        text += " (check that the output folder's disk is writable and has room; --debug shows where)"
    return text
