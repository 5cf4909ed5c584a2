"""The training loop's decisions (pure functions) and the loop itself against in-memory fakes
of the coordinator and the parameter servers; plus the single-process digits reference."""

import threading
import time

import pytest
import torch
import yaml

from shardps.proto import common_pb2, coordinator_pb2, ps_pb2
from shardps.proto import spec as spec_lib
from shardps.proto.psclient import PullResult
from shardps.worker import tasks, trainer
from shardps.worker.batches import BatchOrder
from shardps.worker.datasets import load_dataset
from shardps.worker.evaluate import evaluate
from shardps.worker.flat import FlatParams
from shardps.worker.models import build_model
from shardps.worker.trainer import ReportBuffer, Trainer

# -- pure decisions -------------------------------------------------------------------------


def test_pull_args_per_mode():
    assert trainer.pull_args("sync", 7) == {"min_version": 7, "clock": 0}
    assert trainer.pull_args("async", 7) == {"min_version": 0, "clock": 0}
    assert trainer.pull_args("ssp", 7) == {"min_version": 0, "clock": 7}


def test_sync_jumps_to_the_servers_round_other_modes_keep_their_clock():
    assert trainer.step_after_pull("sync", 3, [3, 3]) == 3
    assert trainer.step_after_pull("sync", 3, [9, 8]) == 8  # counted out of rounds 3..7
    assert trainer.step_after_pull("async", 3, [90, 80]) == 3
    assert trainer.step_after_pull("ssp", 3, [90]) == 3


def test_eval_steps():
    assert [t for t in range(0, 301) if trainer.is_eval_step(0, t, 100)] == [100, 200, 300]
    assert not trainer.is_eval_step(1, 100, 100)  # only rank 0 evaluates


def spec(**overrides):
    raw = {"model": {"name": "mlp"}, "data": {"dataset": "digits"}, "stop": {"max_steps": 30}}
    for dotted, value in overrides.items():
        node = raw
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return spec_lib.validate(raw)


def test_step_budget_takes_the_smaller_bound():
    assert trainer.step_budget({"max_steps": 30, "max_epochs": 0.0}, 1000, 64) == 30
    assert trainer.step_budget({"max_steps": 0, "max_epochs": 2.0}, 1000, 64) == 32
    assert trainer.step_budget({"max_steps": 10, "max_epochs": 2.0}, 1000, 64) == 10
    assert trainer.step_budget({"max_steps": 0, "max_epochs": 0.0}, 1000, 64) == 0


def test_worker_ids_are_the_live_workers_in_rank_order():
    job = coordinator_pb2.JobInfo(job_id="j", workers=[
        coordinator_pb2.WorkerProgress(node_id="worker-b", rank=1, alive=True),
        coordinator_pb2.WorkerProgress(node_id="worker-lost", rank=-1, alive=False),
        coordinator_pb2.WorkerProgress(node_id="worker-a", rank=0, alive=True)])
    assert trainer.worker_ids(job) == ["worker-a", "worker-b"]
    with pytest.raises(ValueError, match="ranks"):
        trainer.worker_ids(coordinator_pb2.JobInfo(workers=[
            coordinator_pb2.WorkerProgress(node_id="w", rank=1, alive=True)]))


def test_shard_config_carries_optimizer_mode_and_workers():
    s = spec(optimizer__name="adamw", optimizer__lr=0.01, optimizer__betas=[0.8, 0.9],
             optimizer__weight_decay=0.1, optimizer__schedule={"name": "cosine", "warmup_steps": 5},
             consistency={"mode": "ssp", "staleness": 2})
    config = trainer.shard_config(s, ["w0", "w1"], epoch=3, fingerprint="abc", budget=30)
    opt = config.optimizer
    assert (opt.name, opt.lr, opt.beta1, opt.beta2, opt.weight_decay) == ("adamw", 0.01, 0.8, 0.9,
                                                                          0.1)
    assert (opt.schedule, opt.warmup_steps, opt.total_steps) == ("cosine", 5, 30)
    assert config.mode == common_pb2.CONSISTENCY_SSP and config.staleness == 2
    assert list(config.workers) == ["w0", "w1"] and config.epoch == 3
    assert config.layout_fingerprint == "abc"
    explicit = spec(optimizer__schedule={"name": "cosine", "total_steps": 99})
    assert trainer.shard_config(explicit, ["w"], 0, "", 30).optimizer.total_steps == 99


def test_eval_points_one_per_metric_primary_first():
    points = trainer.eval_points(100, {"accuracy": 0.9, "loss": 0.3})
    assert [(p.step, p.metric, p.value, p.loss) for p in points] == [
        (100, "accuracy", 0.9, 0.3), (100, "loss", 0.3, 0.3)]


def test_metric_problem_names_unavailable_targets():
    assert trainer.metric_problem(spec(stop={"max_steps": 3, "target": {
        "metric": "accuracy", "value": 0.9}}), "classification") == ""
    problem = trainer.metric_problem(spec(stop={"max_steps": 3, "target": {
        "metric": "mse", "value": 0.1}}), "classification")
    assert "stop.target.metric 'mse'" in problem


def test_report_buffer_batches_at_most_every_interval():
    buffer = ReportBuffer(0.5)
    assert not buffer.due(0.0)  # nothing to send
    buffer.add(coordinator_pb2.StepReport(step=0))
    assert buffer.due(0.0)
    assert [r.step for r in buffer.take(0.0)] == [0]
    buffer.add(coordinator_pb2.StepReport(step=1))
    assert not buffer.due(0.4)
    assert buffer.due(0.5)


# -- the loop against fakes ------------------------------------------------------------------


class FakeServers:
    """All shards of one job in memory: sync rounds over `world` workers, torch Adam."""

    def __init__(self, world=1):
        self.world = world
        self.cond = threading.Condition()
        self.weights = None
        self.version = 0
        self.round = {}
        self.config = None
        self.pushes = []  # (worker, step, base_version, batch_size)
        self.done = False

    def client(self, job_id, shard_map, *, dtype=common_pb2.DTYPE_FLOAT32, chunk_bytes=0,
               worker_id="", incarnation=0):
        assert len(shard_map.shards) == 1
        return FakePSClient(self, worker_id)


class FakePSClient:
    def __init__(self, servers, worker_id):
        self.servers = servers
        self.worker_id = worker_id

    def init(self, weights, config):
        s = self.servers
        with s.cond:
            s.config = config
            s.weights = torch.nn.Parameter(weights.clone())
            opt = config.optimizer
            s.adam = torch.optim.Adam([s.weights], lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                      eps=opt.eps, foreach=False)

    def pull(self, dest, *, min_version=0, timeout_s=30.0, clock=0):
        s = self.servers
        with s.cond:
            ready = s.cond.wait_for(lambda: s.version >= min_version or s.done, timeout_s)
            if ready and not s.done:
                dest.copy_(s.weights.detach())
            return PullResult(ready=ready and not s.done, versions=[s.version], job_done=s.done)

    def push(self, grad, *, step, base_version, batch_size):
        s = self.servers
        with s.cond:
            if s.done:
                return [ps_pb2.PushResponse(status=ps_pb2.PUSH_STATUS_JOB_DONE)]
            s.pushes.append((self.worker_id, step, base_version, batch_size))
            assert step == s.version  # sync: every push belongs to the open round
            s.round[self.worker_id] = (grad.clone(), batch_size)
            if len(s.round) < s.world:
                return [ps_pb2.PushResponse(status=ps_pb2.PUSH_STATUS_ACCEPTED, version=s.version)]
            total = sum(b for _, b in s.round.values())
            s.weights.grad = sum(g * b for g, b in s.round.values()) / total
            s.adam.step()
            s.round.clear()
            s.version += 1
            s.cond.notify_all()
            return [ps_pb2.PushResponse(status=ps_pb2.PUSH_STATUS_APPLIED, version=s.version)]

    def close(self):
        pass


class FakeCoordinator:
    """Duck-types the Coordinator stub; every call must carry a deadline."""

    def __init__(self, spec_text, workers, stop_after_eval_at=None, state=None):
        self.spec_text = spec_text
        self.workers = workers
        self.state = state or common_pb2.JOB_STATE_PENDING
        self.layout = None
        self.reports = []
        self.stop_after_eval_at = stop_after_eval_at
        self.lock = threading.Lock()

    def _job(self):
        job = coordinator_pb2.JobInfo(job_id="job-1", state=self.state, spec_yaml=self.spec_text)
        for rank, node in enumerate(self.workers):
            job.workers.add(node_id=node, rank=rank, alive=True)
        if self.layout is not None:
            job.layout.CopyFrom(self.layout)
            job.shard_map.shards.add(index=0, server_id="s", address="fake", offset=0,
                                     length=self.layout.total)
        return job

    def GetJob(self, request, timeout=None):
        assert timeout and request.job_id == "job-1"
        with self.lock:
            return coordinator_pb2.GetJobResponse(job=self._job())

    def SetLayout(self, request, timeout=None):
        assert timeout and request.node_id == self.workers[0]
        with self.lock:
            self.layout = request.layout
            return coordinator_pb2.SetLayoutResponse(shard_map=self._job().shard_map)

    def ActivateJob(self, request, timeout=None):
        assert timeout
        with self.lock:
            self.state = common_pb2.JOB_STATE_RUNNING
            return coordinator_pb2.ActivateJobResponse(state=self.state)

    def ReportProgress(self, request, timeout=None):
        assert timeout
        with self.lock:
            self.reports.append(request)
            if request.failure:
                self.state = common_pb2.JOB_STATE_FAILED
            elif request.finished and request.node_id == self.workers[0]:
                self.state = common_pb2.JOB_STATE_COMPLETED
            elif any(e.step == self.stop_after_eval_at for e in request.evals):
                self.state = common_pb2.JOB_STATE_CONVERGED
            stop = self.state in trainer.FINAL_STATES
            return coordinator_pb2.ReportProgressResponse(
                action=coordinator_pb2.WORKER_ACTION_STOP if stop
                else coordinator_pb2.WORKER_ACTION_CONTINUE, state=self.state)

    def steps(self, node):
        return [s.step for r in self.reports if r.node_id == node for s in r.steps]

    def evals(self):
        return [(e.step, e.metric) for r in self.reports for e in r.evals]


SPEC = {"seed": 3, "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "data": {"dataset": "digits", "batch_size": 32},
        "optimizer": {"lr": 0.01},
        "stop": {"max_steps": 12, "eval_every": 5}}


def spec_text(**changes):
    raw = yaml.safe_load(yaml.safe_dump(SPEC))
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value}
    return yaml.safe_dump(raw)


def run_workers(coord, servers, world, **kwargs):
    """Runs `world` trainers (ranks in threads) to the end; returns (trainers, outcomes)."""
    trainers = [Trainer(coord, coord.workers[r], 1, coordinator_pb2.WorkerAssignment(
        job_id="job-1", rank=r, world_size=world, epoch=1), ps_factory=servers.client, **kwargs)
        for r in range(world)]
    outcomes = [None] * world

    def go(rank):
        outcomes[rank] = trainers[rank].run()

    threads = [threading.Thread(target=go, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return trainers, outcomes


def reference_weights(steps, batch_size=32, lr=0.01, seed=3):
    """Single-process training: torch.optim.Adam on the global batches."""
    data = load_dataset("digits", {}, seed)
    torch.manual_seed(seed)
    model = build_model("mlp", {"hidden": [16]}, data.info)
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=False)
    order = BatchOrder(data.num_train, batch_size, True, seed)
    for t in range(steps):
        opt.zero_grad()
        index = order.batch(t)
        tasks.loss(data.task, model(data.train_x[index]), data.train_y[index]).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_one_sync_worker_matches_single_process_adam():
    coord = FakeCoordinator(spec_text(), ["worker-a"])
    servers = FakeServers(world=1)
    (tr,), (outcome,) = run_workers(coord, servers, 1)
    assert outcome.kind == "finished", outcome
    torch.testing.assert_close(servers.weights.detach(), reference_weights(12))
    assert servers.version == 12
    assert [p[1] for p in servers.pushes] == list(range(12))
    assert all(p[2] == [p[1]] and p[3] == 32 for p in servers.pushes)  # base version, batch
    assert list(servers.config.workers) == ["worker-a"] and servers.config.epoch == 1
    assert servers.config.layout_fingerprint == tr.flat.layout.fingerprint
    assert servers.config.optimizer.total_steps == 12
    assert coord.steps("worker-a") == list(range(12))
    assert coord.evals() == [(5, "accuracy"), (5, "loss"), (10, "accuracy"), (10, "loss"),
                             (12, "accuracy"), (12, "loss")]
    assert coord.reports[-1].finished and coord.state == common_pb2.JOB_STATE_COMPLETED
    # The final evaluation is of the servers' final weights.
    final = [e for e in coord.reports[-1].evals if e.metric == "accuracy"][0]
    data = load_dataset("digits", {}, 3)
    torch.manual_seed(3)
    model = build_model("mlp", {"hidden": [16]}, data.info)
    FlatParams(model).load(servers.weights.detach())
    expected = evaluate(model, data)
    assert (final.value, final.loss) == (expected["accuracy"], expected["loss"])


def test_two_sync_workers_match_single_process_adam():
    coord = FakeCoordinator(spec_text(), ["worker-a", "worker-b"])
    servers = FakeServers(world=2)
    _, outcomes = run_workers(coord, servers, 2)
    assert [o.kind for o in outcomes] == ["finished", "finished"], outcomes
    torch.testing.assert_close(servers.weights.detach(), reference_weights(12),
                               atol=2e-5, rtol=1e-4)
    assert sorted(p[3] for p in servers.pushes if p[1] == 0) == [16, 16]
    assert coord.steps("worker-b") == list(range(12))
    assert [r.finished for r in coord.reports if r.node_id == "worker-b"][-1:] == [True]
    assert not [e for r in coord.reports if r.node_id == "worker-b" for e in r.evals]


def test_stop_after_an_evaluation_does_not_push_that_step():
    coord = FakeCoordinator(spec_text(), ["worker-a"], stop_after_eval_at=5)
    servers = FakeServers(world=1)
    _, (outcome,) = run_workers(coord, servers, 1)
    assert outcome.kind == "stopped" and "JOB_STATE_CONVERGED" in outcome.reason
    assert [p[1] for p in servers.pushes] == [0, 1, 2, 3, 4]


def nan_model(info):
    class NaN(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * float("nan")
    return NaN(info["num_features"], info["num_classes"])


def test_non_finite_loss_is_reported_not_pushed():
    coord = FakeCoordinator(spec_text(model={"name": f"{__name__}:nan_model", "kwargs": {}}),
                            ["worker-a"])
    servers = FakeServers()
    _, (outcome,) = run_workers(coord, servers, 1)
    assert outcome.kind == "failed" and "non-finite training loss" in outcome.reason
    assert servers.pushes == []
    assert "non-finite training loss" in coord.reports[-1].failure


def test_bad_model_kwarg_is_reported_as_the_failure():
    coord = FakeCoordinator(spec_text(model={"name": "mlp", "kwargs": {"depth": 3}}),
                            ["worker-a"])
    _, (outcome,) = run_workers(coord, FakeServers(), 1)
    assert outcome.kind == "failed" and "model 'mlp'" in coord.reports[-1].failure


def test_a_rank_with_another_layout_fails_the_job():
    coord = FakeCoordinator(spec_text(), ["worker-a", "worker-b"],
                            state=common_pb2.JOB_STATE_RUNNING)
    coord.layout = common_pb2.Layout(total=5, fingerprint="0000000000000000")
    tr = Trainer(coord, "worker-b", 1, coordinator_pb2.WorkerAssignment(
        job_id="job-1", rank=1, world_size=2), ps_factory=FakeServers().client)
    outcome = tr.run()
    assert outcome.kind == "failed" and "layout mismatch" in outcome.reason
    assert "layout mismatch" in coord.reports[-1].failure


def test_a_final_job_is_not_trained():
    coord = FakeCoordinator(spec_text(), ["worker-a"], state=common_pb2.JOB_STATE_CANCELLED)
    servers = FakeServers()
    _, (outcome,) = run_workers(coord, servers, 1)
    assert outcome.kind == "stopped" and "CANCELLED" in outcome.reason
    assert servers.config is None


def test_stop_interrupts_a_pull_that_waits_for_other_workers():
    coord = FakeCoordinator(spec_text(), ["worker-a", "worker-b"])
    servers = FakeServers(world=2)  # worker-b never runs: round 0 never closes
    tr = Trainer(coord, "worker-a", 1, coordinator_pb2.WorkerAssignment(
        job_id="job-1", rank=0, world_size=2), ps_factory=servers.client)
    result = []
    thread = threading.Thread(target=lambda: result.append(tr.run()))
    thread.start()
    deadline = time.monotonic() + 30
    while not servers.pushes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert servers.pushes  # rank 0 pushed step 0 and now waits for version 1
    tr.stop("assignment cleared")
    thread.join(trainer.PULL_SLICE_S + 5)
    assert not thread.is_alive()
    assert result[0].kind == "stopped" and result[0].reason == "assignment cleared"


def test_job_done_on_the_servers_ends_the_loop():
    coord = FakeCoordinator(spec_text(), ["worker-a", "worker-b"])
    servers = FakeServers(world=2)
    tr = Trainer(coord, "worker-a", 1, coordinator_pb2.WorkerAssignment(
        job_id="job-1", rank=0, world_size=2), ps_factory=servers.client)
    result = []
    thread = threading.Thread(target=lambda: result.append(tr.run()))
    thread.start()
    while not servers.pushes:
        time.sleep(0.01)
    with servers.cond:
        servers.done = True
        servers.cond.notify_all()
    thread.join(10)
    assert result and result[0].kind == "stopped" and "servers" in result[0].reason


# -- the single-process reference the README's numbers come from ------------------------------


def test_digits_mlp_reference_reaches_096():
    """Default digits MLP, Adam lr 1e-3, global batch 64, shuffle: >= 0.96 within 1500 steps.

    Evaluates version t (before step t's update) every 100 steps, as rank 0 does. With seed 0
    the first evaluation at >= 0.96 is step 300 (0.972); the test allows up to 1500.
    """
    torch.set_num_threads(1)  # the machine is shared; this model is tiny anyway
    data = load_dataset("digits", {}, 0)
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [128, 64]}, data.info)
    flat = FlatParams(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    order = BatchOrder(data.num_train, 64, True, 0)
    reached = None
    for t in range(1501):
        if t and t % 100 == 0 and evaluate(model, data)["accuracy"] >= 0.96:
            reached = t
            break
        index = order.batch(t)
        flat.zero_grad()
        tasks.loss(data.task, model(data.train_x[index]), data.train_y[index]).backward()
        opt.step()
    print(f"digits mlp reached 0.96 test accuracy at step {reached}")
    assert reached is not None and reached <= 1500
    assert reached == 300  # pins the number the README quotes; update both together
