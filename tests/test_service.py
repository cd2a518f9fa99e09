"""The fine-tuning service against a real `muxtune serve` on 127.0.0.1, driven by the official `openai`
client: a whole job, two organisations' concurrent jobs, isolation, bad input, retries, kill -9."""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from service_harness import (ENV, MODEL, Server, adapter_tensors, alone, client, data_files, download_adapter,
                             make_key, metrics_steps, serve, wait_done)

from muxtune.profiler.profile import REPO_PROFILES

# the planner prices with the repo's stored profile as it is (the calibrated lookup may rightly refuse
# it on a busy test machine, and then nothing would be planned: tests/test_service_planning.py has that)
PROFILE = next(REPO_PROFILES.glob("cpu-*-tiny-llama.csv"))
# plan_in_background off: these jobs end in a few steps, and every one of them is checked for its estimate
# (in the background the planner may answer after a short job has ended; tests/test_service_admin.py runs it on)
CONFIG = (f"threads: 1\nprofile: {PROFILE}\nplan_in_background: false\n"
          "limits: {upload_bytes: 20000, jobs_per_minute: 30, running_jobs: 8}\n")
JOB = dict(hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 5},
           extra_body={"max_seq_len": 64, "eval_every": 2})


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    server, keys = serve(tmp_path_factory.mktemp("service"), CONFIG)
    yield server, keys
    server.stop()


def upload(api, path):
    with open(path, "rb") as handle:
        return api.files.create(file=handle, purpose="fine-tune")


def test_openai_client_runs_a_whole_job(service, tmp_path):
    server, keys = service
    api = client(server, keys["acme"])
    train, valid = data_files(tmp_path / "data", seed=1)
    training, validation = upload(api, train), upload(api, valid)
    assert api.files.retrieve(training.id).bytes == train.stat().st_size
    assert api.files.content(training.id).content == train.read_bytes()
    job = api.fine_tuning.jobs.create(model=MODEL, training_file=training.id, validation_file=validation.id,
                                      seed=3, suffix="demo", metadata={"team": "search"}, **JOB)
    assert job.status == "validating_files" and job.organization_id == "acme" and job.seed == 3
    assert job.max_seq_len == 64 and job.eval_every == 2 and job.peft["method"] == "lora"  # MuxTune's fields echoed
    job = wait_done(api, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{MODEL}:acme:demo:{job.id}" and job.trained_tokens > 0
    assert job.metadata == {"team": "search"} and job.hyperparameters.n_epochs == 2

    # events: 12 examples x 2 epochs / batch 4 = 6 steps, each with one metrics event; validation every 2
    events = api.fine_tuning.jobs.list_events(job.id, limit=1000).data
    metrics = {e.data["step"]: e.data for e in events if e.type == "metrics"}
    assert metrics_steps(api, job.id) == [1, 2, 3, 4, 5, 6]
    assert set(metrics[2]) >= {"step", "train_loss", "valid_loss", "train_mean_token_accuracy",
                               "valid_mean_token_accuracy"}
    assert metrics[2]["valid_loss"] is not None and metrics[3]["valid_loss"] is None
    assert any(e.type == "message" and "successfully completed" in e.message for e in events)
    assert any(e.message.startswith("Estimated finish in ") for e in events)  # the simulator's, at its start
    page = api.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more and page.data[0].created_at >= page.data[-1].created_at
    checkpoints = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sorted(c.step_number for c in checkpoints) == [2, 4, 6]
    assert all(c.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model) for c in checkpoints)

    # the results CSV is a file of purpose fine-tune-results, one row per step
    results = api.files.retrieve(job.result_files[0])
    assert results.purpose == "fine-tune-results"
    rows = api.files.content(results.id).text.strip().splitlines()
    assert rows[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy" and len(rows) == 7

    # the adapter: a zip PeftModel loads, equal to the same task trained alone by the executor
    folder = download_adapter(server, keys["acme"], job.id, tmp_path / "adapter")
    reference = alone(job, train, valid, tmp_path / "alone")
    got = adapter_tensors(folder)
    assert set(got) == set(reference)
    for key, value in reference.items():
        assert torch.equal(got[key], value), key  # it trained alone on the backbone: bit for bit
    from peft import PeftModel

    from muxtune.executor.backbone import load_backbone

    model = PeftModel.from_pretrained(load_backbone(MODEL).model, str(folder))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(reference)

    listed = api.fine_tuning.jobs.list(limit=100).data
    assert job.id in [j.id for j in listed]


def test_two_organisations_six_concurrent_jobs_each_equal_to_its_alone_run(service, tmp_path):
    server, keys = service
    apis = {org: client(server, key) for org, key in keys.items()}
    specs = [("acme", 11), ("globex", 12), ("acme", 13), ("globex", 14), ("acme", 15), ("globex", 16)]
    files = {seed: data_files(tmp_path / "data", seed) for _, seed in specs}

    def create(org_seed):
        org, seed = org_seed
        train, valid = files[seed]
        api = apis[org]
        return api.fine_tuning.jobs.create(model=MODEL, training_file=upload(api, train).id,
                                           validation_file=upload(api, valid).id, seed=seed, **JOB)

    with ThreadPoolExecutor(6) as pool:
        jobs = list(pool.map(create, specs))
    done = [wait_done(apis[org], job.id) for (org, _), job in zip(specs, jobs)]
    assert [j.status for j in done] == ["succeeded"] * 6, [j.error for j in done]
    # they shared one backbone: some job joined while another trained
    joined = [e.message for (org, _), j in zip(specs, done) for e in apis[org].fine_tuning.jobs.list_events(j.id, limit=1000).data
              if "joined" in e.message]
    assert any("with 0 other" not in m for m in joined), joined
    # the planner grouped them as they came and went, and the simulator estimated each one's finish
    for (org, _), j in zip(specs, done):
        estimates = [e.message for e in apis[org].fine_tuning.jobs.list_events(j.id, limit=1000).data
                     if e.message.startswith("Estimated finish in ")]
        assert estimates and all(m.endswith("(planner)") for m in estimates), estimates

    for (org, seed), job in zip(specs, done):
        other = apis["globex" if org == "acme" else "acme"]
        got = adapter_tensors(download_adapter(server, keys[org], job.id, tmp_path / "adapters" / job.id))
        reference = alone(job, *files[seed], tmp_path / "alone" / job.id)
        for key, value in reference.items():  # multiplexed with neighbours: as the executor's join test
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)
        # the other organisation sees nothing of it
        for call in (lambda: other.fine_tuning.jobs.retrieve(job.id),
                     lambda: other.fine_tuning.jobs.list_events(job.id),
                     lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
                     lambda: other.fine_tuning.jobs.cancel(job.id),
                     lambda: other.files.retrieve(job.training_file),
                     lambda: other.files.content(job.result_files[0])):
            with pytest.raises(openai.NotFoundError):
                call()
        answer = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}/adapter",
                           headers={"Authorization": f"Bearer {keys['globex' if org == 'acme' else 'acme']}"})
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
        assert job.id not in [j.id for j in other.fine_tuning.jobs.list(limit=100).data]


def test_retried_creation_with_an_idempotency_key_makes_one_job(service, tmp_path):
    server, keys = service
    api = client(server, keys["acme"])
    train, _ = data_files(tmp_path / "data", seed=21, n=4)
    training = upload(api, train)
    before = len(api.fine_tuning.jobs.list(limit=1000).data)
    headers = {"Idempotency-Key": "retry-me-1"}
    jobs = [api.fine_tuning.jobs.create(model=MODEL, training_file=training.id, extra_headers=headers,
                                        hyperparameters={"n_epochs": 1, "batch_size": 4}) for _ in range(3)]
    assert len({j.id for j in jobs}) == 1
    assert len(api.fine_tuning.jobs.list(limit=1000).data) == before + 1
    # the same key from another organisation is another request
    other = client(server, keys["globex"]).fine_tuning.jobs
    with pytest.raises(openai.BadRequestError):  # and it cannot name acme's file
        other.create(model=MODEL, training_file=training.id, extra_headers=headers)
    assert wait_done(api, jobs[0].id).status == "succeeded"


def test_bad_input_answers_openai_errors(service, tmp_path):
    server, keys = service
    api = client(server, keys["acme"])
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-mux-not-a-key").files.list()
    answer = httpx.get(f"{server.url}/v1/fine_tuning/jobs")
    assert answer.status_code == 401 and set(answer.json()["error"]) == {"message", "type", "param", "code"}

    train, _ = data_files(tmp_path / "data", seed=31)
    with pytest.raises(openai.BadRequestError) as wrong:
        with open(train, "rb") as handle:
            api.files.create(file=handle, purpose="assistants")
    assert wrong.value.body["param"] == "purpose"
    big = tmp_path / "big.jsonl"
    big.write_text('{"prompt": "a", "completion": "b"}\n' * 1000)  # 35 kB > the 20 kB limit
    with pytest.raises(openai.APIStatusError) as oversize:
        upload(api, big)
    assert oversize.value.status_code == 413

    training = upload(api, train)
    with pytest.raises(openai.BadRequestError) as unknown:
        api.fine_tuning.jobs.create(model="builtin:gpt-9", training_file=training.id)
    assert unknown.value.body["param"] == "model" and unknown.value.body["code"] == "model_not_available"
    with pytest.raises(openai.BadRequestError) as bad:
        api.fine_tuning.jobs.create(model=MODEL, training_file=training.id, hyperparameters={"batch_size": 0})
    assert bad.value.body["param"] == "hyperparameters.batch_size"
    with pytest.raises(openai.BadRequestError):
        api.fine_tuning.jobs.create(model=MODEL, training_file="file-000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.retrieve("ftjob-../../etc/passwd")

    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "a b", "completion": " c"}\n{"prompt": "d", "completion": " e"}\n{"prompt": 3,\n')
    bad_file = upload(api, malformed)
    job = wait_done(api, api.fine_tuning.jobs.create(model=MODEL, training_file=bad_file.id).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert f"{bad_file.id}:3" in job.error.message, job.error.message  # the file and its line
    assert job.error.param == "training_file"
    # a results file is not training data
    done = [j for j in api.fine_tuning.jobs.list(limit=100).data if j.result_files]
    if done:
        with pytest.raises(openai.BadRequestError) as purpose:
            api.fine_tuning.jobs.create(model=MODEL, training_file=done[0].result_files[0])
        assert purpose.value.body["code"] == "invalid_file_purpose"


def test_pause_then_resume_continues_where_it_stopped(service, tmp_path):
    server, keys = service
    api = client(server, keys["acme"])
    train, _ = data_files(tmp_path / "data", seed=41, n=40)
    job = api.fine_tuning.jobs.create(model=MODEL, training_file=upload(api, train).id, seed=41,
                                      hyperparameters={"n_epochs": 2, "batch_size": 2}, extra_body={"max_seq_len": 64})
    while not metrics_steps(api, job.id):
        time.sleep(0.05)
    paused = api.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    at = metrics_steps(api, job.id)[-1]
    time.sleep(1.0)
    assert metrics_steps(api, job.id)[-1] == at < 40  # it does not train while paused
    assert api.fine_tuning.jobs.resume(job.id).status == "queued"
    job = wait_done(api, job.id)
    assert job.status == "succeeded" and metrics_steps(api, job.id) == list(range(1, 41))
    got = adapter_tensors(download_adapter(server, keys["acme"], job.id, tmp_path / "adapter"))
    reference = alone(job, train, None, tmp_path / "alone")
    assert all(torch.equal(got[k], v) for k, v in reference.items())


def test_kill_9_of_server_and_worker_loses_nothing_and_resumes_bit_equal(tmp_path):
    server = Server(tmp_path / "state", "threads: 1\nlimits: {jobs_per_minute: 1}\n")
    server.state.mkdir()
    key = make_key(server.state, "acme")
    server.start()
    try:
        api = client(server, key)
        train, valid = data_files(tmp_path / "data", seed=51, n=48)
        training, validation = upload(api, train), upload(api, valid)
        job = api.fine_tuning.jobs.create(model=MODEL, training_file=training.id, validation_file=validation.id,
                                          seed=51, hyperparameters={"n_epochs": 2, "batch_size": 4},
                                          extra_body={"max_seq_len": 64, "eval_every": 5})
        with pytest.raises(openai.RateLimitError):  # one job creation a minute here
            api.fine_tuning.jobs.create(model=MODEL, training_file=training.id)
        # 1. the worker alone dies mid-training: the server starts another, which resumes
        while len(metrics_steps(api, job.id)) < 3:
            time.sleep(0.02)
        first = server.worker_pid()
        os.kill(first, signal.SIGKILL)
        deadline = time.time() + 120
        while (server.worker_pid() in (None, first) or len(metrics_steps(api, job.id)) < 10) and time.time() < deadline:
            time.sleep(0.02)
        assert api.fine_tuning.jobs.retrieve(job.id).status == "running", server.logs()
        # 2. server and worker both die; a new `muxtune serve` on the same folder finishes the job
        server.kill9()
    finally:
        server.stop()
    restarted = Server(tmp_path / "state", "threads: 1\n").start()
    try:
        api = client(restarted, key)
        assert api.files.retrieve(training.id).bytes == train.stat().st_size
        assert api.files.content(validation.id).content == valid.read_bytes()
        job = wait_done(api, job.id)
        assert job.status == "succeeded", (job.error, restarted.logs())
        assert metrics_steps(api, job.id) == list(range(1, 25))  # every step once: no event duplicated
        events = api.fine_tuning.jobs.list_events(job.id, limit=1000).data
        messages = [e.message for e in events]
        assert len(messages) == len(set(messages)), messages
        assert sum("resuming from the checkpoint" in m for m in messages) >= 2  # both crashes were resumed
        assert len(api.fine_tuning.jobs.list().data) == 1
        got = adapter_tensors(download_adapter(restarted, key, job.id, tmp_path / "adapter"))
        reference = alone(job, train, valid, tmp_path / "alone")
        for name, value in reference.items():
            assert torch.equal(got[name], value), name  # as if never interrupted, bit for bit
    finally:
        restarted.stop()


def test_keys_are_shown_once_stored_hashed_and_revocable(tmp_path, capsys):
    from muxtune.cli import main
    from muxtune.service.store import Store

    state = tmp_path / "state"
    assert main(["keys", "create", "--state", str(state), "--org", "acme"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-mux-")
    assert main(["keys", "list", "--state", str(state)]) == 0
    listed = capsys.readouterr().out
    assert "org=acme" in listed and key not in listed
    for path in state.rglob("*"):  # only its hash is kept (database, its WAL, anything else)
        assert not path.is_file() or key.encode() not in path.read_bytes(), path
    store = Store(state)
    assert store.org_of_key(key) == "acme"
    key_id = listed.split()[0]
    assert main(["keys", "revoke", key_id, "--state", str(state), "--org", "globex"]) == 2  # not theirs
    assert main(["keys", "revoke", key_id, "--state", str(state), "--org", "acme"]) == 0
    assert store.org_of_key(key) is None
    assert main(["keys", "create", "--state", str(state), "--org", "../etc"]) == 2


def test_cancel_a_running_job_stops_it_at_a_step_boundary(service, tmp_path):
    server, keys = service
    api = client(server, keys["globex"])
    train, _ = data_files(tmp_path / "data", seed=61, n=40)
    job = api.fine_tuning.jobs.create(model=MODEL, training_file=upload(api, train).id,
                                      hyperparameters={"n_epochs": 3, "batch_size": 2}, extra_body={"max_seq_len": 64})
    while not metrics_steps(api, job.id):
        time.sleep(0.05)
    cancelled = api.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    steps = metrics_steps(api, job.id)
    time.sleep(0.5)
    assert metrics_steps(api, job.id) == steps and steps[-1] < 60
    with pytest.raises(openai.BadRequestError):  # nothing to cancel twice, no adapter
        api.fine_tuning.jobs.cancel(job.id)
    answer = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}/adapter",
                       headers={"Authorization": f"Bearer {keys['globex']}"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_job_state"


def test_service_config_is_validated_naming_file_line_and_key(tmp_path):
    from muxtune.errors import MuxTuneError
    from muxtune.service.config import load_service_config

    path = tmp_path / "service.yaml"
    path.write_text("models: [builtin:tiny-llama]\nlimits:\n  upload_bytes: 0\nmax_tennants: 3\n")
    with pytest.raises(MuxTuneError) as bad:
        load_service_config(path)
    assert f"{path}:3: limits.upload_bytes" in str(bad.value) and f"{path}:4: max_tennants: unknown key" in str(bad.value)
    assert load_service_config(None).models == [MODEL]


# Loaded by every Python process started with it on PYTHONPATH: the trainer's step raises, so the real
# worker loads, admits the job, and dies on its first step, every time it is restarted.
CRASHING_STEP = '''
import importlib.abc, importlib.util, sys

class CrashOnStep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "muxtune.executor.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            def step(trainer):
                raise RuntimeError("injected crash in a training step")
            module.MultiplexedTrainer.step = step
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, CrashOnStep())
'''


def test_a_worker_crashing_on_every_step_is_backed_off_then_its_jobs_fail(tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(CRASHING_STEP)
    env = {**ENV, "PYTHONPATH": str(inject)}
    server = Server(tmp_path / "state", "threads: 1\nworker_crashes: 3\nrestart_backoff_s: 0.2\n", env=env)
    server.state.mkdir()
    key = make_key(server.state, "acme")
    server.start()
    try:
        api = client(server, key)
        train, _ = data_files(tmp_path / "data", seed=61, n=4)
        job = api.fine_tuning.jobs.create(model=MODEL, training_file=upload(api, train).id, seed=61,
                                          hyperparameters={"n_epochs": 2, "batch_size": 4})
        job = wait_done(api, job.id, timeout=180)
        assert job.status == "failed" and job.error.code == "worker_crashed", job.error
        assert "crashed 3 times in a row" in job.error.message and "injected crash" in job.error.message
        assert metrics_steps(api, job.id) == []  # no step was ever completed
        logs = server.logs()
        assert "restarting in 0.2 s" in logs and "restarting in 0.4 s" in logs, logs
    finally:
        server.stop()
