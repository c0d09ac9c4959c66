"""The real user paths in a real browser: Materialize all in the Dagster UI, review in the MLflow UI.

Starts `dagster dev` (workspace.yaml, a temporary DAGSTER_HOME) and `mlflow server` on loopback,
drives headless Debian Chromium with Playwright, and keeps screenshots in test-artifacts/e2e/
(and in $SFT_PIPELINE_SCREENSHOTS_DIR when set, which is how docs/screenshots/ is refreshed).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "Chromium is not installed, so the browser test cannot run: `make test` installs Debian's "
        "`chromium` with apt-get when it runs as root; install it by hand elsewhere.",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the `playwright` package (test extra) is not installed")

# Flags this closed-network machine needs: without the background-networking ones Chromium
# keeps trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
RUN_TIMEOUT_S = 900
MODEL_NAME = "sft_pipeline_model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    # A session of its own, so the whole tree (dagster dev spawns a webserver, a daemon and
    # code servers) is stopped together.
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def graphql(base: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


def wait_for_run(base: str, run_id: str) -> str:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        status = graphql(base, "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(5)
    return status


@pytest.fixture(scope="module")
def screenshots():
    folder = REPO / "test-artifacts" / "e2e"
    folder.mkdir(parents=True, exist_ok=True)
    extra = os.environ.get("SFT_PIPELINE_SCREENSHOTS_DIR")

    def save(page, name: str, **kwargs) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), **kwargs)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)
        return path

    return save


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiny_model_dir):
    """dagster dev and mlflow server on free loopback ports, the pipeline pointed at the tiny model."""
    home = tmp_path_factory.mktemp("project")
    dagster_home = home / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", dagster_home / "dagster.yaml")
    logs = home / "logs"
    logs.mkdir()
    mlflow_port, dagster_port = free_port(), free_port()
    mlflow_url, dagster_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{dagster_port}"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "SFT_PIPELINE_HOME": str(home),
        "SFT_PIPELINE_BASE_MODEL": str(tiny_model_dir),
        "MLFLOW_TRACKING_URI": mlflow_url,
        # The nightly schedule ticks every minute here, on the raw-data folder below.
        "SFT_PIPELINE_RETRAIN_CRON": "* * * * *",
        "SFT_PIPELINE_RAW_DIR": str(home / "raw"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    bin_dir = Path(sys.executable).parent
    mlflow = start(
        [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow_server.db'}",
         "--artifacts-destination", str(home / "mlflow_artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--workers", "1"],
        env, logs / "mlflow.log",
    )
    dagster = start(
        [str(bin_dir / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(dagster_port)],
        env, logs / "dagster.log",
    )
    try:
        wait_for(f"{mlflow_url}/health", 120, mlflow, logs / "mlflow.log")
        wait_for(f"{dagster_url}/server_info", 180, dagster, logs / "dagster.log")
        yield {"dagster": dagster_url, "mlflow": mlflow_url, "home": home, "env": env, "logs": logs, "raw": home / "raw"}
    finally:
        stop(dagster)
        stop(mlflow)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(url)
    # A fresh instance greets first-time visitors with a newsletter dialog.
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=5000)
        skip.click()
    except sync_api.TimeoutError:
        pass
    return page


def visible(locator):
    """Only the visible matches: the UI keeps hidden copies of long names to measure them."""
    return locator.filter(visible=True)


def show_markdown(page, key: str):
    """Open the Markdown value of metadata entry `key` on an asset page; returns the dialog."""
    row = visible(page.locator("tr", has=page.get_by_text(key, exact=True))).first
    row.get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    return dialog


def close_dialog(page):
    page.keyboard.press("Escape")
    page.get_by_role("dialog").wait_for(state="detached")


def test_materialize_all_in_dagster_then_review_in_mlflow(services, browser, screenshots):
    dagster, mlflow = services["dagster"], services["mlflow"]

    page = open_page(browser, f"{dagster}/asset-groups")
    materialize = page.get_by_role("button", name="Materialize all")
    materialize.wait_for(timeout=60_000)
    screenshots(page, "asset_graph")
    materialize.click()
    page.get_by_text("Launched run").wait_for(timeout=60_000)
    run_link = page.locator("a[href^='/runs/']").first
    run_id = run_link.get_attribute("href").split("/runs/")[1].split("?")[0]

    status = wait_for_run(dagster, run_id)
    assert status == "SUCCESS", (services["logs"] / "dagster.log").read_text()[-5000:]

    page.goto(f"{dagster}/runs/{run_id}")
    visible(page.get_by_text("Success", exact=True)).first.wait_for(timeout=60_000)
    visible(page.get_by_text("registered_model")).first.wait_for()
    screenshots(page, "finished_run")

    # Every asset check passed, blocking data checks included.
    page.goto(f"{dagster}/assets/clean_instructions?view=checks")
    for check in ("clean_instructions_match_expectations", "every_record_accounted_for"):
        visible(page.get_by_text(check)).first.wait_for(timeout=60_000)
    assert visible(page.get_by_text("Succeeded", exact=True)).count() == 2
    assert visible(page.get_by_text("Failed", exact=True)).count() == 0
    visible(page.get_by_text("Passed", exact=True)).first.wait_for()

    # Metadata renders: a table inline, and plots.
    page.goto(f"{dagster}/assets/clean_instructions")
    balance = visible(page.locator("tr", has=page.get_by_text("category_balance", exact=True))).first
    balance.wait_for(timeout=60_000)
    for category in ("open_qa", "closed_qa", "classification", "summarization", "information_extraction",
                     "brainstorming", "creative_writing", "code"):
        assert balance.get_by_text(category, exact=True).count() == 1, category
    screenshots(page, "clean_instructions_metadata", full_page=True)
    dialog = show_markdown(page, "conversation_chars")
    histogram = dialog.locator("img[src^='data:image/png']")
    histogram.wait_for()
    assert histogram.evaluate("img => img.naturalWidth") > 100
    close_dialog(page)
    page.goto(f"{dagster}/assets/fine_tuned_model")
    visible(page.get_by_text("train_loss", exact=True)).first.wait_for(timeout=60_000)
    dialog = show_markdown(page, "loss_curve")
    plot = dialog.locator("img[src^='data:image/png']")
    plot.wait_for()
    assert plot.evaluate("img => img.naturalWidth") > 100
    screenshots(page, "loss_curve")
    close_dialog(page)

    # The MLflow UI shows the registered version and its alias.
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(f"{mlflow}/#/models/{MODEL_NAME}")
    visible(page.get_by_text("Version 1")).first.wait_for(timeout=60_000)
    visible(page.get_by_text("candidate")).first.wait_for()
    screenshots(page, "mlflow_model")
    page.goto(f"{mlflow}/#/models/{MODEL_NAME}/versions/1")
    visible(page.get_by_text("dagster_run_id")).first.wait_for(timeout=60_000)
    assert page.get_by_text(run_id).count() >= 1
    screenshots(page, "mlflow_model_version")


SCHEDULE_RUNS = """
query($name: String!) {
  runsOrError(filter: {tags: [{key: "dagster/schedule_name", value: $name}]}) {
    ... on Runs { results { runId status } }
  }
}
"""
START_SCHEDULE = """
mutation($selector: ScheduleSelector!) {
  startSchedule(scheduleSelector: $selector) {
    __typename
    ... on PythonError { message }
  }
}
"""


def test_nightly_schedule_tick_launches_a_successful_retrain(services, browser, screenshots):
    """New raw data lands, the schedule is switched on, and the daemon's own tick retrains."""
    dagster = services["dagster"]
    raw = services["raw"]
    raw.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "sft_pipeline" / "data" / "seed_alpaca.jsonl", raw / "support_batch_1.jsonl")

    selector = {"repositoryLocationName": "sft_pipeline.definitions", "repositoryName": "__repository__",
                "scheduleName": "nightly_retraining"}
    started = graphql(dagster, START_SCHEDULE, {"selector": selector})["startSchedule"]
    assert started["__typename"] == "ScheduleStateResult", started

    page = open_page(browser, f"{dagster}/automation")
    visible(page.get_by_text("nightly_retraining")).first.wait_for(timeout=60_000)
    screenshots(page, "automation")

    deadline = time.monotonic() + 300
    runs = []
    while time.monotonic() < deadline and not runs:
        runs = graphql(dagster, SCHEDULE_RUNS, {"name": "nightly_retraining"})["runsOrError"]["results"]
        time.sleep(5)
    assert runs, "the schedule did not launch a run within 5 minutes:\n" + (services["logs"] / "dagster.log").read_text()[-5000:]
    status = wait_for_run(dagster, runs[-1]["runId"])
    assert status == "SUCCESS", (services["logs"] / "dagster.log").read_text()[-5000:]
