"""The worker's Prometheus metrics, registered on the daemon's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Phases of a training step timed by shardps_worker_step_seconds:
PHASES = (
    "wait",     # pull slices that came back not ready: waiting for other workers / the barrier
    "pull",     # the pull that delivered weights, plus the upload to the device (with
                # transport.overlap: until the last weights landed, beside the forward)
    "compute",  # forward, backward, clipping and the copy of the gradient to the host
    "push",     # sending the gradient to every shard
)


class WorkerMetrics:
    """Metric families of one worker daemon. Prometheus metrics are thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None):
        registry = registry if registry is not None else CollectorRegistry()
        self.steps = Counter("shardps_worker_steps", "Training steps pushed, per job",
                             ["job"], registry=registry)
        self.samples = Counter("shardps_worker_samples", "Training samples processed, per job",
                               ["job"], registry=registry)
        self.loss = Gauge("shardps_worker_loss", "Latest training loss of this worker's slice",
                          ["job"], registry=registry)
        self.step_seconds = Histogram(
            "shardps_worker_step_seconds", "Seconds per phase of a training step", ["phase"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                     10, 30),
            registry=registry)
        self.retries = Counter("shardps_worker_ps_retries",
                               "Pulls and pushes retried after a transient server error",
                               ["call", "code"], registry=registry)
        self.refused = Counter("shardps_worker_ps_refused",
                               "Pushes refused by a server: fenced (this incarnation was "
                               "declared dead), step_ahead (the server restored an older "
                               "version)", ["reason"], registry=registry)
        self.rollbacks = Counter("shardps_worker_rollbacks",
                                 "sync rollbacks taken: a server restored a checkpoint and this "
                                 "worker resumed at its version", ["job"], registry=registry)
        self.files_read = Counter("shardps_worker_data_files_read",
                                  "Data files this worker opened to train on (dataset files), per "
                                  "job: each worker reads only its own", ["job"], registry=registry)
        self.wire_bytes = Counter(
            "shardps_worker_wire_bytes", "Payload bytes this worker's pushes sent and its ready "
            "pulls received (elements or compressed encodings; frame headers not counted), per "
            "job and direction (push, pull)", ["job", "direction"], registry=registry)
        self.compression_ratio = Gauge(
            "shardps_worker_compression_ratio", "fp32 bytes of the last push's gradient over the "
            "bytes it put on the wire (1 uncompressed in fp32, 2 in bf16, ~3.9 int8)", ["job"],
            registry=registry)
        self.pushes_acked = Counter(
            "shardps_worker_pushes_acked", "Pushes a shard acknowledged (applied, accepted into "
            "a sync round, or a duplicate of one it already had), per job and shard index",
            ["job", "shard"], registry=registry)
        self.push_wait_max = Gauge(
            "shardps_worker_push_wait_max_seconds", "The longest a push of this worker took, "
            "retries included (e.g. across a failover), per job", ["job"], registry=registry)
        self.bucket_wait = Histogram(
            "shardps_worker_bucket_wait_seconds", "Overlap (transport.overlap): how long each "
            "bucket waited; push: a piece of the gradient from final (autograd done with it) "
            "to its send; pull: the forward waiting for a module's weights to land",
            ["direction"], buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                    0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry)
        self.overlap_pieces = Counter(
            "shardps_worker_overlap_pieces", "Pieces of overlapped pushes sent, by whether "
            "backward was still running (during) or had returned (after)", ["sent"],
            registry=registry)
        self.info = Gauge("shardps_worker_info", "Constant 1, labelled with the worker's device",
                          ["device"], registry=registry)
        for phase in PHASES:  # export every phase from the start, even before a job runs
            self.step_seconds.labels(phase=phase)
        for direction in ("push", "pull"):
            self.bucket_wait.labels(direction=direction)
        for sent in ("during", "after"):
            self.overlap_pieces.labels(sent=sent)
