"""`shardps`: the command line client (submit, status, watch, cancel, nodes, export, local)."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

from shardps.client import api, progress
from shardps.client.api import ClientError, CoordinatorClient
from shardps.proto import exitcodes
from shardps.proto.states import SUCCESS_STATES, state_name
from shardps.runtime import daemon, rpc


def _emit(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def follow(client: CoordinatorClient, job_id: str, args) -> int:
    """Shows live progress until the job ends; returns the exit code for its verdict."""
    live = None if args.output == "json" else progress.Live(min_interval_s=args.interval)
    try:
        info = client.wait(job_id, timeout_s=args.timeout or None, interval_s=min(args.interval, 0.5),
                           on_update=live.update if live else None)
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.TIMEOUT
    if args.output == "json":
        _emit(progress.to_json(client.job(job_id, history=True)))
    else:
        print(f"{job_id} {state_name(info.state)}" + (f": {info.reason}" if info.reason else ""))
    return exitcodes.OK if info.state in SUCCESS_STATES else exitcodes.FAILURE


def cmd_submit(args) -> int:
    text = api.read_spec(args.spec)
    with CoordinatorClient(args.coordinator) as client:
        job_id = client.submit(text, resume_from=args.resume_from or "")
        return _submitted(client, job_id, args, {})


def cmd_resume(args) -> int:
    with CoordinatorClient(args.coordinator) as client:
        job_id = client.resume(args.job)
        return _submitted(client, job_id, args, {"resume_from": args.job})


def _submitted(client: CoordinatorClient, job_id: str, args, extra: dict) -> int:
    """Prints a new job's id (text or JSON), then follows it with --wait."""
    if args.output == "json" and not args.wait:
        _emit({"job_id": job_id, **extra})
    elif args.output != "json":
        resumes = f" (resumes {extra['resume_from']})" if "resume_from" in extra else ""
        print(job_id if not args.wait else f"submitted {job_id}{resumes}")
    if args.wait:
        return follow(client, job_id, args)
    return exitcodes.OK


def cmd_checkpoint(args) -> int:
    with CoordinatorClient(args.coordinator) as client:
        done = client.checkpoint(args.job, timeout_s=args.timeout or 60.0)
    if args.output == "json":
        _emit([progress.to_json(c) for c in done])
    else:
        for c in done:
            print(f"shard {c.shard_index}: version {c.version}  {c.path}")
        versions = {c.version for c in done}
        if len(versions) > 1:
            print(f"note: the shards are at different versions {sorted(versions)}")
    return exitcodes.OK


def cmd_status(args) -> int:
    with CoordinatorClient(args.coordinator) as client:
        if args.job:
            info = client.job(args.job, history=True)
            if args.output == "json":
                _emit(progress.to_json(info))
            else:
                print(progress.job_detail(info))
        else:
            jobs = client.jobs()
            if args.output == "json":
                _emit([progress.to_json(j) for j in jobs])
            else:
                print(progress.jobs_table(jobs) if jobs else "no jobs")
    return exitcodes.OK


def cmd_watch(args) -> int:
    with CoordinatorClient(args.coordinator) as client:
        client.job(args.job)  # unknown job: fail before drawing anything
        if args.output == "json" or not sys.stdout.isatty():
            return follow(client, args.job, args)
        from shardps.client import watch

        try:
            info = watch.watch_screen(client, args.job, args.interval, args.timeout or None)
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exitcodes.TIMEOUT
        return exitcodes.OK if info.state in SUCCESS_STATES else exitcodes.FAILURE


def cmd_cancel(args) -> int:
    with CoordinatorClient(args.coordinator) as client:
        state = client.cancel(args.job)
    if args.output == "json":
        _emit({"job_id": args.job, "state": state_name(state)})
    else:
        print(f"{args.job} {state_name(state)}")
    return exitcodes.OK


def cmd_nodes(args) -> int:
    with CoordinatorClient(args.coordinator) as client:
        nodes = client.nodes()
    if args.output == "json":
        _emit([progress.to_json(n) for n in nodes])
    else:
        print(progress.nodes_table(nodes) if nodes else "no nodes")
    return exitcodes.OK


def cmd_export(args) -> int:
    out = Path(args.output_path)
    with CoordinatorClient(args.coordinator) as client:
        tensors, count, versions = client.export_to(args.job, out)
    if args.output == "json":
        _emit({"job_id": args.job, "path": str(out), "parameters": count, "versions": versions})
    elif len(set(versions)) == 1:  # every sync export, and async/ssp shards that agree
        print(f"wrote {out}: {tensors} tensors, {count} parameters, version {versions[0]}")
    else:  # async / ssp: each shard counts its own updates
        print(f"wrote {out}: {tensors} tensors, {count} parameters, shard versions "
              f"{', '.join(map(str, versions))}")
    return exitcodes.OK


def cmd_plot(args) -> int:
    from shardps.client.plot import plot_job  # matplotlib loads only for this command

    with CoordinatorClient(args.coordinator) as client:
        info = client.job(args.job, history=True)
    plot_job(info, Path(args.output_path))
    if args.output == "json":
        _emit({"job_id": args.job, "path": args.output_path})
    else:
        print(f"wrote {args.output_path}: {len(info.losses)} loss points, {len(info.evals)} evaluations")
    return exitcodes.OK


def cmd_certs(args) -> int:
    from shardps.runtime import tls

    paths = tls.write_dev_certs(Path(args.directory), args.host)
    token = Path(args.directory) / "token"
    if not token.exists():
        token.touch(0o600)
        token.write_text(secrets.token_urlsafe(32) + "\n")
    print(f"wrote {', '.join(p.name for p in paths)} and token to {args.directory}")
    print(f"daemons: --tls-cert {args.directory}/node.pem --tls-key {args.directory}/node-key.pem "
          f"--tls-ca {args.directory}/ca.pem --token-file {args.directory}/token")
    print(f"clients: --tls-cert {args.directory}/client.pem --tls-key {args.directory}/client-key.pem "
          f"--tls-ca {args.directory}/ca.pem --token-file {args.directory}/token")
    return exitcodes.OK


def cmd_data(args) -> int:
    from shardps.client import ctrdata  # numpy and the generator, only when asked for

    return ctrdata.run(args)


def cmd_local(args) -> int:
    from shardps.client import local  # starts subprocesses; imported only when used

    return local.run(args)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--coordinator", default=rpc.default_coordinator(),
                        help=f"coordinator host:port (default ${rpc.COORDINATOR_ENV} or {rpc.DEFAULT_COORDINATOR})")
    common.add_argument("--output", choices=["text", "json"], default="text", help="output format")
    daemon.add_security_args(common)
    follow_opts = argparse.ArgumentParser(add_help=False)
    follow_opts.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0: never)")
    follow_opts.add_argument("--interval", type=float, default=1.0, help="seconds between progress lines")

    parser = argparse.ArgumentParser(prog="shardps", description="shardps client: run and inspect training jobs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", parents=[common, follow_opts], help="submit a job spec (YAML)")
    p.add_argument("spec", help="path to the job spec, or - for stdin")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument("--resume-from", metavar="JOB",
                   help="continue this ended job from its servers' last checkpoint")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("resume", parents=[common, follow_opts],
                       help="continue an ended job from its last checkpoint, as a new job")
    p.add_argument("job", help="id of the job to continue")
    p.add_argument("--wait", action="store_true", help="follow the new job until it ends")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("checkpoint", parents=[common], help="make a job's servers write a checkpoint now")
    p.add_argument("job", help="job id")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a running sync job may take to reach the checkpoint's version")
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("status", parents=[common], help="list jobs, or show one job in detail")
    p.add_argument("job", nargs="?", help="job id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("watch", parents=[common, follow_opts], help="follow a job's progress until it ends")
    p.add_argument("job", help="job id")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("job", help="job id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("nodes", parents=[common], help="list servers and workers")
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("export", parents=[common], help="save a job's weights as a state_dict")
    p.add_argument("job", help="job id")
    p.add_argument("-o", dest="output_path", required=True, metavar="PATH", help="where to write model.pt")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", parents=[common], help="write a job's loss and metric curves as a PNG")
    p.add_argument("job", help="job id")
    p.add_argument("-o", dest="output_path", required=True, metavar="PATH", help="where to write the PNG")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("certs", help="write a development CA, node and client certificates and a token")
    p.add_argument("directory", help="where to write them (created if missing)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="another host name or IP the node certificate is valid for (repeatable)")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("local", parents=[follow_opts],
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
    p.set_defaults(func=cmd_local)

    p = sub.add_parser("data", help="write a dataset (a synthetic click log)")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    p = kinds.add_parser("ctr", help="a synthetic click log in Criteo's layout, with its best achievable AUC")
    p.add_argument("out", type=Path, help="output directory (new or empty)")
    p.add_argument("--rows", type=int, required=True, help="rows in the whole log")
    p.add_argument("--files", type=int, required=True, help="shard files to split the rows into")
    p.add_argument("--seed", type=int, default=0, help="the log is a function of (seed, rows)")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "tls_cert"):
        try:
            daemon.configure_security(args)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        return args.func(args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.usage:
            return exitcodes.USAGE
        return exitcodes.UNREACHABLE if exc.unreachable else exitcodes.FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
