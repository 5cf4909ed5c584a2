"""The relay process of bench/tunlink.py: creates a TAP device in each of two network
namespaces and moves Ethernet frames between them through two bench/linkmodel.py directions.

  python -m bench.tunrelay --a NS:DEV --b NS:DEV [--ab SPEC] [--ba SPEC] [--seed N] [--max-seconds S]

SPEC is a JSON object of linkmodel.Spec's fields. The devices exist as long as this process
holds them open (they are not persistent), so they vanish when it exits, however it exits. It
prints `ready` once both exist, then answers one line per command read on stdin: `cut`,
`heal` (`ok`), `stats` (a JSON object of both directions' counters). It exits on end of stdin
(its parent is gone), on SIGTERM, or after --max-seconds.

The devices take the kernel's TCP segmentation offload (IFF_VNET_HDR + TUNSETOFFLOAD, as
QEMU's taps do): the stack hands over segments of up to 64 KiB with a 10-byte virtio header,
which the relay passes on untouched, so it moves a few thousand frames per Gbit/s, not a
hundred thousand, while every device keeps the usual 1500-byte MTU.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import select
import signal
import struct
import sys
import time

from bench import linkmodel

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
CLONE_NEWNET = 0x40000000
READ_BYTES = 1 << 17  # a 64 KiB segment, its Ethernet and virtio headers, and room to spare
BATCH = 64  # frames read from one device, or written to one, per turn of the loop
IDLE_S = 0.5  # the longest select() when nothing is queued


def enter_namespace(ns: str) -> None:
    """Moves this (single-threaded) process into network namespace ns (by its `ip netns` name)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {ns}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def open_tap(ns: str, dev: str) -> int:
    """A new TAP device named dev in namespace ns, with offloads; returns its non-blocking fd."""
    enter_namespace(ns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    except OSError:
        os.close(fd)
        raise
    return fd


class Relay:
    """Two devices, two directions (a->b, b->a), and the command pipe. The loop owns all of it."""

    def __init__(self, fd_a: int, fd_b: int, ab: linkmodel.Direction, ba: linkmodel.Direction):
        self.routes = {fd_a: (ab, fd_b), fd_b: (ba, fd_a)}  # read fd: (its direction, write fd)
        self.directions = {"ab": ab, "ba": ba}
        self._commands = b""

    def run(self, deadline: float) -> None:
        """Relays until deadline, end of stdin, or a `quit` command."""
        while (now := time.monotonic()) < deadline:
            dues = [due for d, _ in self.routes.values() if (due := d.next_due()) is not None]
            wait = min([IDLE_S, deadline - now, *(due - now for due in dues)])
            readable, _, _ = select.select([*self.routes, 0], [], [], max(0.0, wait))
            now = time.monotonic()
            for fd in readable:
                if fd != 0:
                    self._read(fd, now)
                elif not self._command():
                    return
            for direction, out in self.routes.values():
                self._deliver(direction, out, time.monotonic())

    def _read(self, fd: int, now: float) -> None:
        direction = self.routes[fd][0]
        for _ in range(BATCH):
            try:
                frame = os.read(fd, READ_BYTES)
            except OSError:  # EAGAIN: nothing more for now (anything else: try again next turn)
                return
            direction.offer(frame, now)

    def _deliver(self, direction: linkmodel.Direction, out: int, now: float) -> None:
        for frame in direction.pop_due(now, BATCH):
            try:
                os.write(out, frame)
                direction.delivered(frame, True)
            except OSError:  # EIO while the device is down, ENOBUFS under pressure: a drop
                direction.delivered(frame, False)

    def _command(self) -> bool:
        """Handles the command lines that arrived; False on end of stdin or `quit`."""
        data = os.read(0, 4096)
        if not data:
            return False
        self._commands += data
        if b"\n" not in self._commands and len(self._commands) > 1 << 16:
            self._commands = b""  # no command is that long
        while b"\n" in self._commands:
            line, self._commands = self._commands.split(b"\n", 1)
            word = line.decode(errors="replace").strip()
            if word == "quit":
                return False
            if word in ("cut", "heal"):
                for d in self.directions.values():
                    d.cut() if word == "cut" else d.heal()
                reply = "ok"
            elif word == "stats":
                reply = json.dumps({k: {**vars(d.counters), "queued": d.queued(), "cut_now": d.is_cut}
                                    for k, d in self.directions.items()})
            else:
                reply = f"error: unknown command {word!r} (cut, heal, stats, quit)"
            print(reply, flush=True)
        return True


def _endpoint(text: str) -> tuple[str, str]:
    ns, sep, dev = text.partition(":")
    if not sep or not ns or not 1 <= len(dev) <= 15:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAMESPACE:DEVICE (device 1-15 chars)")
    return ns, dev


def _spec(text: str) -> linkmodel.Spec:
    try:
        return linkmodel.Spec(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"spec {text!r}: {exc}") from exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=_endpoint, required=True, help="NAMESPACE:DEVICE of one end")
    parser.add_argument("--b", type=_endpoint, required=True,
                        help="NAMESPACE:DEVICE of the other (the relay stays there)")
    parser.add_argument("--ab", type=_spec, default=linkmodel.Spec(), help="what a->b does (JSON of linkmodel.Spec)")
    parser.add_argument("--ba", type=_spec, default=linkmodel.Spec(), help="what b->a does")
    parser.add_argument("--seed", type=int, default=0, help="seeds the loss and jitter (b->a uses seed+1)")
    parser.add_argument("--max-seconds", type=float, default=4 * 3600, help="exit after this long")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    deadline = time.monotonic() + args.max_seconds
    fd_a = open_tap(*args.a)
    fd_b = open_tap(*args.b)
    relay = Relay(fd_a, fd_b, linkmodel.Direction(args.ab, args.seed), linkmodel.Direction(args.ba, args.seed + 1))
    print("ready", flush=True)
    relay.run(deadline)


if __name__ == "__main__":
    main()
