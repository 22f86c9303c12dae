"""The tracking-store preflight (`jobs.tracking_store.check_store`) and MLflow's HTTP settings, on real
sockets and stores (no MLflow server needed; the server-side cases are in tests/test_server.py).

    .venv/bin/python -m pytest -q tests/test_tracking_store.py
"""
import http.server
import os
import socket
import threading
import time

import pytest

from jobs.tracking_store import StoreError, bounded_http, check_store, http_settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_listener():
    """A port that accepts connections (the kernel's backlog) but never answers: a hung server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def web_server():
    """A real HTTP server that is not MLflow (Python's file server: 404 on /health)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_server_that_is_down_is_a_one_line_error_naming_the_fix():
    with pytest.raises(StoreError, match=r"no MLflow server answers at .*connection refused.*server start") as e:
        check_store(f"http://127.0.0.1:{_free_port()}/")
    assert "\n" not in str(e.value)


def test_a_server_that_does_not_answer_is_given_up_after_the_timeout(silent_listener):
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"did not answer within 1 s"):
        check_store(silent_listener, timeout_s=1)
    assert time.monotonic() - t0 < 15  # bounded by the timeout, not by MLflow's ~250 s of retries


def test_a_url_that_answers_but_is_not_mlflow(web_server):
    with pytest.raises(StoreError, match=r"answers but is not an MLflow tracking server \(GET /health gave HTTP 404"):
        check_store(web_server)


def test_a_sqlite_store_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"is a file, not a folder.*--tracking-uri"):
        check_store(f"sqlite:///{blocker}/sub/mlflow.db")
    if os.geteuid() != 0:  # root writes through permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(StoreError, match=r"not writable"):
            check_store(f"sqlite:///{locked}/mlflow.db")


def test_a_writable_sqlite_store_passes_and_nothing_is_written(tmp_path):
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    assert check_store(uri) == uri
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_database_uri():
    with pytest.raises(StoreError, match=r"cannot reach the database postgresql\+psycopg2://u:\*\*\*@127\.0\.0\.1"):
        check_store(f"postgresql+psycopg2://u:secret@127.0.0.1:{_free_port()}/mlflow")


def test_http_settings_leave_the_users_choices_alone():
    assert http_settings(environ={})["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    mine = http_settings(retries=2, timeout_s=10, environ={"MLFLOW_HTTP_REQUEST_TIMEOUT": "300"})
    assert mine == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}


def test_mlflow_fails_fast_on_a_dead_server_under_bounded_http(monkeypatch):
    """MLflow's own client, inside bounded_http(): an error at once instead of ~250 s of retries."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    client = MlflowClient(f"http://127.0.0.1:{_free_port()}")
    t0 = time.monotonic()
    with bounded_http(retries=0, timeout_s=5):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        with pytest.raises(MlflowException, match="Connection refused|Max retries"):
            client.get_experiment_by_name("x")
    assert time.monotonic() - t0 < 15
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # restored


def test_a_sqlite_store_on_a_network_file_system_is_warned_about(tmp_path):
    """A mount table written for the test (a stand-in: no NFS server here), read as /proc/mounts would be."""
    from jobs.tracking_store import filesystem_of, network_store_warning

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\nserver:/home /home nfs4 rw 0 0\nserver:/x /home/lab/x ext4 rw 0 0\n")
    assert filesystem_of("/home/alice/project/mlruns", mounts) == "nfs4"
    assert filesystem_of("/home/lab/x/mlruns", mounts) == "ext4"   # the longest mount point wins
    assert filesystem_of("/var/tmp", mounts) == "ext4"
    warning = network_store_warning("sqlite:////home/alice/project/mlruns/mlflow.db", mounts)
    assert warning and "nfs4" in warning and "orchestrator server start" in warning
    assert network_store_warning("sqlite:////var/tmp/mlruns/mlflow.db", mounts) is None
    assert network_store_warning("http://127.0.0.1:5000", mounts) is None
