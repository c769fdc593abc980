"""The `pbx` command: serve, check, --version (CONTRACT §1)."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import sys
from pathlib import Path

from pbx import __version__
from pbx.app import load_setup, serve
from pbx.config.model import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pbx", description="SIP/VoIP telephony server with IVR and queues")
    parser.add_argument("--version", action="version", version=f"pbx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the server in the foreground"), ("check", "validate the configuration")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", type=Path, default=Path("pbx.yaml"), help="path to pbx.yaml (default: ./pbx.yaml)")
    cmd_serve = sub.choices["serve"]
    cmd_serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)

    try:
        config, prompts, flows = load_setup(args.config)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 2 if args.command == "serve" else 1
    if args.command == "check":
        if config.sounds.tts and not prompts.tts_available():
            print(f"{args.config}: warning: sounds.tts is {config.sounds.tts}, which is not installed: say: prompts will be silent", file=sys.stderr)
        print(f"{args.config}: ok ({len(flows)} flows)")
        return 0

    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # systemd's watchdog ends a stuck server with SIGABRT (pbx.systemd): the
    # traceback of every thread then shows in the journal where the loop hung.
    faulthandler.enable()
    return asyncio.run(serve(config, prompts, flows))


if __name__ == "__main__":
    sys.exit(main())
