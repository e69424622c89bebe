"""The Kubernetes backend: one ``batch/v1`` Job per run attempt, through the official client.

Not yet run against a live cluster: the objects it builds and its handling of every API answer
are tested against a fake API server (tests/pipelines/test_backend_kubernetes_api.py).

The Job (``job_manifest``) runs ``JobSpec.command`` in one container of ``K8S_JOB_IMAGE`` (an
image holding the container runtime, or the reduction programs for runtime "none") with
``resources.requests`` = ``resources.limits`` (behaviour 30: ``{"cpu": 4, "memory_gb": 16}`` ->
``cpu: "4"``, ``memory: 16Gi``) in namespace ``K8S_NAMESPACE``; ``time_hours`` becomes
``activeDeadlineSeconds``. ``backoffLimit: 0`` and ``restartPolicy: Never``: a failed attempt is
retried by the result-manager as a new run attempt, never behind its back by Kubernetes.
Finished Jobs are deleted by Kubernetes ``K8S_JOB_TTL_SECONDS`` after they end.

The run directory's ``/workflow`` contract directories (``input`` and ``config`` read-only,
``workspace``, ``output`` and ``logs`` read-write) are mounted at the same paths as on the
workers, so the command and environment that ``pipelines.containers.build_command`` made for
the host work unchanged in the pod: hostPath volumes, or sub-paths of the claim ``K8S_PVC_NAME``
(mounted on the workers at ``K8S_PVC_ROOT``). Staged inputs that are symlinks to files outside
the run directory are not reachable in the pod.

Job ids are ``{namespace}/{job name}``; the Job name is ``JobSpec.name`` made a DNS label
(``k8s_name``), so a retried submit finds the Job it created (or gets 409 Conflict and reads
it) and never starts a second one. Labels: ``workflow/job-name``, ``workflow/run-id`` and
``workflow/attempt`` on the Job and its pod; status of a batch is two list calls per namespace
(Jobs and pods by label), whatever the batch size.

Reads use ``_preload_content=False`` and parse the API's JSON here, so the backend depends on
the Kubernetes API's documented JSON, not on the generated model classes of one client version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from .base import (
    JOB_DONE_CALLBACK_ENV,
    Backend,
    BackendError,
    JobSpec,
    JobStatus,
)

CONTRACT_DIRS = ("input", "config", "workspace", "output", "logs")
READ_ONLY_DIRS = frozenset({"input", "config"})
LABEL_JOB_NAME = "workflow/job-name"
LABEL_RUN_ID = "workflow/run-id"
LABEL_ATTEMPT = "workflow/attempt"
ANNOTATION_RUN_DIR = "workflow/run-dir"
CONTAINER_NAME = "step"
REQUEST_TIMEOUT_SECONDS = 30
LIST_PAGE_SIZE = 500
# Waiting reasons a pod never recovers from on its own: the run fails at once instead of
# waiting for activeDeadlineSeconds. ImagePullBackOff is left pending (a registry may come back).
FATAL_WAITING_REASONS = frozenset(
    {"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError", "CreateContainerError"}
)


# --- pure functions: names, quantities, the Job object, status ---------------------------------


def k8s_name(name: str) -> str:
    """``name`` as a DNS-1123 label (lowercase letters, digits, '-', at most 63 characters,
    alphanumeric at both ends). ``run-12-1`` stays as it is; anything else is mapped the same
    way every time, with a hash suffix when characters were changed or cut, so two different
    names never meet."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if label == name and len(label) <= 63:
        return label
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{label[:54].rstrip('-') or 'job'}-{digest}"


def memory_quantity(gigabytes: float) -> str:
    """``16`` -> ``16Gi``; fractions in whole MiB rounded up (``0.5`` -> ``512Mi``)."""
    if float(gigabytes).is_integer():
        return f"{int(gigabytes)}Gi"
    return f"{math.ceil(round(gigabytes * 1024, 6))}Mi"


def resource_quantities(resources: dict[str, Any]) -> dict[str, str]:
    """``requests`` (= ``limits``) for the container: ``cpu`` and ``memory`` of the keys
    given."""
    quantities: dict[str, str] = {}
    if "cpu" in resources:
        quantities["cpu"] = str(int(resources["cpu"]))
    if "memory_gb" in resources:
        quantities["memory"] = memory_quantity(resources["memory_gb"])
    return quantities


def _run_labels(name: str, label: str) -> dict[str, str]:
    labels = {"app.kubernetes.io/managed-by": "workflow", LABEL_JOB_NAME: label}
    match = re.fullmatch(r"run-(\d+)-(\d+)", name)
    if match:
        labels[LABEL_RUN_ID] = match.group(1)
        labels[LABEL_ATTEMPT] = match.group(2)
    return labels


def _volumes(
    run_dir: Path, *, pvc_name: str, pvc_root: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if pvc_name:
        if not pvc_root:
            raise BackendError("K8S_PVC_NAME is set but K8S_PVC_ROOT is empty")
        volumes.append({"name": "workflow-data", "persistentVolumeClaim": {"claimName": pvc_name}})
        for sub in CONTRACT_DIRS:
            path = run_dir / sub
            try:
                relative = path.relative_to(pvc_root)
            except ValueError:
                raise BackendError(
                    f"{path} is not under K8S_PVC_ROOT {pvc_root}: the pod cannot reach it"
                ) from None
            mounts.append(
                {
                    "name": "workflow-data",
                    "mountPath": str(path),
                    "subPath": str(relative),
                    "readOnly": sub in READ_ONLY_DIRS,
                }
            )
        return volumes, mounts
    for sub in CONTRACT_DIRS:
        path = run_dir / sub
        volumes.append(
            {"name": f"workflow-{sub}", "hostPath": {"path": str(path), "type": "Directory"}}
        )
        mounts.append(
            {"name": f"workflow-{sub}", "mountPath": str(path), "readOnly": sub in READ_ONLY_DIRS}
        )
    return volumes, mounts


def job_manifest(
    spec: JobSpec,
    *,
    namespace: str,
    image: str,
    pull_policy: str = "IfNotPresent",
    ttl_seconds: int = 86400,
    pvc_name: str = "",
    pvc_root: str = "",
) -> dict[str, Any]:
    """The ``batch/v1`` Job for ``spec`` as the API's JSON (see the module docstring for what
    each part is for). Raises BackendError when the volumes cannot be expressed."""
    name = k8s_name(spec.name)
    labels = _run_labels(spec.name, name)
    quantities = resource_quantities(spec.resources)
    volumes, mounts = _volumes(Path(spec.run_dir), pvc_name=pvc_name, pvc_root=pvc_root)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": list(spec.command),
        # The completion push would put the broker URL into the Job object: status is polled.
        "env": [
            {"name": key, "value": value}
            for key, value in sorted(spec.env.items())
            if key != JOB_DONE_CALLBACK_ENV
        ],
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "volumeMounts": mounts,
    }
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": ttl_seconds,
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": {"restartPolicy": "Never", "containers": [container], "volumes": volumes},
        },
    }
    if "time_hours" in spec.resources:
        job_spec["activeDeadlineSeconds"] = max(60, math.ceil(spec.resources["time_hours"] * 3600))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {ANNOTATION_RUN_DIR: str(spec.run_dir)},
        },
        "spec": job_spec,
    }


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _newest(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(
        pods,
        key=lambda pod: str(pod.get("metadata", {}).get("creationTimestamp") or ""),
        default=None,
    )


def _container_state(pod: dict[str, Any] | None) -> dict[str, Any]:
    if pod is None:
        return {}
    statuses = pod.get("status", {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER_NAME:
            return status.get("state") or {}
    return (statuses[0].get("state") or {}) if statuses else {}


def job_status_from(
    job_id: str, job: dict[str, Any] | None, pods: list[dict[str, Any]]
) -> JobStatus:
    """The normalised status (behaviour 51) of a Job and its pods as the API returned them.

    Order: no Job -> failed "lost"; the Job's Complete/Failed condition (or the newer
    SuccessCriteriaMet/FailureTarget); the pod's terminated container or phase; a running
    container -> running; a pod stuck on an unrecoverable waiting reason -> failed; else
    pending (with the pod's waiting or scheduling reason). A failure names the pod's reason
    (``OOMKilled``, ``Error``) and exit code, else the Job's (``DeadlineExceeded``)."""
    if job is None:
        return JobStatus(
            job_id,
            "failed",
            reason=(
                "lost: the Job no longer exists (deleted, or removed by its TTL before its "
                "status was read)"
            ),
        )
    status = job.get("status") or {}
    conditions = {
        c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"
    }
    pod = _newest(pods)
    state = _container_state(pod)
    terminated = state.get("terminated") or {}
    started = _time(status.get("startTime")) or _time(terminated.get("startedAt"))
    finished = _time(status.get("completionTime")) or _time(terminated.get("finishedAt"))
    exit_code = terminated.get("exitCode") if isinstance(terminated.get("exitCode"), int) else None

    def ended(ok: bool, reason: str = "") -> JobStatus:
        end = finished
        if end is None:
            condition = conditions.get("Failed") or conditions.get("FailureTarget") or {}
            end = _time(condition.get("lastTransitionTime"))
        wall = (end - started).total_seconds() if started and end else None
        return JobStatus(
            job_id,
            "completed" if ok else "failed",
            exit_code=exit_code if exit_code is not None else (0 if ok else None),
            reason=reason,
            started_at=started,
            finished_at=end,
            wall_seconds=wall,
        )

    def pod_failure() -> str:
        reason = str(terminated.get("reason") or "")
        if exit_code is not None:
            if reason in ("", "Error"):
                return f"exit code {exit_code}"
            return f"{reason} (exit code {exit_code})"
        pod_status = (pod or {}).get("status", {})
        return str(pod_status.get("reason") or pod_status.get("message") or "")

    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        return ended(True)
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed is not None:
        reason = pod_failure()
        if not reason or failed.get("reason") == "DeadlineExceeded":
            job_reason = f"{failed.get('reason') or 'Failed'}: {failed.get('message') or ''}"
            reason = f"{job_reason.strip().rstrip(':')}" + (f"; {reason}" if reason else "")
        return ended(False, reason)
    phase = (pod or {}).get("status", {}).get("phase")
    if terminated or phase in ("Succeeded", "Failed"):
        ok = phase == "Succeeded" or exit_code == 0
        return ended(ok, "" if ok else pod_failure() or "the pod failed")
    if state.get("running") or phase == "Running":
        return JobStatus(job_id, "running", started_at=started)
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in FATAL_WAITING_REASONS:
        message = waiting.get("message") or ""
        return JobStatus(job_id, "failed", reason=f"{waiting['reason']}: {message}".rstrip(": "))
    reason = str(waiting.get("reason") or "")
    if not reason and pod is not None:
        for condition in pod.get("status", {}).get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                reason = str(condition.get("reason") or "")
    return JobStatus(job_id, "pending", reason=reason)


# --- the backend ----------------------------------------------------------------------------


class KubernetesBackend(Backend):
    """Jobs in a Kubernetes namespace. ``api_client`` (a ``kubernetes.client.ApiClient``) is
    for tests and callers with their own configuration; otherwise the in-cluster service
    account is used, else the kubeconfig (``KUBECONFIG``), loaded at the first API call.
    ``calls`` counts API requests by operation (tests and benchmarks read it)."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        api_client: Any = None,
        namespace: str | None = None,
        image: str | None = None,
        pull_policy: str | None = None,
        ttl_seconds: int | None = None,
        pvc_name: str | None = None,
        pvc_root: str | None = None,
    ) -> None:
        from django.conf import settings

        self._api_client = api_client
        self.namespace: str = namespace or settings.K8S_NAMESPACE
        self.image: str = image or settings.K8S_JOB_IMAGE
        self.pull_policy: str = pull_policy or settings.K8S_IMAGE_PULL_POLICY
        self.ttl_seconds: int = settings.K8S_JOB_TTL_SECONDS if ttl_seconds is None else ttl_seconds
        self.pvc_name: str = settings.K8S_PVC_NAME if pvc_name is None else pvc_name
        self.pvc_root: str = settings.K8S_PVC_ROOT if pvc_root is None else pvc_root
        self.calls: dict[str, int] = {}

    # --- the client -------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._api_client is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                try:
                    config.load_kube_config()
                except (config.ConfigException, OSError) as error:
                    raise BackendError(
                        "no Kubernetes configuration: not in a cluster and no usable kubeconfig "
                        f"({error})"
                    ) from error
            self._api_client = client.ApiClient()
        return self._api_client

    def _call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run one API operation (``BatchV1Api.<op>`` or ``CoreV1Api.<op>``) and return the raw
        response (JSON not parsed). ApiException is passed through for the caller to judge by
        status; a transport failure becomes BackendError."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api_class = client.BatchV1Api if "_job" in operation else client.CoreV1Api
        method = getattr(api_class(self._client()), operation)
        self.calls[operation] = self.calls.get(operation, 0) + 1
        try:
            return method(
                *args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS, **kwargs
            )
        except ApiException:
            raise
        except Exception as error:  # urllib3 and socket errors: the API server is unreachable
            raise BackendError(f"Kubernetes API {operation}: {error}") from error

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        value = json.loads(response.data or b"{}")
        return value if isinstance(value, dict) else {}

    @staticmethod
    def _error(what: str, error: Any) -> BackendError:
        message = ""
        try:
            message = json.loads(error.body or "{}").get("message", "")
        except (TypeError, ValueError, AttributeError):
            message = str(error.body or "")
        return BackendError(f"{what}: HTTP {error.status} {error.reason or ''}: {message}".strip())

    def _parse_id(self, job_id: str) -> tuple[str, str]:
        namespace, _, name = job_id.partition("/")
        if not namespace or not name or "/" in name:
            raise BackendError(f"{job_id!r} is not a Kubernetes job id (namespace/name)")
        return namespace, name

    def _read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._json(self._call("read_namespaced_job", name, namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise self._error(f"reading Job {namespace}/{name}", error) from error

    def _list(self, operation: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        items: list[dict[str, Any]] = []
        token = None
        while True:
            options: dict[str, Any] = {"label_selector": selector, "limit": LIST_PAGE_SIZE}
            if token:
                options["_continue"] = token
            try:
                page = self._json(self._call(operation, namespace, **options))
            except ApiException as error:
                raise self._error(f"{operation} in {namespace}", error) from error
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    # --- the interface ----------------------------------------------------------------------

    def find(self, spec: JobSpec) -> str | None:
        name = k8s_name(spec.name)
        job = self._read_job(self.namespace, name)
        if job is None:
            return None
        self._check_owner(job, spec)
        return f"{self.namespace}/{name}"

    def _check_owner(self, job: dict[str, Any], spec: JobSpec) -> None:
        """A Job of this name for another run directory (another deployment sharing the
        namespace) is not ours: refuse rather than report its status as this run's."""
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        owner = annotations.get(ANNOTATION_RUN_DIR)
        if owner is not None and os.path.normpath(owner) != os.path.normpath(spec.run_dir):
            raise BackendError(
                f"Job {self.namespace}/{k8s_name(spec.name)} belongs to {owner}, not "
                f"{spec.run_dir}: another deployment uses this namespace"
            )

    def submit(self, spec: JobSpec) -> str:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        self.validate_resources(spec.resources)
        existing = self.find(spec)
        if existing is not None:
            return existing
        manifest = job_manifest(
            spec,
            namespace=self.namespace,
            image=self.image,
            pull_policy=self.pull_policy,
            ttl_seconds=self.ttl_seconds,
            pvc_name=self.pvc_name,
            pvc_root=self.pvc_root,
        )
        name = manifest["metadata"]["name"]
        body = client.V1Job.from_dict(manifest) if hasattr(client.V1Job, "from_dict") else manifest
        try:
            self._call("create_namespaced_job", self.namespace, body)
        except ApiException as error:
            if error.status != 409:
                raise self._error(f"creating Job {self.namespace}/{name}", error) from error
            # Created meanwhile by another submitter of the same attempt: that one is ours.
            found = self.find(spec)
            if found is None:
                raise self._error(
                    f"creating Job {self.namespace}/{name} (conflict, then not found)", error
                ) from error
            return found
        return f"{self.namespace}/{name}"

    def get_status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        answer: dict[str, JobStatus] = {}
        by_namespace: dict[str, list[tuple[str, str]]] = {}
        for job_id in dict.fromkeys(job_ids):
            try:
                namespace, name = self._parse_id(job_id)
            except BackendError as error:
                answer[job_id] = JobStatus(job_id, "failed", reason=f"unknown job: {error}")
                continue
            by_namespace.setdefault(namespace, []).append((job_id, name))
        for namespace, entries in by_namespace.items():
            jobs = {
                (job.get("metadata") or {}).get("name"): job
                for job in self._list("list_namespaced_job", namespace, LABEL_JOB_NAME)
            }
            pods: dict[str, list[dict[str, Any]]] = {}
            for pod in self._list("list_namespaced_pod", namespace, LABEL_JOB_NAME):
                label = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_JOB_NAME)
                pods.setdefault(str(label), []).append(pod)
            for job_id, name in entries:
                answer[job_id] = job_status_from(job_id, jobs.get(name), pods.get(name, []))
        return answer

    def cancel(self, job_id: str) -> None:
        """Delete the Job with Foreground propagation (its pod goes first, so nothing of the
        run keeps running once the Job is gone). A Job that already ended is left for its TTL;
        an unknown Job is a BackendError."""
        from kubernetes.client.exceptions import ApiException

        namespace, name = self._parse_id(job_id)
        job = self._read_job(namespace, name)
        if job is None:
            raise BackendError(f"cannot cancel {job_id}: no such Job")
        if job_status_from(job_id, job, []).is_finished:
            return
        try:
            self._call("delete_namespaced_job", name, namespace, propagation_policy="Foreground")
        except ApiException as error:
            if error.status == 404:
                return  # deleted meanwhile (its TTL, or a concurrent cancel)
            raise self._error(f"deleting Job {job_id}", error) from error

    def get_logs(self, job_id: str, *, tail_bytes: int = 65536) -> str:
        """The last ``tail_bytes`` of the newest pod's log (stdout and stderr interleaved, as
        Kubernetes keeps them)."""
        from kubernetes.client.exceptions import ApiException

        namespace, name = self._parse_id(job_id)
        pod = _newest(self._list("list_namespaced_pod", namespace, f"{LABEL_JOB_NAME}={name}"))
        if pod is None:
            if self._read_job(namespace, name) is None:
                raise BackendError(f"no logs for {job_id}: no such Job")
            return f"--- pod ---\n(no pod yet for Job {job_id})\n"
        pod_name = pod["metadata"]["name"]
        try:
            response = self._call(
                "read_namespaced_pod_log", pod_name, namespace, container=CONTAINER_NAME
            )
        except ApiException as error:
            if error.status == 400:
                # The container has not started: the API says why in words.
                return f"--- pod {pod_name} ---\n({self._error('no logs yet', error)})\n"
            raise self._error(f"reading the log of pod {namespace}/{pod_name}", error) from error
        data: bytes = response.data or b""
        prefix = ""
        if len(data) > tail_bytes:
            prefix = f"[... {len(data) - tail_bytes} earlier bytes not shown]\n"
            data = data[-tail_bytes:]
        return f"--- pod {pod_name} ---\n{prefix}{data.decode('utf-8', errors='replace')}"
