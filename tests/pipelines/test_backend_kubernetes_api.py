"""The Kubernetes backend through the official client against a fake API server.

No cluster runs here. ``FakeKubernetes`` is a small HTTP server on 127.0.0.1 that keeps Jobs and
pods in memory and answers the requests the backend makes (create/read/list/delete Jobs, list
pods, read a pod's log) with the JSON and status codes of the real API server, including 404
NotFound, 409 AlreadyExists and 500 answers injected by a test. Every request is recorded, so the
tests check what went over the wire, not only what came back.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client

from pipelines.backends.base import BackendError, JobSpec
from pipelines.backends.kubernetes import KubernetesBackend

JOBS = re.compile(r"^/apis/batch/v1/namespaces/(?P<ns>[^/]+)/jobs(?:/(?P<name>[^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+)(?P<log>/log)?)?$")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if key not in labels or (value and labels[key] != value):
            return False
    return True


class FakeKubernetes:
    """Jobs and pods by (namespace, name); ``fail(method, path_regex, code)`` makes the next
    matching request answer ``code``; ``requests`` holds (method, path, query, body)."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.logs: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self.failures: list[tuple[str, re.Pattern[str], int]] = []
        self.page_size = 1000
        self.lock = threading.Lock()

    def fail(self, method: str, path: str, code: int) -> None:
        self.failures.append((method, re.compile(path), code))

    # --- what a test sets up (what the Job controller and kubelet would do) -----------------

    def add_pod(self, namespace: str, job_name: str, phase: str, state: dict[str, Any]) -> str:
        name = f"{job_name}-{len(self.pods):05d}"
        job = self.jobs[(namespace, job_name)]
        labels = dict(job["spec"]["template"]["metadata"]["labels"])
        self.pods[(namespace, name)] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "creationTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            "status": {"phase": phase, "containerStatuses": [{"name": "step", "state": state}]},
        }
        return name

    def set_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.jobs[(namespace, name)]["status"] = status

    # --- the HTTP side ----------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, body: Any) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        with self.lock:
            self.requests.append((method, path, query, body))
            for index, (fail_method, pattern, code) in enumerate(self.failures):
                if fail_method == method and pattern.search(path):
                    del self.failures[index]
                    return code, _status(code, "InternalError", f"injected {code}")
            if match := JOBS.match(path):
                return self._jobs(method, match["ns"], match["name"], query, body)
            if match := PODS.match(path):
                return self._pods(method, match["ns"], match["name"], bool(match["log"]), query)
        return 404, _status(404, "NotFound", f"the server could not find {path}")

    def _jobs(self, method, namespace, name, query, body):  # type: ignore[no-untyped-def]
        if method == "POST" and name is None:
            key = (namespace, body["metadata"]["name"])
            if key in self.jobs:
                return 409, _status(409, "AlreadyExists", f'jobs.batch "{key[1]}" already exists')
            job = json.loads(json.dumps(body))
            job["metadata"].update(
                uid=f"uid-{len(self.jobs)}",
                creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            job["status"] = {}
            self.jobs[key] = job
            return 201, job
        if method == "GET" and name is None:
            selector = query.get("labelSelector", [""])[0]
            items = [
                job
                for (ns, _), job in sorted(self.jobs.items())
                if ns == namespace and _matches(job["metadata"].get("labels", {}), selector)
            ]
            return 200, self._page("JobList", "batch/v1", items, query)
        key = (namespace, name)
        if key not in self.jobs:
            return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
        if method == "GET":
            return 200, self.jobs[key]
        if method == "DELETE":
            job = self.jobs.pop(key)
            for pod_key, pod in list(self.pods.items()):
                if pod["metadata"]["labels"].get("workflow/job-name") == name:
                    del self.pods[pod_key]
            return 200, job
        return 405, _status(405, "MethodNotAllowed", method)

    def _pods(self, method, namespace, name, log, query):  # type: ignore[no-untyped-def]
        if method != "GET":
            return 405, _status(405, "MethodNotAllowed", method)
        if name is None:
            selector = query.get("labelSelector", [""])[0]
            items = [
                pod
                for (ns, _), pod in sorted(self.pods.items())
                if ns == namespace and _matches(pod["metadata"].get("labels", {}), selector)
            ]
            return 200, self._page("PodList", "v1", items, query)
        key = (namespace, name)
        if key not in self.pods:
            return 404, _status(404, "NotFound", f'pods "{name}" not found')
        if log:
            state = self.pods[key]["status"]["containerStatuses"][0]["state"]
            if "waiting" in state:
                message = f'container "step" in pod "{name}" is waiting to start: ContainerCreating'
                return 400, _status(400, "BadRequest", message)
            return 200, self.logs.get(key, "")
        return 200, self.pods[key]

    def _page(self, kind, api_version, items, query):  # type: ignore[no-untyped-def]
        start = int(query.get("continue", ["0"])[0])
        limit = min(int(query.get("limit", [str(self.page_size)])[0]), self.page_size)
        page = items[start : start + limit]
        token = str(start + limit) if start + limit < len(items) else None
        metadata = {"resourceVersion": "1", **({"continue": token} if token else {})}
        return {"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": page}


def _handler_for(fake: FakeKubernetes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            code, answer = fake.handle(method, self.path, body)
            if isinstance(answer, str):
                data, content_type = answer.encode(), "text/plain"
            else:
                data, content_type = json.dumps(answer).encode(), "application/json"
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def do_DELETE(self) -> None:
            self._answer("DELETE")

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def fake() -> Iterator[FakeKubernetes]:
    state = FakeKubernetes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def backend(fake: FakeKubernetes) -> KubernetesBackend:
    configuration = client.Configuration(host=fake.url)  # type: ignore[attr-defined]
    configuration.retries = False
    return KubernetesBackend(
        api_client=client.ApiClient(configuration),
        namespace="wf",
        image="runner:1",
        ttl_seconds=300,
        pvc_name="",
        pvc_root="",
    )


def _spec(tmp_path: Path, name: str = "run-7-2") -> JobSpec:
    return JobSpec(
        name=name,
        command=["python", "-m", "pipelines.demo.reduction", "calibrate"],
        run_dir=tmp_path / "7-2",
        env={"WORKFLOW_OUTPUT_DIR": "/workflow/output/"},
        resources={"cpu": 4, "memory_gb": 16, "time_hours": 2},
    )


def _terminated(code: int, reason: str) -> dict[str, Any]:
    return {
        "terminated": {
            "exitCode": code,
            "reason": reason,
            "startedAt": "2026-12-02T10:00:00Z",
            "finishedAt": "2026-12-02T10:00:42Z",
        }
    }


def test_submit_creates_the_job_in_the_namespace_with_requests_equal_to_limits(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    job_id = backend.submit(_spec(tmp_path))

    assert job_id == "wf/run-7-2"
    posts = [r for r in fake.requests if r[0] == "POST"]
    assert len(posts) == 1
    assert posts[0][1] == "/apis/batch/v1/namespaces/wf/jobs"
    sent = posts[0][3]
    container = sent["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"cpu": "4", "memory": "16Gi"},
    }
    assert sent["metadata"]["labels"]["workflow/run-id"] == "7"
    assert sent["spec"]["backoffLimit"] == 0
    assert sent["spec"]["ttlSecondsAfterFinished"] == 300
    assert sent["spec"]["activeDeadlineSeconds"] == 7200
    assert {m["mountPath"] for m in container["volumeMounts"] if m["readOnly"]} == {
        str(tmp_path / "7-2" / "input"),
        str(tmp_path / "7-2" / "config"),
    }


def test_a_retried_submit_returns_the_existing_job_and_creates_nothing(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    first = backend.submit(_spec(tmp_path))

    again = backend.submit(_spec(tmp_path))

    assert again == first
    assert sum(1 for r in fake.requests if r[0] == "POST") == 1
    assert backend.find(_spec(tmp_path)) == first


def test_a_conflict_on_create_means_another_submitter_won_and_its_job_is_returned(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    """The Job appears between the lookup and the create (two workers on one attempt): the
    fake answers the first read 404 as if it did not exist yet, then 409 on the create."""
    other = KubernetesBackend(
        api_client=backend._api_client, namespace="wf", image="runner:1", ttl_seconds=300
    )
    other.submit(_spec(tmp_path))
    fake.fail("GET", r"/jobs/run-7-2$", 404)

    job_id = backend.submit(_spec(tmp_path))

    assert job_id == "wf/run-7-2"
    codes = [r for r in fake.requests if r[0] == "POST"]
    assert len(codes) == 2  # the second create was refused with 409
    assert len(fake.jobs) == 1


def test_a_job_of_that_name_for_another_run_directory_is_refused(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    backend.submit(_spec(tmp_path))
    elsewhere = JobSpec(
        name="run-7-2", command=["true"], run_dir=tmp_path / "other", resources={"cpu": 1}
    )

    with pytest.raises(BackendError, match="another deployment uses this namespace"):
        backend.submit(elsewhere)


def test_a_server_error_on_create_is_a_backend_error_naming_the_job(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    fake.fail("POST", r"/jobs$", 500)

    with pytest.raises(BackendError, match=r"creating Job wf/run-7-2: HTTP 500.*injected 500"):
        backend.submit(_spec(tmp_path))
    assert fake.jobs == {}


def test_an_unreachable_api_server_is_a_backend_error(tmp_path: Path) -> None:
    configuration = client.Configuration(host="http://127.0.0.1:9")
    configuration.retries = False
    backend = KubernetesBackend(api_client=client.ApiClient(configuration), namespace="wf")

    with pytest.raises(BackendError, match="Kubernetes API read_namespaced_job"):
        backend.submit(_spec(tmp_path))


def test_status_follows_the_job_and_its_pod_in_two_list_calls_for_the_batch(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    names = ["run-1-1", "run-2-1", "run-3-1", "run-4-1", "run-5-1", "run-6-1"]
    ids = [backend.submit(_spec(tmp_path / name, name)) for name in names]
    fake.add_pod("wf", "run-2-1", "Pending", {"waiting": {"reason": "ContainerCreating"}})
    fake.add_pod("wf", "run-3-1", "Running", {"running": {"startedAt": "2026-12-02T10:00:00Z"}})
    fake.add_pod("wf", "run-4-1", "Succeeded", _terminated(0, "Completed"))
    fake.set_job_status("wf", "run-4-1", {"conditions": [{"type": "Complete", "status": "True"}]})
    fake.add_pod("wf", "run-5-1", "Failed", _terminated(137, "OOMKilled"))
    fake.set_job_status(
        "wf",
        "run-5-1",
        {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
    )
    fake.add_pod("wf", "run-6-1", "Failed", _terminated(3, "Error"))
    fake.set_job_status("wf", "run-6-1", {"conditions": [{"type": "Failed", "status": "True"}]})
    fake.page_size = 2  # the backend follows continue tokens
    backend.calls.clear()

    statuses = backend.get_status([*ids, "wf/run-99-1", "malformed"])

    assert [(statuses[i].state, statuses[i].exit_code) for i in ids] == [
        ("pending", None),
        ("pending", None),
        ("running", None),
        ("completed", 0),
        ("failed", 137),
        ("failed", 3),
    ]
    assert statuses[ids[1]].reason == "ContainerCreating"
    assert statuses[ids[4]].reason == "OOMKilled (exit code 137)"
    assert statuses[ids[5]].reason == "exit code 3"
    assert statuses["wf/run-99-1"].reason.startswith("lost: the Job no longer exists")
    assert statuses["malformed"].reason.startswith("unknown job")
    # 6 Jobs and 5 pods in pages of 2: 3 + 3 list requests, however many ids were asked for.
    assert backend.calls == {"list_namespaced_job": 3, "list_namespaced_pod": 3}
    selectors = {
        r[2]["labelSelector"][0]
        for r in fake.requests
        if r[1].endswith(("/jobs", "/pods")) and r[0] == "GET"
    }
    assert selectors == {"workflow/job-name"}


def test_a_server_error_while_polling_is_a_backend_error(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    job_id = backend.submit(_spec(tmp_path))
    fake.fail("GET", r"/pods$", 500)

    with pytest.raises(BackendError, match="list_namespaced_pod in wf: HTTP 500"):
        backend.get_status([job_id])


def test_cancel_deletes_a_running_job_with_foreground_propagation(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    job_id = backend.submit(_spec(tmp_path))
    fake.add_pod("wf", "run-7-2", "Running", {"running": {}})

    backend.cancel(job_id)

    deletes = [r for r in fake.requests if r[0] == "DELETE"]
    assert len(deletes) == 1
    assert deletes[0][1] == "/apis/batch/v1/namespaces/wf/jobs/run-7-2"
    assert deletes[0][2]["propagationPolicy"] == ["Foreground"]
    assert fake.jobs == {} and fake.pods == {}


def test_cancel_leaves_a_finished_job_and_refuses_an_unknown_one(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    job_id = backend.submit(_spec(tmp_path))
    fake.set_job_status("wf", "run-7-2", {"conditions": [{"type": "Complete", "status": "True"}]})

    backend.cancel(job_id)
    with pytest.raises(BackendError, match="cannot cancel wf/run-1-9: no such Job"):
        backend.cancel("wf/run-1-9")

    assert not [r for r in fake.requests if r[0] == "DELETE"]
    assert ("wf", "run-7-2") in fake.jobs


def test_cancel_racing_the_ttl_is_quiet_and_a_server_error_is_raised(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    job_id = backend.submit(_spec(tmp_path))
    fake.fail("DELETE", r"/jobs/run-7-2$", 404)
    backend.cancel(job_id)  # gone between the read and the delete: nothing left to stop

    fake.fail("DELETE", r"/jobs/run-7-2$", 500)
    with pytest.raises(BackendError, match="deleting Job wf/run-7-2: HTTP 500"):
        backend.cancel(job_id)


def test_logs_come_from_the_newest_pod_tailed(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    job_id = backend.submit(_spec(tmp_path))
    pod = fake.add_pod("wf", "run-7-2", "Succeeded", _terminated(0, "Completed"))
    fake.logs[("wf", pod)] = "line one\n" + "x" * 100 + "\nlast line\n"

    full = backend.get_logs(job_id)
    tail = backend.get_logs(job_id, tail_bytes=10)

    assert full == f"--- pod {pod} ---\nline one\n" + "x" * 100 + "\nlast line\n"
    assert tail.endswith("last line\n")
    assert "earlier bytes not shown" in tail
    log_requests = [r for r in fake.requests if r[1].endswith("/log")]
    assert log_requests[-1][2]["container"] == ["step"]


def test_logs_before_the_container_starts_say_why_and_an_unknown_job_is_an_error(
    fake: FakeKubernetes, backend: KubernetesBackend, tmp_path: Path
) -> None:
    job_id = backend.submit(_spec(tmp_path))
    assert "no pod yet" in backend.get_logs(job_id)
    fake.add_pod("wf", "run-7-2", "Pending", {"waiting": {"reason": "ContainerCreating"}})

    assert "is waiting to start" in backend.get_logs(job_id)
    with pytest.raises(BackendError, match="no logs for wf/run-3-3: no such Job"):
        backend.get_logs("wf/run-3-3")


def test_the_backend_uses_the_configured_namespace(settings, fake: FakeKubernetes) -> None:
    settings.K8S_NAMESPACE = "from-settings"
    configuration = client.Configuration(host=fake.url)  # type: ignore[attr-defined]

    backend = KubernetesBackend(api_client=client.ApiClient(configuration))

    assert backend.namespace == "from-settings"


def test_without_a_cluster_or_kubeconfig_the_backend_says_so(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    backend = KubernetesBackend(namespace="wf")

    with pytest.raises(BackendError, match="no Kubernetes configuration: not in a cluster"):
        backend.get_status(["wf/run-1-1"])
