"""`r1deploy`: the Click group. Global options, the YAML config and error → exit-code mapping live here;
each command is a thin module in `exporter.commands` over a stage's library function."""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

import click

from .commands.common import App
from .core.errors import BadInput, R1DeployError, first_line
from .core.typed import read_yaml_mapping

# command name → module in exporter.commands (imported lazily: `r1deploy --help` stays fast)
COMMANDS = {
    "profiles": "profiles",
    "export": "export",
    "quantize": "quantize",
    "stream-build": "stream_build",
    "build-engine": "engine",
    "repository": "repository",
    "serve": "serve",
    "gateway": "gateway",
    "health": "health",
    "batch": "batch",
    "manifests": "manifests",
    "plan": "plan",
    "bench": "bench",
    "pipeline": "pipeline",
}

GLOBAL_KEYS = {"workdir", "profiles", "json", "verbose", "quiet"}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._module(name) is not None]

    def _module(self, name):
        try:
            return importlib.import_module(f"exporter.commands.{COMMANDS[name]}")
        except ModuleNotFoundError as exc:
            if exc.name == f"exporter.commands.{COMMANDS[name]}":
                return None
            raise

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = self._module(name)
        return module.command if module else None


def _load_config(path: Path, group: click.Group, ctx: click.Context) -> dict:
    data = read_yaml_mapping(path, "config file", "a mapping (global options and one section per command)")
    commands = set(group.list_commands(ctx))
    for key, value in data.items():
        if key in GLOBAL_KEYS:
            continue
        if key not in commands:
            raise BadInput(f"{path}: unknown key {key!r} (global options: {', '.join(sorted(GLOBAL_KEYS))}; commands: {', '.join(sorted(commands))})")
        if not isinstance(value, dict):
            raise BadInput(f"{path}: section {key!r} must be a mapping of option → value")
        cmd = group.get_command(ctx, key)
        known = {p.name for p in cmd.params if p.name}
        # accept option spellings with dashes or underscores
        for opt in value:
            if opt.replace("-", "_") not in known:
                raise BadInput(f"{path}: {key}.{opt} is not an option of `r1deploy {key}`")
    return data


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="pipeline.yaml: global options and one section per command; every option can be set there.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("build"), show_default=True, help="Where artifacts are written.")
@click.option("--profiles", "profiles_file", type=click.Path(path_type=Path), help="YAML file adding or overriding deployment profiles.")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable result on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Verbose logs and tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.version_option(package_name="r1deploy")
@click.pass_context
def cli(ctx: click.Context, config_path, workdir, profiles_file, as_json, verbose, quiet):
    """Take a DeepSeek-R1-family (or any Hugging Face) model from a checkpoint to deployable artifacts:
    ONNX, quantized ONNX, TensorRT engines, a Triton model repository and Kubernetes manifests."""
    app = ctx.ensure_object(App)
    app.verbose, app.quiet = verbose, quiet
    profile_overrides = {}
    if config_path is not None:
        data = _load_config(config_path, cli, ctx)
        src = ctx.get_parameter_source

        def from_yaml(param: str) -> bool:
            return src(param) in (click.core.ParameterSource.DEFAULT, None)

        if "workdir" in data and from_yaml("workdir"):
            if not isinstance(data["workdir"], str) or not data["workdir"]:
                raise BadInput(f"{config_path}: workdir must be a path (a string), got {data['workdir']!r}")
            workdir = Path(data["workdir"])
        if "profiles" in data:
            if isinstance(data["profiles"], dict):
                profile_overrides = data["profiles"]
            elif not isinstance(data["profiles"], str):
                raise BadInput(f"{config_path}: profiles must be a file path or a mapping of profiles, got {data['profiles']!r}")
            elif from_yaml("profiles_file"):
                profiles_file = Path(data["profiles"])
        for key in ("json", "verbose", "quiet"):
            if key in data and not isinstance(data[key], bool):
                raise BadInput(f"{config_path}: {key} must be true or false, got {data[key]!r}")
        as_json = as_json or bool(data.get("json", False))
        app.verbose = verbose or bool(data.get("verbose", False))
        app.quiet = quiet or bool(data.get("quiet", False))
        ctx.default_map = {
            k: {opt.replace("-", "_"): v for opt, v in section.items()}
            for k, section in data.items()
            if k not in GLOBAL_KEYS
        }
    app.workdir, app.as_json, app.profiles_file, app.profile_overrides = workdir, as_json, profiles_file, profile_overrides
    from .core import ui

    ui.configure(quiet=app.quiet or as_json, verbose=app.verbose)
    _state["verbose"] = app.verbose


_state = {"verbose": False}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _state["verbose"] = "-v" in argv or "--verbose" in argv
    try:
        cli.main(args=argv, prog_name="r1deploy", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        # one line, like every other error: what is wrong, and where the help is
        where = f"r1deploy {exc.ctx.command_path.split(' ', 1)[1]} --help" if exc.ctx and " " in exc.ctx.command_path else "r1deploy --help"
        click.echo(f"error: {' '.join(exc.format_message().split())} (see {where})", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except R1DeployError as exc:
        if _state["verbose"]:
            traceback.print_exc()
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug or an unexpected library failure: still one line unless -v
        if _state["verbose"]:
            traceback.print_exc()
        detail = first_line(exc, default="")
        click.echo(f"error: {type(exc).__name__}: {detail} (run with -v for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
