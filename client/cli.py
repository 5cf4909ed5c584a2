"""`shardps`: the command line client (submit, status, watch, cancel, reshard, nodes, export,
local)."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shardps.client import api, progress
from shardps.client.api import ClientError, CoordinatorClient
from shardps.client.cliparser import build_parser
from shardps.proto import coordinator_pb2, exitcodes
from shardps.proto.states import SUCCESS_STATES, state_name
from shardps.runtime import daemon


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


def cmd_reshard(args) -> int:
    with CoordinatorClient(args.coordinator) as client:
        reshard = client.reshard(args.job, args.servers)
        if args.wait:
            try:
                reshard = wait_reshard(client, args.job, args.timeout)
            except TimeoutError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return exitcodes.TIMEOUT
    if args.output == "json":
        _emit(progress.to_json(reshard))
    else:
        print("\n".join(progress.reshard_lines(reshard)))
    failed = reshard.state == coordinator_pb2.RESHARD_STATE_FAILED
    return exitcodes.FAILURE if failed else exitcodes.OK


def wait_reshard(client: CoordinatorClient, job_id: str, timeout_s: float,
                 interval_s: float = 0.25) -> coordinator_pb2.ReshardProgress:
    """Polls the job until its latest reshard is over (done or failed); returns it.
    Raises TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        reshard = client.job(job_id).reshard
        if reshard.state != coordinator_pb2.RESHARD_STATE_RUNNING:
            return reshard
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: reshard still running after {timeout_s:g}s "
                               f"({reshard.moves_done} of {reshard.moves_total} moves done)")
        time.sleep(interval_s)


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


# What each subcommand does, by the name cliparser.build_parser gives it.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "submit": cmd_submit, "resume": cmd_resume, "checkpoint": cmd_checkpoint,
    "status": cmd_status, "watch": cmd_watch, "cancel": cmd_cancel, "nodes": cmd_nodes,
    "reshard": cmd_reshard,
    "export": cmd_export, "plot": cmd_plot, "certs": cmd_certs, "local": cmd_local,
    "data": cmd_data,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "tls_cert"):
        try:
            daemon.configure_security(args)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        return COMMANDS[args.command](args)
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
