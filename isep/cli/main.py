"""isep: the umbrella command; `isep pack ...` is `isep-pack ...`."""
from __future__ import annotations

from . import demo, index, join, pack, partition, verify
from .common import new_app

COMMANDS = {"index": index, "partition": partition, "pack": pack, "verify": verify, "join": join,
            "demo": demo}

app = new_app("Split container image archives into base, lib and app parts, and join them back. "
              "Each subcommand is also installed as isep-<subcommand>; see isep <subcommand> --help.")
for name, module in COMMANDS.items():
    command = module.app.registered_commands[0]
    app.command(name, help=module.app.info.help)(command.callback)


def main() -> None:
    app(prog_name="isep")


if __name__ == "__main__":
    main()
