"""``dicomnode serve``: run the node until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging

from dicomnode.cli.common import settings_from
from dicomnode.cli.config import add_config_argument
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.errors import ConfigError
from dicomnode.model_location import model_path_error


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the node (SCP, synthesis workers, delivery, operator console)",
        description=(
            "Run the node: receive (C-STORE), synthesise, deliver, and serve the operator console ([http]). "
            "Stops cleanly on SIGTERM/SIGINT."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument("--ae-title", "-aet", help="override node.ae_title")
    p.add_argument("--port", type=int, help="override node.port")
    p.add_argument("--bind-address", help="override node.bind_address")
    p.add_argument("--http-port", type=int, help="override http.port (the operator console)")
    p.add_argument("--worker-grace", type=float, default=60.0, help="seconds a worker may finish its job at stop")
    p.add_argument(
        "--role",
        choices=["all", "edge", "worker"],
        help="override node.role: all = everything; edge = SCP, intake, delivery; worker = synthesis only",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicomnode.node import Node

    settings = settings_from(
        args,
        **{
            "node.ae_title": args.ae_title,
            "node.port": args.port,
            "node.bind_address": args.bind_address,
            "http.port": args.http_port,
            "node.role": args.role,
        },
    )
    role = settings.node.role
    if role != "edge" and (problem := model_path_error(settings.engine.model)):  # edges run no synthesis
        raise ConfigError(f"{problem} (in {settings.source})")
    if args.verbose == 0:
        logging.getLogger().setLevel(logging.INFO)  # a server says what it does by default
    Node(settings, worker_grace_s=args.worker_grace).serve_forever()
    return ExitCode.OK
