"""Cross-request batching (serving/batcher.py): waiting predictions share one forward pass; alone, one uses every
thread; under load the work is split over the lanes; answers and errors reach the right callers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.batcher import Batcher


class RecordingModel:
    """prepare/run like a predictor: row i of the answer is the input's value. The first run waits for ``hold``;
    with ``side_by_side`` (a Barrier) the later runs only finish if that many run at the same time."""

    def __init__(self, side_by_side: threading.Barrier | None = None):
        self.runs: list[tuple[int, bool]] = []  # (batch size, alone)
        self.running = threading.Semaphore(0)
        self.hold = threading.Event()
        self.hold.set()
        self.side_by_side = side_by_side
        self.lock = threading.Lock()

    def prepare(self, images):
        return np.asarray(images, dtype=np.float32).reshape(-1, 1)

    def run(self, batch, alone=True):
        with self.lock:
            self.runs.append((len(batch), alone))
            n = len(self.runs)
        self.running.release()
        if n == 1:
            assert self.hold.wait(30), "test never released the model"
        elif self.side_by_side is not None:
            self.side_by_side.wait()  # BrokenBarrierError (a failed call) unless the lanes really run together
        return np.hstack([batch, -batch]), batch * 10


def _call(batcher, model, values, out, key):
    out[key] = batcher.predict(model, values)


def _wait_pending(batcher, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(batcher._pending) < n:
        assert time.monotonic() < deadline, f"{len(batcher._pending)} of {n} calls queued"
        time.sleep(0.005)


def _start(batcher, model, calls, out):
    threads = [threading.Thread(target=_call, args=(batcher, model, v, out, k)) for k, v in calls.items()]
    for t in threads:
        t.start()
    return threads


def test_one_request_runs_at_once_alone():
    model, batcher = RecordingModel(), Batcher(lanes=2, max_batch=8)
    probs, feats = batcher.predict(model, [3.0])
    assert probs.tolist() == [[3.0, -3.0]] and feats.tolist() == [[30.0]]
    batcher.predict(model, [4.0])  # a sequential client: never two in flight, every request on every core
    assert model.runs == [(1, True), (1, True)]


def test_requests_waiting_meanwhile_share_one_forward_pass():
    batcher, model, out = Batcher(lanes=1, max_batch=8), RecordingModel(), {}
    model.hold.clear()
    first = _start(batcher, model, {"first": [1.0]}, out)
    assert model.running.acquire(timeout=10)
    # Five more arrive while the first runs: REST requests of one image, and a Gradio batch of two.
    calls = {f"r{i}": [float(10 + i)] for i in range(4)} | {"gradio": [20.0, 21.0]}
    threads = _start(batcher, model, calls, out)
    _wait_pending(batcher, 5)
    model.hold.set()
    for t in first + threads:
        t.join(10)
    assert model.runs == [(1, True), (6, True)]  # one lane: every run has all the threads
    for key, values in {"first": [1.0], **calls}.items():  # each caller gets its own rows
        assert out[key][0][:, 0].tolist() == values and out[key][1][:, 0].tolist() == [v * 10 for v in values]


def test_under_load_the_queue_is_split_over_the_lanes():
    batcher, model, out = Batcher(lanes=2, max_batch=8), RecordingModel(threading.Barrier(2, timeout=10)), {}
    model.hold.clear()
    first = _start(batcher, model, {"first": [1.0]}, out)
    assert model.running.acquire(timeout=10)
    calls = {f"r{i}": [float(i)] for i in range(6)}
    threads = _start(batcher, model, calls, out)
    _wait_pending(batcher, 6)  # a run alone holds every lane: nothing starts beside it
    assert model.runs == [(1, True)]
    model.hold.set()
    for t in first + threads:
        t.join(10)
    assert model.runs[0] == (1, True)
    assert sorted(model.runs[1:]) == [(3, False), (3, False)]  # two lanes side by side, 1-thread sessions
    assert {k: v[0][0, 0] for k, v in out.items() if k != "first"} == {k: v[0] for k, v in calls.items()}


@pytest.mark.parametrize(("calm_s", "last_alone"), [(0.0, True), (60.0, False)])
def test_a_caller_still_preparing_counts_as_in_flight(calm_s, last_alone):
    """Two requests at once (one still resizing its image): the first one does not take every core. The last one
    is alone by the time it runs, but takes every core only once the server has been calm for calm_s."""

    class SlowPrepare(RecordingModel):
        def __init__(self):
            super().__init__()
            self.preparing, self.prepared = threading.Event(), threading.Event()

        def prepare(self, images):
            if images == ["slow"]:
                self.preparing.set()
                assert self.prepared.wait(30)
                images = [5.0]
            return super().prepare(images)

    batcher, model, out = Batcher(lanes=2, max_batch=8, calm_s=calm_s), SlowPrepare(), {}
    slow = _start(batcher, model, {"slow": ["slow"]}, out)
    assert model.preparing.wait(10)
    probs, _ = batcher.predict(model, [1.0])
    model.prepared.set()
    slow[0].join(10)
    assert probs.tolist() == [[1.0, -1.0]] and out["slow"][0].tolist() == [[5.0, -5.0]]
    assert model.runs == [(1, False), (1, last_alone)]


def test_batches_stop_at_max_batch_and_keep_models_apart():
    batcher, model, other, out = Batcher(lanes=1, max_batch=3), RecordingModel(), RecordingModel(), {}
    model.hold.clear()
    first = _start(batcher, model, {"first": [0.0]}, out)
    assert model.running.acquire(timeout=10)
    threads = _start(batcher, model, {f"m{i}": [float(i)] for i in range(4)}, out)
    threads += _start(batcher, other, {"o": [9.0]}, out)  # e.g. the canary model
    _wait_pending(batcher, 5)
    model.hold.set()
    for t in first + threads:
        t.join(10)
    # first; then 3 of the 4 waiting (max_batch), the other model's call apart, and the last one
    assert sorted(n for n, _ in model.runs) == [1, 1, 3] and [n for n, _ in other.runs] == [1]
    assert out["o"][0].tolist() == [[9.0, -9.0]]


def test_a_model_error_reaches_every_caller_of_its_batch_and_frees_the_lane():
    class Failing(RecordingModel):
        def run(self, batch, alone=True):
            super().run(batch, alone)
            raise ValueError("boom")

    batcher, model = Batcher(lanes=1, max_batch=8), Failing()
    with pytest.raises(ValueError, match="boom"):
        batcher.predict(model, [1.0])
    assert batcher.predict(RecordingModel(), [2.0])[0].tolist() == [[2.0, -2.0]]  # the lane was released


def test_stand_in_predictors_without_prepare_are_answered_directly():
    class Plain:
        def predict_probs(self, images):
            return [[0.25, 0.75]] * len(images)

    probs, feats = Batcher().predict(Plain(), ["a", "b"])
    assert probs.shape == (2, 2) and feats is None


def test_concurrent_callers_get_exactly_their_own_answers(demo_predictor):
    """The real ONNX predictor, 12 threads at once: each answer equals the same image predicted alone."""
    from tests.learners import golden_images

    images = golden_images() * 2
    expected_probs, expected_feats = demo_predictor.predict(images)
    batcher, out = Batcher(lanes=2, max_batch=4), {}
    threads = _start(batcher, demo_predictor, {i: [im] for i, im in enumerate(images)}, out)
    for t in threads:
        t.join(60)
    got_probs = np.concatenate([out[i][0] for i in range(len(images))])
    got_feats = np.concatenate([out[i][1] for i in range(len(images))])
    assert np.abs(got_probs - expected_probs).max() <= 1e-5
    assert np.abs(got_feats - expected_feats).max() <= 1e-4


@pytest.mark.parametrize(("env", "plan"), [
    ({}, (4, 4, 1)),  # alone: every core; under load: a 1-thread lane per core
    ({"intra_op_threads": 1}, (1, 4, 1)),  # a busy box: never more than one thread per forward
    ({"model_workers": 1}, (4, 1, 4)),  # one session with every core for everything
    ({"intra_op_threads": 4, "model_workers": 2}, (4, 2, 2)),
])
def test_thread_plan_from_settings(env, plan, tmp_path):
    from model.predictor import ThreadPlan
    from settings import Settings

    got = ThreadPlan.from_settings(Settings(data_dir=tmp_path, **env), cores=4)
    assert (got.threads, got.lanes, got.lane_threads) == plan
