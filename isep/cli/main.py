"""isep: the umbrella command; `isep pack ...` is `isep-pack ...`."""
from __future__ import annotations

from . import demo, index, join, pack, partition, prune, push, verify
from .common import launch, new_app

COMMANDS = {"index": index, "partition": partition, "pack": pack, "verify": verify, "join": join,
            "prune": prune, "push": push, "demo": demo}

app = new_app("Split container image archives into base, lib and app parts, and join them back.",
              "Each subcommand is also installed as isep-<subcommand>; see isep <subcommand> --help.")
for name, module in COMMANDS.items():
    command = module.app.registered_commands[0]
    summary = (module.__doc__ or ":").split(":", 1)[1].strip()  # the module docstring's "isep-NAME: summary"
    app.command(name, help=command.help, epilog=command.epilog,
                short_help=summary[0].upper() + summary[1:])(command.callback)


def main() -> None:
    launch(app, "isep")


if __name__ == "__main__":
    main()
