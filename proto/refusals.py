"""Refusals a caller acts on: the start of the details string of each FAILED_PRECONDITION the
parameter server answers a push with (servers raise them, workers recognise them)."""

# This worker incarnation was declared dead by the coordinator: it must register again and
# rejoin as a new incarnation (never retry the push).
FENCED = "fenced:"
# sync: the push's step is beyond the shard's open round (the shard restored an older
# checkpoint, or the worker skipped a pull): pull again before pushing.
STEP_AHEAD = "step ahead:"
# The worker is not (yet) among the shard's live workers: the server has not heard of a
# membership change; retry for a while.
NOT_LIVE = "worker is not a live worker"
