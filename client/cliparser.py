"""The `shardps` command line's arguments: one parser, its subcommands added group by group.
What each subcommand does is in cli.py (`COMMANDS`, keyed by the subcommand's name)."""

from __future__ import annotations

import argparse
from pathlib import Path

from shardps.runtime import daemon, rpc

# What add_subparsers returns; its class is private to argparse, but typeshed names it.
Subparsers = argparse._SubParsersAction


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: `args.command` names the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--coordinator", default=rpc.default_coordinator(),
                        help=f"coordinator host:port (default ${rpc.COORDINATOR_ENV} or {rpc.DEFAULT_COORDINATOR})")
    common.add_argument("--output", choices=["text", "json"], default="text", help="output format")
    daemon.add_security_args(common)
    follow = argparse.ArgumentParser(add_help=False)
    follow.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0: never)")
    follow.add_argument("--interval", type=float, default=1.0, help="seconds between progress lines")

    parser = argparse.ArgumentParser(prog="shardps", description="shardps client: run and inspect training jobs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_job_commands(sub, common, follow)
    add_inspect_commands(sub, common)
    add_local_commands(sub, follow)
    add_data_commands(sub)
    return parser


def add_job_commands(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser,
                     follow: argparse.ArgumentParser) -> None:
    """submit, resume, checkpoint, status, watch, cancel, reshard: a job's life on a
    cluster."""
    p = sub.add_parser("submit", parents=[common, follow], help="submit a job spec (YAML)")
    p.add_argument("spec", help="path to the job spec, or - for stdin")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument("--resume-from", metavar="JOB",
                   help="continue this ended job from its servers' last checkpoint")

    p = sub.add_parser("resume", parents=[common, follow],
                       help="continue an ended job from its last checkpoint, as a new job")
    p.add_argument("job", help="id of the job to continue")
    p.add_argument("--wait", action="store_true", help="follow the new job until it ends")

    p = sub.add_parser("checkpoint", parents=[common], help="make a job's servers write a checkpoint now")
    p.add_argument("job", help="job id")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a running sync job may take to reach the checkpoint's version")

    p = sub.add_parser("status", parents=[common], help="list jobs, or show one job in detail")
    p.add_argument("job", nargs="?", help="job id")

    p = sub.add_parser("watch", parents=[common, follow], help="follow a job's progress until it ends")
    p.add_argument("job", help="job id")

    p = sub.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("job", help="job id")

    p = sub.add_parser("reshard", parents=[common],
                       help="spread a running job's shards over N servers while it trains")
    p.add_argument("job", help="job id")
    p.add_argument("--servers", type=int, required=True, metavar="N",
                   help="servers afterwards: the job's first N, or all of them and free ones")
    p.add_argument("--wait", action="store_true", help="return once every move is done")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="with --wait: seconds to wait for the moves")


def add_inspect_commands(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """nodes, export, plot: what the cluster holds, and a job's weights and curves."""
    sub.add_parser("nodes", parents=[common], help="list servers and workers")

    p = sub.add_parser("export", parents=[common], help="save a job's weights as a state_dict")
    p.add_argument("job", help="job id")
    p.add_argument("-o", dest="output_path", required=True, metavar="PATH", help="where to write model.pt")

    p = sub.add_parser("plot", parents=[common], help="write a job's loss and metric curves as a PNG")
    p.add_argument("job", help="job id")
    p.add_argument("-o", dest="output_path", required=True, metavar="PATH", help="where to write the PNG")


def add_local_commands(sub: Subparsers[argparse.ArgumentParser], follow: argparse.ArgumentParser) -> None:
    """certs, local: development certificates, and a whole cluster on this machine."""
    p = sub.add_parser("certs", help="write a development CA, node and client certificates and a token")
    p.add_argument("directory", help="where to write them (created if missing)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="another host name or IP the node certificate is valid for (repeatable)")

    p = sub.add_parser("local", parents=[follow],
                       help="start a local cluster, run a job on it, stop everything")
    p.add_argument("spec", nargs="?", help="job spec (default: the built-in digits MLP example)")
    p.add_argument("--servers", type=int, default=None, help="parameter servers (default: the spec's cluster.servers)")
    p.add_argument("--workers", type=int, default=None, help="workers (default: the spec's cluster.workers)")
    p.add_argument("--export", metavar="PATH", help="also save the trained weights here")
    p.add_argument("--log-dir", help="keep the daemons' logs here (default: a temp dir, removed on success)")
    p.add_argument("--lease-ms", type=int, default=5000, help="coordinator lease (default 5000)")
    p.add_argument("--secure", action="store_true",
                   help="run the cluster with mutual TLS and a token (fresh development certificates)")
    p.add_argument("--output", choices=["text", "json"], default="text", help="output format")
    p.add_argument("--fork-server", action=argparse.BooleanOptionalAction, default=True,
                   help="start the servers and workers as forks of multiprocessing's forkserver, "
                        "which imports torch once, instead of as fresh processes that each import "
                        "it (faster start-up; Unix only; default on)")


def add_data_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """data ctr: datasets written to disk."""
    p = sub.add_parser("data", help="write a dataset (a synthetic click log)")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    p = kinds.add_parser("ctr", help="a synthetic click log in Criteo's layout, with its best achievable AUC")
    p.add_argument("out", type=Path, help="output directory (new or empty)")
    p.add_argument("--rows", type=int, required=True, help="rows in the whole log")
    p.add_argument("--files", type=int, required=True, help="shard files to split the rows into")
    p.add_argument("--seed", type=int, default=0, help="the log is a function of (seed, rows)")
