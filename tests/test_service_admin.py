"""The operator's page GET /admin on a real `muxtune serve`: who may open it (an operator key from
`muxtune keys create --admin`, through a login form and a session cookie; a tenant's key gets 403 on
the page and its API), what its API reports about the running service, and the page itself rendering
the service's jobs in headless Chromium with no console output (the page logs nothing; any line is an
error or a failed load)."""

import os
import re
import shutil
import subprocess
import time

import httpx
import pytest
from service_harness import MODEL, client, data_files, serve, wait_done

from muxtune.profiler.profile import REPO_PROFILES

PROFILE = next(REPO_PROFILES.glob("cpu-*-tiny-llama.csv"))
CONFIG = f"threads: 1\nprofile: {PROFILE}\nmemory_limit_gib: 2\n"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def upload(api, path):
    with open(path, "rb") as handle:
        return api.files.create(file=handle, purpose="fine-tune")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A service with one finished job (acme, validated every 2 steps) and one still running (globex)."""
    root = tmp_path_factory.mktemp("admin")
    server, keys = serve(root, CONFIG, admin=True)
    jobs = {}
    for org, epochs in (("acme", 2), ("globex", 400)):
        api = client(server, keys[org])
        train, valid = data_files(root / org, seed=len(jobs) + 1)
        jobs[org] = api.fine_tuning.jobs.create(
            model=MODEL, training_file=upload(api, train).id, validation_file=upload(api, valid).id, seed=1,
            hyperparameters={"n_epochs": epochs, "batch_size": 4}, extra_body={"max_seq_len": 64, "eval_every": 2}).id
    assert wait_done(client(server, keys["acme"]), jobs["acme"]).status == "succeeded"
    running = client(server, keys["globex"])
    deadline = time.time() + 120
    while not any(e.type == "metrics" for e in running.fine_tuning.jobs.list_events(jobs["globex"], limit=5).data):
        assert time.time() < deadline, server.logs()
        time.sleep(0.3)
    yield server, keys, jobs
    client(server, keys["globex"]).fine_tuning.jobs.cancel(jobs["globex"])
    server.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_a_tenant_key_gets_403_on_the_page_and_its_api_and_no_key_gets_the_login_form(service):
    server, keys, _ = service
    for path in ("/admin", "/admin/api/state"):
        answer = httpx.get(server.url + path, headers=bearer(keys["acme"]))
        assert answer.status_code == 403, (path, answer.text)
    assert httpx.post(server.url + "/admin/login", data={"key": keys["acme"]}).status_code == 403
    assert httpx.get(server.url + "/admin/api/state").status_code == 401
    assert httpx.get(server.url + "/admin/api/state", headers=bearer("sk-mux-made-up")).status_code == 401
    page = httpx.get(server.url + "/admin")
    assert page.status_code == 200 and 'action="/admin/login"' in page.text and "admin.js" not in page.text
    wrong = httpx.post(server.url + "/admin/login", data={"key": "sk-mux-made-up"})
    assert wrong.status_code == 401 and "Not a live operator key" in wrong.text
    # and the operator's key is no tenant's: the /v1 API refuses it
    assert httpx.get(server.url + "/v1/fine_tuning/jobs", headers=bearer(keys["admin"])).status_code == 401


def test_the_login_form_keeps_the_key_out_of_the_url_in_an_httponly_session_cookie(service):
    server, keys, _ = service
    answer = httpx.post(server.url + "/admin/login", data={"key": keys["admin"]}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/admin"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower() and keys["admin"] not in cookie
    session = httpx.Client(base_url=server.url, cookies=answer.cookies)
    page = session.get("/admin")
    assert page.status_code == 200 and "/admin/static/admin.js" in page.text
    assert session.get("/admin/static/admin.js").headers["content-type"].startswith("text/javascript")
    assert session.get("/admin/api/state").status_code == 200
    session.post("/admin/logout")
    assert httpx.get(server.url + "/admin/api/state", cookies=answer.cookies).status_code == 401


def test_the_state_api_shows_backbones_queue_memory_organisations_and_curves(service):
    server, keys, jobs = service
    state = httpx.get(server.url + "/admin/api/state", headers=bearer(keys["admin"])).json()
    backbone, = state["backbones"]
    assert backbone["model"] == MODEL and backbone["tenants"] == [jobs["globex"]]
    assert [jobs["globex"]] in backbone["groups"] and backbone["steps"] > 0
    assert 0 < backbone["memory_bytes"] and backbone["memory_limit_bytes"] == 2 * 2**30
    assert state["organisations"] == {"acme": {"succeeded": 1}, "globex": {"running": 1}}
    assert state["queue"] == []
    by_id = {j["id"]: j for j in state["jobs"]}
    finished = by_id[jobs["acme"]]["curve"]  # 12 examples x 2 epochs / batch 4: 6 steps, validated every 2nd
    assert [p[0] for p in finished] == [1, 2, 3, 4, 5, 6] and all(p[1] > 0 for p in finished)
    assert [p[0] for p in finished if p[2] is not None] == [2, 4, 6]
    assert by_id[jobs["globex"]]["curve"] and by_id[jobs["globex"]]["method"] == "lora"


def login_page(tmp_path, server, key) -> str:
    """A local page that posts the operator key to the login form, as a person would type it."""
    page = tmp_path / "login.html"
    page.write_text(f'<form id="f" method="post" action="{server.url}/admin/login"><input name="key" value="{key}">'
                    '</form><script>document.getElementById("f").submit()</script>')
    return page.as_uri()


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=6000", "--enable-logging=stderr",
             "--v=0", f"--user-data-dir={tmp_path / 'chromium'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_the_page_renders_the_running_services_jobs_in_headless_chromium(service, tmp_path):
    server, keys, jobs = service
    done = chromium(tmp_path, "--dump-dom", login_page(tmp_path, server, keys["admin"]))
    dom = done.stdout
    assert 'data-rendered="2"' in dom, dom[-3000:] + done.stderr[-3000:]
    assert set(re.findall(r'data-job="([^"]+)"', dom)) == set(jobs.values())
    assert f'group 1: {jobs["globex"]}' in dom and "MiB of 2048 MiB" in dom
    assert len(re.findall(r'<polyline[^>]*class="series"', dom)) >= 3  # train + validation, and the running job's
    assert ">acme<" in dom and ">globex<" in dom  # jobs per organisation
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    shot = tmp_path / "admin.png"
    chromium(tmp_path, "--window-size=1100,900", f"--screenshot={shot}", login_page(tmp_path, server, keys["admin"]))
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    assert pixels.size == (1100, 900) and pixels.getextrema()[0] < 100  # text and lines drawn, not blank
    if os.environ.get("MUXTUNE_ADMIN_SCREENSHOT"):  # docs/img/admin.png is made this way (palette PNG, small)
        Image.open(shot).convert("RGB").quantize(64).save(os.environ["MUXTUNE_ADMIN_SCREENSHOT"], optimize=True)
