"""All settings, from environment variables (see README "Environment").

Defaults run a laptop demo with no server: SQLite under ``var/``, an embedded file-system Celery
broker and local-memory cache. Production switches by setting ``DATABASE_URL``,
``CELERY_BROKER_URL``, ``REDIS_URL``, ``DJANGO_SECRET_KEY`` and ``DJANGO_ALLOWED_HOSTS``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from workflow_site.env import (
    env_bool,
    env_choice,
    env_int,
    env_list,
    env_path,
    env_str,
    parse_database_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = env_path("WORKFLOW_VAR_DIR", BASE_DIR / "var")
VAR_DIR.mkdir(parents=True, exist_ok=True)

# --- Core ---------------------------------------------------------------------------------------
DEBUG = env_bool("DJANGO_DEBUG", False)
# The "django-insecure-" prefix makes `manage.py check --deploy` report security.W009 when
# production forgets DJANGO_SECRET_KEY (a long key without it would pass that check silently).
_DEV_SECRET = "django-insecure-dev-key-only-for-the-laptop-demo-never-in-production-0123456789"
SECRET_KEY = env_str("DJANGO_SECRET_KEY") or _DEV_SECRET
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

# Behind TLS (production) these make `manage.py check --deploy` pass; the laptop demo is HTTP.
_SECURE = env_bool("DJANGO_SECURE", not DEBUG and SECRET_KEY != _DEV_SECRET)
SESSION_COOKIE_SECURE = _SECURE
CSRF_COOKIE_SECURE = _SECURE
SECURE_SSL_REDIRECT = _SECURE and env_bool("DJANGO_SSL_REDIRECT", True)
# Kubernetes and load-balancer probes call /health over plain HTTP on the pod and count a 3xx as
# healthy, so redirecting it would hide a dead database. Patterns match the path without its
# leading slash; the URL itself is in pipelines/urls.py.
SECURE_REDIRECT_EXEMPT = [r"^health$"]
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000 if _SECURE else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _SECURE
SECURE_HSTS_PRELOAD = _SECURE
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if _SECURE else None
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_filters",
    "django_celery_beat",
    "channels",
    "pipelines",
    "reduction",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "workflow_site.urls"
WSGI_APPLICATION = "workflow_site.wsgi.application"
ASGI_APPLICATION = "workflow_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'workflow.sqlite3'}"
DATABASES = {"default": parse_database_url(DATABASE_URL, base_dir=BASE_DIR)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache, heartbeats, channel layer -----------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    # Heartbeats must be visible across processes even on a laptop, so the fallback cache is a
    # database table, not process-local memory.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "workflow_cache",
        }
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Auth, i18n, static -------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# A plain login page: viewers and scientists are not staff, so the admin login would refuse them.
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env_path("DJANGO_STATIC_ROOT", VAR_DIR / "staticfiles")
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns on every request otherwise
# Serve straight from the finders so `make demo` needs no collectstatic; production may still
# run collectstatic into STATIC_ROOT and set WHITENOISE_USE_FINDERS=0.
WHITENOISE_USE_FINDERS = env_bool("WHITENOISE_USE_FINDERS", True)

# --- Celery -------------------------------------------------------------------------------------
# Default broker: kombu's file-system transport under var/, so several local processes share a
# queue without any server. Production sets redis:// or amqp://.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or "filesystem://"
CELERY_BROKER_DIR = VAR_DIR / "broker"
if CELERY_BROKER_URL == "filesystem://":
    for _sub in ("queue", "processed", "control"):
        (CELERY_BROKER_DIR / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_BROKER_DIR / "queue"),
        "data_folder_out": str(CELERY_BROKER_DIR / "queue"),
        "processed_folder": str(CELERY_BROKER_DIR / "processed"),
        # Exchange bindings; kombu's default is ./control in whatever directory a process runs.
        "control_folder": str(CELERY_BROKER_DIR / "control"),
        "store_processed": False,
    }
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND") or None
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_TRACK_STARTED = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "workflow.default"
CELERY_TIMEZONE = TIME_ZONE
# django-celery-beat's database scheduler, creating missing entries only: an operator's
# retiming or pausing in the admin survives a beat restart (pipelines/beat.py).
CELERY_BEAT_SCHEDULER = "pipelines.beat:Scheduler"
# A claimed task may legitimately wait in the queue and then run for a long time (a 50 GB tar);
# Redis redelivers an unacknowledged task after this many seconds, which must stay above the
# longest task or a second worker would start it while the first still works (the claim token
# makes that second run a no-op, but it wastes a worker). Twelve hours.
CELERY_BROKER_VISIBILITY_TIMEOUT = env_int(
    "CELERY_BROKER_VISIBILITY_TIMEOUT", 12 * 3600, minimum=60
)
if not CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_BROKER_VISIBILITY_TIMEOUT}

# How long a worker may hold a claimed row without renewing it before the reconciler hands it
# back; workers renew every third of it during long I/O.
WORKFLOW_LEASE_SECONDS = env_int("WORKFLOW_LEASE_SECONDS", 900, minimum=2)
# Seconds between ticks of each manager, and of the lease reconciler.
WORKFLOW_MANAGER_INTERVAL = env_int("WORKFLOW_MANAGER_INTERVAL", 60, minimum=1)
WORKFLOW_RECOVERY_INTERVAL = env_int("WORKFLOW_RECOVERY_INTERVAL", 300, minimum=1)
# Heartbeat keys live this long; services refresh them every third of it (ops-db: 90 s / 30 s).
WORKFLOW_HEARTBEAT_TTL = env_int("WORKFLOW_HEARTBEAT_TTL", 90, minimum=3)
# Disk monitor (issue 10): seconds between measurements of every location's usage.
WORKFLOW_DISK_MONITOR_INTERVAL = env_int("WORKFLOW_DISK_MONITOR_INTERVAL", 300, minimum=1)

# Periodic managers. Beat only fires these; each finds due rows and dispatches worker tasks.
# pipelines.beat.Scheduler creates the entries by name in django-celery-beat's tables, where
# operators can pause or retime them.
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    # Every WORKFLOW_RECOVERY_INTERVAL (five minutes): hand back claims whose worker died.
    "recover-expired-leases": {
        "task": "pipelines.tasks.recover_expired_leases",
        "schedule": timedelta(seconds=WORKFLOW_RECOVERY_INTERVAL),
    },
    # Every WORKFLOW_MANAGER_INTERVAL (a minute), each data-path manager (pipelines/managers.py):
    **{
        f"run-{name}-manager": {
            "task": f"pipelines.tasks.run_{name}_manager",
            "schedule": timedelta(seconds=WORKFLOW_MANAGER_INTERVAL),
        }
        for name in ("packaging", "bundling", "transfer", "unpack", "archive")
    },
    # Every WORKFLOW_MANAGER_INTERVAL: dispatch staging jobs (seed 002's process_staging_jobs).
    "process-staging-jobs": {
        "task": "pipelines.tasks.process_staging_jobs",
        "schedule": timedelta(seconds=WORKFLOW_MANAGER_INTERVAL),
    },
    # Integrity (issue 10), every WORKFLOW_MANAGER_INTERVAL: dispatch re-verifications of copies
    # whose location's verification interval passed, and repairs of damaged copies.
    "run-integrity-manager": {
        "task": "pipelines.tasks.run_integrity_manager",
        "schedule": timedelta(seconds=WORKFLOW_MANAGER_INTERVAL),
    },
    "run-repair-manager": {
        "task": "pipelines.tasks.run_repair_manager",
        "schedule": timedelta(seconds=WORKFLOW_MANAGER_INTERVAL),
    },
    # Disk monitor (issue 10), every WORKFLOW_DISK_MONITOR_INTERVAL (five minutes): measure
    # each location's usage; a full one stops taking new packages and transfers.
    "run-disk-manager": {
        "task": "pipelines.tasks.run_disk_manager",
        "schedule": timedelta(seconds=WORKFLOW_DISK_MONITOR_INTERVAL),
    },
    # Deletion (issue 10), every WORKFLOW_MANAGER_INTERVAL: schedule the copies the deletion
    # policy lets go (full locations first) and dispatch their deletions.
    "run-deletion-manager": {
        "task": "pipelines.tasks.run_deletion_manager",
        "schedule": timedelta(seconds=WORKFLOW_MANAGER_INTERVAL),
    },
    # Trigger manager (issue 11), every WORKFLOW_MANAGER_INTERVAL (a minute): create PENDING
    # runs for the steps' gaps; archiving a package also queues an evaluation at once.
    "run-trigger-manager": {
        "task": "pipelines.tasks.run_trigger_manager",
        "schedule": timedelta(seconds=WORKFLOW_MANAGER_INTERVAL),
    },
    # Workflow and result managers (issue 11, engine-runs), every WORKFLOW_MANAGER_INTERVAL (a
    # minute): claim, stage and submit PENDING runs; poll jobs, collect products, retry. A job
    # also pushes its end (run_job_finished), so the result tick is the safety net.
    "run-workflow-manager": {
        "task": "pipelines.tasks.run_workflow_manager",
        "schedule": timedelta(seconds=WORKFLOW_MANAGER_INTERVAL),
    },
    "run-result-manager": {
        "task": "pipelines.tasks.run_result_manager",
        "schedule": timedelta(seconds=WORKFLOW_MANAGER_INTERVAL),
    },
    # Campaigns (issue 12), every WORKFLOW_MANAGER_INTERVAL (a minute): advance backfills and
    # reprocessing (downstream runs, superseded products, progress); refresh staleness.
    "run-campaign-manager": {
        "task": "pipelines.tasks.run_campaign_manager",
        "schedule": timedelta(seconds=WORKFLOW_MANAGER_INTERVAL),
    },
}

# --- Facility -----------------------------------------------------------------------------------
# Root under which the demo facility creates its disk locations.
FACILITY_DATA_ROOT = env_path("FACILITY_DATA_ROOT", VAR_DIR / "data")
# Raw data packages are split so that none exceeds this many bytes (ops-db: 50 GB).
RAW_DATA_PACKAGE_MAX_BYTES = env_int("RAW_DATA_PACKAGE_MAX_BYTES", 50 * 1000**3, minimum=1)
# Transfer bundles (tars of package tars sent over the long-haul link) stay under this size.
DATA_TRANSFER_PACKAGE_MAX_BYTES = env_int(
    "DATA_TRANSFER_PACKAGE_MAX_BYTES", 200 * 1000**3, minimum=1
)
DEFAULT_CHECKSUM_ALGORITHM = env_choice(
    "DEFAULT_CHECKSUM_ALGORITHM", ("sha256", "xxh3_128"), "sha256"
)
# Where each instrument's rendered reduction script is written (reduction app).
REDUCTION_SCRIPT_DIR = env_path("REDUCTION_SCRIPT_DIR", VAR_DIR / "reduction_scripts")

# --- Local backend (issue 11, backends) ----------------------------------------------------------
# Job id -> run directory links of the local backend (pipelines/backends/local.py), so any worker
# on this host reads a job's status from its files, also after a restart.
LOCAL_BACKEND_DIR = env_path("LOCAL_BACKEND_DIR", VAR_DIR / "local_jobs")

# --- Trigger manager (issue 11) -----------------------------------------------------------------
# The PROCESSING location (DataLocation id) whose pipelines this instance's workflow managers
# serve. Unset (0): the only PROCESSING location, or every one when there are several (the
# embedded laptop facility runs all pipelines); pipelines.services.triggers.processing_location_id.
PROCESSING_LOCATION_ID = env_int("PROCESSING_LOCATION_ID", 0, minimum=0) or None
# Seconds between full re-evaluations of a pipeline (the safety net under the incremental ticks).
WORKFLOW_TRIGGER_FULL_INTERVAL = env_int("WORKFLOW_TRIGGER_FULL_INTERVAL", 3600, minimum=1)

# --- Workflow and result managers (issue 11, engine-runs) ---------------------------------------
# Where run jobs execute: a key of pipelines.backends.base.BACKENDS ("local": detached processes
# on this host, the embedded default). An unknown name fails at the first submission, naming the
# known ones (the registry is code, so it is checked there, not here).
HPC_BACKEND = env_str("HPC_BACKEND", "local").lower() or "local"
# How a step's command is wrapped: pipelines.containers.RUNTIMES ("none" runs the command as it
# is, with the same /workflow environment pointing at the host directories).
CONTAINER_RUNTIME = env_choice(
    "CONTAINER_RUNTIME", ("none", "apptainer", "podman", "docker"), "none"
)

# --- HPC backends: SLURM and Kubernetes (issue 12, hpc backends) --------------------------------
# SLURM partition jobs go to; empty = the cluster's default partition (whose limits then bound
# the steps' resources).
SLURM_PARTITION = env_str("SLURM_PARTITION", "")
# SLURM job id -> run directory links, so a job SLURM has forgotten is still read from its files;
# shared by the workers that submit and the ones that poll.
SLURM_BACKEND_DIR = env_path("SLURM_BACKEND_DIR", VAR_DIR / "slurm_jobs")
# Namespace of the run Jobs; the image their container runs (it must hold CONTAINER_RUNTIME or,
# for "none", the reduction programs); finished Jobs are deleted by Kubernetes after the TTL.
K8S_NAMESPACE = env_str("K8S_NAMESPACE", "workflow")
K8S_JOB_IMAGE = env_str("K8S_JOB_IMAGE", "python:3.11-slim")
K8S_IMAGE_PULL_POLICY = {"ifnotpresent": "IfNotPresent", "always": "Always", "never": "Never"}[
    env_choice("K8S_IMAGE_PULL_POLICY", ("ifnotpresent", "always", "never"), "ifnotpresent")
]
K8S_JOB_TTL_SECONDS = env_int("K8S_JOB_TTL_SECONDS", 86400, minimum=0)
# Run directories reach the pod as hostPath volumes at the same paths, or, when K8S_PVC_NAME is
# set, as sub-paths of that claim, which is mounted on the workers at K8S_PVC_ROOT.
K8S_PVC_NAME = env_str("K8S_PVC_NAME", "")
K8S_PVC_ROOT = env_str("K8S_PVC_ROOT", "")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO").upper()},
}
