"""The training loop (`Trainer`) against the real coordinator and parameter server in this
process, over real gRPC with the real PSClient. The test holds each Trainer itself: its worker
node is registered and kept alive by `tests.cluster.RegisteredWorker`."""

import itertools
import threading

import pytest
import torch
import yaml

from shardps.proto import common_pb2
from shardps.worker import jobsetup, shards, tasks
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import load_dataset
from shardps.worker.evaluate import evaluate
from shardps.worker.flat import FlatParams
from shardps.worker.models import build_model
from shardps.worker.trainer import Trainer
from tests.cluster import Cluster, RegisteredWorker
from tests.harness import poll

pytestmark = pytest.mark.timeout(120)

SPEC = {"seed": 3, "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "data": {"dataset": "digits", "batch_size": 32},
        "optimizer": {"lr": 0.01},
        "cluster": {"servers": 1, "workers": 1},
        "stop": {"max_steps": 12, "eval_every": 5}}


def spec_text(workers=1, **changes):
    raw = yaml.safe_load(yaml.safe_dump(SPEC))
    raw["cluster"]["workers"] = workers
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value}
    return yaml.safe_dump(raw)


class Setup:
    """One server, a coordinator, and worker nodes the test drives Trainers for."""

    def __init__(self):
        self.cluster = Cluster(servers=1, lease_ms=1000)
        self.nodes: list[RegisteredWorker] = []

    def submit(self, text: str, workers: int = 1) -> tuple[str, list[RegisteredWorker]]:
        """Registers `workers` worker nodes, submits; returns the job and its nodes by rank."""
        nodes = [RegisteredWorker(self.cluster.stub) for _ in range(workers)]
        self.nodes += nodes
        job_id = self.cluster.submit(text)
        for node in nodes:
            assert node.wait_assignment().job_id == job_id
        return job_id, sorted(nodes, key=lambda n: n.assignment.rank)

    def trainer(self, node: RegisteredWorker) -> Trainer:
        return Trainer(self.cluster.stub, node.node_id, node.incarnation, node.assignment)

    def shard(self, job_id: str):
        return self.cluster.servers[0].shards.get(job_id, 0)

    def close(self):
        for node in self.nodes:
            node.stop()
        self.cluster.close()


@pytest.fixture
def setup():
    s = Setup()
    yield s
    s.close()


def run_all(trainers):
    """Runs the trainers (one thread each) to the end; returns their outcomes."""
    outcomes = [None] * len(trainers)

    def go(i):
        outcomes[i] = trainers[i].run()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(trainers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return outcomes


def start(tr):
    """Runs one trainer in a thread; returns (thread, list that receives the outcome)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(tr.run()), daemon=True)
    thread.start()
    return thread, result


def reference_weights(steps, batch_size=32, lr=0.01, seed=3):
    """Single-process training: torch.optim.Adam (fused, as the servers run it) on the global
    batches."""
    data = load_dataset("digits", {}, seed)
    torch.manual_seed(seed)
    model = build_model("mlp", {"hidden": [16]}, data.info)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    order = BatchOrder(data.num_train, batch_size, True, seed)
    for t in range(steps):
        opt.zero_grad()
        index = order.batch(t)
        tasks.loss(data.task, model(data.train_x[index]), data.train_y[index]).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_one_sync_worker_matches_single_process_adam(setup):
    job_id, (node,) = setup.submit(spec_text())
    tr = setup.trainer(node)
    (outcome,) = run_all([tr])
    assert outcome.kind == "finished", outcome
    assert torch.equal(setup.cluster.weights(job_id), reference_weights(12))
    info = setup.shard(job_id).info()
    # Every step pushed once, each closing its round.
    assert (info.version, info.pushes_applied, dict(info.worker_clocks)) == (
        12, 12, {node.node_id: 12})
    config = setup.shard(job_id).config
    assert list(config.workers) == [node.node_id] and config.epoch == 1
    assert config.layout_fingerprint == tr.flat.layout.fingerprint
    assert config.optimizer.total_steps == 12
    job = setup.cluster.job(job_id, history=True)
    assert [p.step for p in job.losses] == list(range(12))
    assert job.samples == 12 * 32
    assert [(e.step, e.metric) for e in job.evals] == [
        (5, "accuracy"), (5, "loss"), (10, "accuracy"), (10, "loss"), (12, "accuracy"),
        (12, "loss")]
    assert job.state == common_pb2.JOB_STATE_COMPLETED
    # The final evaluation is of the servers' final weights.
    final = [e for e in job.evals if e.metric == "accuracy"][-1]
    data = load_dataset("digits", {}, 3)
    torch.manual_seed(3)
    model = build_model("mlp", {"hidden": [16]}, data.info)
    FlatParams(model).load(setup.cluster.weights(job_id))
    expected = evaluate(model, data)
    assert (final.value, final.loss) == (expected["accuracy"], expected["loss"])


def test_two_sync_workers_match_single_process_adam(setup):
    job_id, nodes = setup.submit(spec_text(workers=2), workers=2)
    trainers = [setup.trainer(n) for n in nodes]
    outcomes = run_all(trainers)
    assert [o.kind for o in outcomes] == ["finished", "finished"], outcomes
    torch.testing.assert_close(setup.cluster.weights(job_id), reference_weights(12),
                               atol=1e-5, rtol=0)
    for tr in trainers:  # each took its half of every global batch
        assert tr.metrics.samples.labels(job=job_id)._value.get() == 12 * 16
    job = setup.cluster.job(job_id, history=True)
    assert [w.step for w in job.workers] == [11, 11]
    # Only rank 0 evaluates: one evaluation per eval step.
    assert [e.step for e in job.evals if e.metric == "accuracy"] == [5, 10, 12]


def test_stop_after_an_evaluation_does_not_push_that_step(setup):
    target = {"target": {"metric": "accuracy", "value": 0.01}}  # met by the first evaluation
    job_id, (node,) = setup.submit(spec_text(stop=target))
    (outcome,) = run_all([setup.trainer(node)])
    assert outcome.kind == "stopped" and "JOB_STATE_CONVERGED" in outcome.reason
    info = setup.shard(job_id).info()
    assert (info.version, dict(info.worker_clocks)) == (5, {node.node_id: 5})  # steps 0-4


def nan_model(info):
    class NaN(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * float("nan")
    return NaN(info["num_features"], info["num_classes"])


_widths = itertools.count(8)


def growing_mlp(info):
    """A wider MLP at every call: no two workers build the same layout."""
    width = next(_widths)
    return torch.nn.Sequential(torch.nn.Linear(info["num_features"], width), torch.nn.ReLU(),
                               torch.nn.Linear(width, info["num_classes"]))


def test_non_finite_loss_is_reported_not_pushed(setup):
    job_id, (node,) = setup.submit(spec_text(model={"name": f"{__name__}:nan_model",
                                                    "kwargs": {}}))
    (outcome,) = run_all([setup.trainer(node)])
    assert outcome.kind == "failed" and "non-finite training loss" in outcome.reason
    info = setup.shard(job_id).info()
    assert (info.version, dict(info.worker_clocks)) == (0, {})  # nothing was pushed
    job = setup.cluster.job(job_id)
    assert job.state == common_pb2.JOB_STATE_FAILED
    assert "non-finite training loss" in job.reason


def test_bad_model_kwarg_is_reported_as_the_failure(setup):
    job_id, (node,) = setup.submit(spec_text(model={"name": "mlp", "kwargs": {"depth": 3}}))
    (outcome,) = run_all([setup.trainer(node)])
    assert outcome.kind == "failed"
    job = setup.cluster.job(job_id)
    assert job.state == common_pb2.JOB_STATE_FAILED and "model 'mlp'" in job.reason


def test_a_rank_with_another_layout_fails_the_job(setup):
    job_id, (rank0, rank1) = setup.submit(
        spec_text(workers=2, model={"name": f"{__name__}:growing_mlp", "kwargs": {}}), workers=2)
    thread, first = start(setup.trainer(rank0))
    poll(lambda: setup.cluster.job(job_id).state == common_pb2.JOB_STATE_RUNNING, 30,
         interval=0.02, what="rank 0 activating the job")
    outcome = setup.trainer(rank1).run()
    assert outcome.kind == "failed" and "layout mismatch" in outcome.reason
    job = setup.cluster.job(job_id)
    assert job.state == common_pb2.JOB_STATE_FAILED and "layout mismatch" in job.reason
    thread.join(30)
    assert first and first[0].kind == "stopped"  # rank 0 learns the verdict and ends


def test_a_final_job_is_not_trained(setup):
    job_id, (node,) = setup.submit(spec_text())
    setup.cluster.client.cancel(job_id)
    outcome = setup.trainer(node).run()
    assert outcome.kind == "stopped" and "CANCELLED" in outcome.reason
    assert setup.cluster.servers[0].shards.shards(job_id) == []  # no shard was created


def long_polls(setup, outcome):
    return setup.cluster.coordinator.servicer.metrics.long_polls.labels("get_job", outcome)._value.get()


def test_stop_cancels_the_getjob_long_poll_of_a_rank_waiting_for_the_job_to_start(setup):
    # Rank 0 never initialises the job: rank 1 long-polls GetJob until it is stopped.
    job_id, (_, rank1) = setup.submit(spec_text(workers=2), workers=2)
    tr = setup.trainer(rank1)
    thread, result = start(tr)
    poll(lambda: setup.cluster.coordinator.servicer.metrics.held_calls._value.get() == 1, 30,
         interval=0.02, what="rank 1's GetJob held")
    tr.stop("assignment cleared")
    thread.join(jobsetup.WAIT_RUNNING_HOLD_S + 5)
    assert not thread.is_alive()
    assert result[0].kind == "stopped" and result[0].reason == "assignment cleared"
    # The call was cancelled, not left to run out its hold.
    poll(lambda: long_polls(setup, "cancelled") == 1, 10, interval=0.02, what="the cancellation")
    assert setup.cluster.job(job_id).state == common_pb2.JOB_STATE_PENDING


def waiting_after_step_0(setup):
    """Rank 0 of a 2-worker sync job whose rank 1 never trains: it pushes step 0, then waits
    for round 0 to close. Returns (job id, trainer, thread, outcome list)."""
    job_id, (rank0, _) = setup.submit(spec_text(workers=2), workers=2)
    tr = setup.trainer(rank0)
    thread, result = start(tr)
    poll(lambda: setup.cluster.job(job_id).state == common_pb2.JOB_STATE_RUNNING
         and dict(setup.shard(job_id).info().worker_clocks) == {rank0.node_id: 1}
         and setup.shard(job_id).waiting_pulls == 1, 30, interval=0.02,
         what="rank 0 waiting for round 0")
    return job_id, tr, thread, result


def test_stop_interrupts_a_pull_that_waits_for_other_workers(setup):
    _, tr, thread, result = waiting_after_step_0(setup)
    tr.stop("assignment cleared")
    thread.join(shards.PULL_SLICE_S + 5)
    assert not thread.is_alive()
    assert result[0].kind == "stopped" and result[0].reason == "assignment cleared"


def test_job_done_on_the_servers_ends_the_loop(setup):
    """The server learns first that the job ended (here told directly, as its heartbeat
    would tell it): the waiting pull answers job_done and the loop stops on that alone.
    Cancelling at the coordinator instead races the rank's own progress report, whose STOP
    ends the loop through the other path (the test above)."""
    job_id, _, thread, result = waiting_after_step_0(setup)
    assert setup.shard(job_id).set_job_state(common_pb2.JOB_STATE_CANCELLED)
    thread.join(30)
    assert result and result[0].kind == "stopped" and "servers" in result[0].reason
    assert setup.shard(job_id).info().version == 0
