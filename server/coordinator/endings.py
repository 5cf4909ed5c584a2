"""How a job's end settles: the version its final weights are at, and the step reports that
still count after the verdict.

Pure: no gRPC, no clock of its own. The rules are docs/architecture.md, "Job life cycle" 8-9.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# After a job ends, step reports of its workers still count for this long (the last ones of
# a rank that learned the verdict late); then the loss points still open are written with
# the reports they have.
SETTLE_S = 10.0


@dataclass
class Ending:
    """The settling of one ended job.

    Attributes:
        final_version: sync jobs: the version of the final weights (every shard ends there),
            -1 while not named. Named at the verdict when a step decided it, else from the
            versions the servers froze at (`frozen`).
        frozen: shard index -> the version its server froze it at (sync, while unnamed).
        last_step: step reports up to this step still count after the end; None: any step
            (the verdict named no version).
        settle_by: monotonic time after which no late report counts; None while running or
            once the history is settled.
    """

    final_version: int = -1
    frozen: dict[int, int] = field(default_factory=dict)
    last_step: int | None = None
    settle_by: float | None = None


def begin(ending: Ending, sync: bool, version: int | None, now: float) -> None:
    """The job has just ended; `version` is the version its verdict named, if any (only sync
    jobs have one version for every shard)."""
    if sync and version is not None and version >= 0:
        ending.final_version = version
        ending.last_step = version - 1
    ending.settle_by = now + SETTLE_S


def counts(ending: Ending, step: int, now: float) -> bool:
    """Whether a step report arriving after the end still goes into the history."""
    if ending.settle_by is None or now > ending.settle_by:
        return False
    return ending.last_step is None or step <= ending.last_step


def shard_frozen(ending: Ending, shards: int, index: int, version: int) -> bool:
    """A server froze shard `index` (of `shards`) of a sync job whose final version is not
    named yet at `version`. Once every shard has reported, the final version is the highest:
    a shard one round behind completes that round from the pushes it held back (the same
    pushes the others applied). Returns True if this names the final version."""
    if ending.final_version >= 0 or not 0 <= index < shards:
        return False
    ending.frozen[index] = version
    if len(ending.frozen) < shards:
        return False
    ending.final_version = max(ending.frozen.values())
    ending.last_step = ending.final_version - 1
    if len(set(ending.frozen.values())) > 1:
        log.info("shards froze at versions %s: the ones behind complete their last round",
                 ", ".join(f"{i}: {v}" for i, v in sorted(ending.frozen.items())))
    return True
