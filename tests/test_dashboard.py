import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bolaco import search
from test_search import tiny_workspace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_dashboard_lists_the_study_and_trial_user_attrs(tmp_path):
    ws, comp = tiny_workspace(tmp_path)
    search.run(ws, comp, create=True, trials=2, artifacts=str(tmp_path / "artifacts"))
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(f"name: tiny\nstorage: {ws.study.storage}\n")
    port = _free_port()
    bolaco = Path(sys.executable).with_name("bolaco")
    proc = subprocess.Popen([str(bolaco), "dashboard", "--study", str(study_file), "--port", str(port),
                             "--artifact-dir", str(tmp_path / "artifacts")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        end = time.time() + 60
        while True:
            try:
                studies = _get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                break
            except OSError:
                assert time.time() < end and proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["tiny-botorch"]
        assert "sqlite" not in Path(f"/proc/{proc.pid}/cmdline").read_text()   # the URL is on no command line
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}")
        assert len(detail["trials"]) == 2
        attrs = {a["key"]: a["value"] for a in detail["trials"][0]["user_attrs"]}
        assert {"levels", "params", "removed", "search_ppl", "seconds_apply", "proposal"} <= set(attrs)
        assert float(attrs["search_nll"]) == detail["trials"][0]["values"][0]
        assert [a["mimetype"] for a in detail["trials"][0]["artifacts"]] == ["image/png"]   # the heat map
    finally:
        os.kill(proc.pid, signal.SIGTERM)   # the dashboard runs under the PID that bolaco started with
        code = proc.wait(timeout=20)
    assert code == -signal.SIGTERM        # it served until it was stopped
