"""Settings for Melanoma Records, all read from the environment (django-environ) here, in one place.

Embedded default (no variables set): SQLite and a local media folder under ``var/``, and a
file-system Celery broker under ``var/broker`` so a first run needs no server. Production sets
``DATABASE_URL`` (PostgreSQL), ``REDIS_URL``, ``SECRET_KEY``, ``ALLOWED_HOSTS`` and ``DEBUG=false``.
"""
import secrets
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)  # optional, never committed

VAR_DIR = Path(env("VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    """SECRET_KEY from the environment; else one generated once per installation in var/."""
    value = env("SECRET_KEY", default="")
    if value:
        return value
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "auditlog",
    "axes",
    "patients",
    "inference",
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
    "auditlog.middleware.AuditlogMiddleware",
    "melanoma_site.storage.StorageUnavailableMiddleware",  # media store down: 503, not 500
    "melanoma_site.security.ContentSecurityPolicyMiddleware",
    # Last, as django-axes requires: turns a refused login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

# django-axes first: it refuses a locked-out account or address before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "melanoma_site.urls"
WSGI_APPLICATION = "melanoma_site.wsgi.application"

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

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
# Persistent connections (one per gunicorn thread), checked before reuse: opening a PostgreSQL
# connection per request cost more than most pages' queries. CONN_MAX_AGE=0 closes after each request.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=300)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # WAL lets the worker write while the web process reads.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 30, "init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE"}
    )
elif "postgresql" in DATABASES["default"]["ENGINE"] and env.bool("DB_PREPARED_STATEMENTS", default=True):
    # Server-side parameter binding: psycopg prepares a statement once a connection has run it a
    # few times, so PostgreSQL plans the pages' queries once per (persistent) connection instead of
    # on every request -- planning took longer than executing them (bench/web_profile.py).
    # DB_PREPARED_STATEMENTS=false behind a transaction-pooling proxy that cannot keep them.
    DATABASES["default"].setdefault("OPTIONS", {}).update({"server_side_binding": True, "prepare_threshold": 3})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "patients:worklist"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

# Static files are vendored in the repository and served by WhiteNoise: no CDN anywhere.
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env("STATIC_ROOT", default=str(VAR_DIR / "staticfiles")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# Media is private: never under STATIC, never served by a URL pattern of its own. Images are
# streamed by views that check the user may see the patient.
MEDIA_ROOT = Path(env("MEDIA_ROOT", default=str(VAR_DIR / "media")))
MEDIA_URL = "/media-not-served/"
# Where media (uploaded images, thumbnails, heatmaps) live; code reaches them only through Django's
# storage API (default_storage / FileField.storage), never through paths. STORAGE=local (default):
# the private folder MEDIA_ROOT, enough when web and workers share one machine. STORAGE=s3: an
# S3-compatible object store (AWS S3, MinIO, ...), so web, beat and workers can run on separate
# machines sharing only PostgreSQL, Redis and the bucket. Objects are private and have no URL
# (melanoma_site.storage.s3.PrivateS3Storage): the web process streams them after the access check.
# Model weights (MODEL_ROOT) are not media: each worker machine has its own models folder.
STORAGE = env("STORAGE", default="local").strip().lower()
if STORAGE == "local":
    _media_storage = {"BACKEND": "django.core.files.storage.FileSystemStorage"}
elif STORAGE == "s3":
    if not env("S3_BUCKET", default=""):
        raise ImproperlyConfigured("STORAGE=s3 needs S3_BUCKET (and the S3_* settings of the object store).")
    _s3_options = {
        "bucket_name": env("S3_BUCKET"),
        "endpoint_url": env("S3_ENDPOINT_URL", default="") or None,  # empty: AWS itself
        "access_key": env("S3_ACCESS_KEY_ID", default="") or None,  # empty: boto3's own lookup (roles)
        "secret_key": env("S3_SECRET_ACCESS_KEY", default="") or None,
        "region_name": env("S3_REGION", default="") or None,
        "location": env("S3_PREFIX", default=""),  # a key prefix inside the bucket
        # Path-style addressing works with MinIO and most self-hosted stores; AWS takes either.
        "addressing_style": env("S3_ADDRESSING_STYLE", default="path"),
        "signature_version": "s3v4",
        "default_acl": "private",
        "file_overwrite": False,
        "verify": env.bool("S3_VERIFY_TLS", default=True),
    }
    from botocore.config import Config as _S3Config

    # A store that does not answer fails a request in seconds (503, try again), not minutes. (With
    # a client_config, django-storages takes addressing style and signature version from it only.)
    _s3_options["client_config"] = _S3Config(
        s3={"addressing_style": _s3_options["addressing_style"]},
        signature_version=_s3_options["signature_version"],
        connect_timeout=env.float("S3_CONNECT_TIMEOUT", default=5.0),
        read_timeout=env.float("S3_READ_TIMEOUT", default=30.0),
        retries={"max_attempts": env.int("S3_MAX_ATTEMPTS", default=3), "mode": "standard"},
    )
    _sse = env("S3_SERVER_SIDE_ENCRYPTION", default="")  # e.g. AES256 or aws:kms
    if _sse:
        _s3_options["object_parameters"] = {"ServerSideEncryption": _sse}
    _media_storage = {"BACKEND": "melanoma_site.storage.s3.PrivateS3Storage", "OPTIONS": _s3_options}
else:
    raise ImproperlyConfigured(f"STORAGE must be 'local' or 's3', not {STORAGE!r}.")
STORAGES = {
    "default": _media_storage,
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
FILE_UPLOAD_PERMISSIONS = 0o600
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700

# Upload limits (configurable). The pixel cap also guards against decompression bombs.
UPLOAD_MAX_BYTES = env.int("UPLOAD_MAX_BYTES", default=30 * 1024 * 1024)
UPLOAD_MAX_PIXELS = env.int("UPLOAD_MAX_PIXELS", default=50_000_000)
UPLOAD_MAX_FILES = env.int("UPLOAD_MAX_FILES", default=20)
DATA_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
FILE_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
# Django's parser cap: UPLOAD_MAX_FILES in `files` plus the API's single `file` field; more than
# UPLOAD_MAX_FILES in all is the upload service's clear error.
DATA_UPLOAD_MAX_NUMBER_FILES = UPLOAD_MAX_FILES + 1
THUMBNAIL_SIZE = 256
# Prefetch factories (dotted paths) applied to image lists on the records pages, so that what the
# analysis app shows beside each image costs no query per image. Keeps patients -> inference
# imports out of the records core: the dependency is one-way (inference imports patients).
IMAGE_LIST_PREFETCHES = ["inference.selectors.analysis_prefetch"]
# Media folders and the field whose rows refer to their files ("app_label.Model.field"): the orphan
# purge (manage.py purge_orphan_media) lists files in them no row refers to. Named here, so that
# the records core needs no import of the analysis app.
MEDIA_FILE_FIELDS = {
    "images": "patients.LesionImage.file",
    "thumbnails": "patients.LesionImage.thumbnail",
    "heatmaps": "inference.Analysis.heatmap",
}
# The module that gives lesions their current score, flag and unreviewed state (patients.results).
RESULTS_MODULE = "inference.scoring"

# Model versions (weights, cards, context models) are copied here by install_model.
MODEL_ROOT = Path(env("MODEL_ROOT", default=str(VAR_DIR / "models")))
DEMO_MODEL_DIR = BASE_DIR / "models" / "demo"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "melanoma_site.throttling.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # IsAuthenticated that counts refused anonymous requests per address (scope "anon").
    "DEFAULT_PERMISSION_CLASSES": ["melanoma_site.throttling.IsAuthenticated"],
    # The API contract (melanoma_site/api/): one error format, strict query parameters, page_size
    # up to a maximum, ordering that refuses unknown fields, every status code in the schema.
    "DEFAULT_PAGINATION_CLASS": "melanoma_site.api.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "melanoma_site.api.StrictFilterBackend",
        "melanoma_site.api.SearchFilter",
        "melanoma_site.api.OrderingFilter",
    ],
    "EXCEPTION_HANDLER": "melanoma_site.api.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "melanoma_site.api.schema.ContractAutoSchema",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    # Per token/user here; per address for requests without valid credentials in the
    # authenticators above. Rates read at request time from API_THROTTLE_RATES.
    "DEFAULT_THROTTLE_CLASSES": ["melanoma_site.throttling.UserThrottle"],
    # Set below from TRUSTED_PROXY_COUNT: DRF's default (None) would trust a client's X-Forwarded-For.
    "NUM_PROXIES": 0,
}
# Requests per period ("N/second|minute|hour|day"); an empty value turns that throttle off. A 429
# answers in the API's error format with Retry-After.
API_THROTTLE_RATES = {
    "user": env("API_THROTTLE_USER", default="600/minute") or None,
    "anon": env("API_THROTTLE_ANON", default="60/minute") or None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Melanoma Records API",
    "DESCRIPTION": "Patients, lesions, images and model analyses. Scores are decision support "
    "from the named model version; check its validation metrics before trusting them.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # The schema and the interactive docs are for logged-in users and API clients only.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "melanoma_site.api.schema.postprocess_schema",
    ],
}

# Audit trail (django-auditlog): create/update/delete of registered models, plus access events.
AUDITLOG_INCLUDE_ALL_MODELS = False

# Celery. With REDIS_URL set the broker is Redis; without it, an embedded file-system broker
# under var/broker, so a first run needs no server. Results live in database rows, never in a
# Celery result backend.
REDIS_URL = env("REDIS_URL", default="")
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    # Short socket timeouts: a request whose post-commit send meets a dead broker gives up in about
    # a second (the outbox rows stay pending for the sweeper) instead of hanging.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": 3600,
        "socket_connect_timeout": env.float("BROKER_CONNECT_TIMEOUT", default=2.0),
        "socket_timeout": env.float("BROKER_SOCKET_TIMEOUT", default=10.0),
    }
else:
    _broker = VAR_DIR / "broker"
    for _sub in ("out", "processed", "control"):
        (_broker / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker / "out"),
        "data_folder_out": str(_broker / "out"),
        "processed_folder": str(_broker / "processed"),
        "store_processed": False,
        "control_folder": str(_broker / "control"),
        # The file broker is polled (Redis pushes): 1 s by default, i.e. up to a second of every
        # upload's wait. A tenth of a second costs nothing measurable on an idle worker.
        "polling_interval": env.float("CELERY_FILE_BROKER_POLL", default=0.1),
    }
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_QUEUE", default="melanoma")
# Queues: every task goes to CELERY_QUEUE, except the model analyses when ANALYSIS_QUEUE names a
# queue of their own (melanoma_site.celery.route_task). Production runs one worker pool per queue
# (`-Q analyses` and `-Q context`): scoring new images is never stuck behind re-scores and heatmaps.
ANALYSIS_QUEUE = env("ANALYSIS_QUEUE", default="")
CELERY_TASK_ROUTES = ("melanoma_site.celery.route_task",)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_TIMEOUT = env.float("BROKER_CONNECT_TIMEOUT", default=2.0)
# Sending a task: one quick retry, then the outbox dispatcher gives up (the row stays pending).
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2,
                                    "interval_max": 0.2}
CELERY_TASK_ALWAYS_EAGER = False
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# How long an analysis may stay queued/running before the sweeper hands it out again.
ANALYSIS_STALE_SECONDS = env.int("ANALYSIS_STALE_SECONDS", default=300)
ANALYSIS_MAX_ATTEMPTS = env.int("ANALYSIS_MAX_ATTEMPTS", default=3)
# At most this many messages per sweep, less those already waiting in the queue (no flood).
ANALYSIS_SWEEP_LIMIT = env.int("ANALYSIS_SWEEP_LIMIT", default=200)
# CPU priority of the Celery worker below the web tier's (inference.workers): 0 keeps it equal.
WORKER_NICE = env.int("WORKER_NICE", default=10)
# Worker leases: heartbeat interval, and the silence after which a worker on another host is dead.
WORKER_HEARTBEAT_SECONDS = env.float("WORKER_HEARTBEAT_SECONDS", default=5.0)
WORKER_LEASE_SECONDS = env.float("WORKER_LEASE_SECONDS", default=60.0)
ANALYSIS_BATCH_SIZE = env.int("ANALYSIS_BATCH_SIZE", default=8)
ANALYSIS_SOFT_TIME_LIMIT = env.int("ANALYSIS_SOFT_TIME_LIMIT", default=300)
ANALYSIS_TIME_LIMIT = env.int("ANALYSIS_TIME_LIMIT", default=360)
# Grad-CAM explanation heatmaps, computed by the worker after each score (its own task).
ANALYSIS_HEATMAPS = env.bool("ANALYSIS_HEATMAPS", default=True)
# bf16 inference is used only where it stays this close to fp32 on a probe batch.
ANALYSIS_BF16_TOLERANCE = env.float("ANALYSIS_BF16_TOLERANCE", default=0.01)
# Inference runtime per member, chosen by measurement at worker start (training.runtime): the
# fastest candidate whose probabilities stay within this max |dp| of eager fp32 on a probe batch.
ANALYSIS_RUNTIME_TOLERANCE = env.float("ANALYSIS_RUNTIME_TOLERANCE", default=ANALYSIS_BF16_TOLERANCE)
# Seconds the whole probe may take (every member, every candidate); the decision is recorded per
# machine, so a restart on the same CPU re-uses it.
ANALYSIS_RUNTIME_BUDGET_S = env.float("ANALYSIS_RUNTIME_BUDGET_S", default=30.0)
# Load and probe the active model version when a worker process starts (inference.warmup).
ANALYSIS_WARMUP = env.bool("ANALYSIS_WARMUP", default=True)
# Re-score the patient context in the analysing task itself (no second round trip through the
# queue) when a batch touches at most this many patients; more are queued as their own tasks.
ANALYSIS_INLINE_RESCORE_MAX = env.int("ANALYSIS_INLINE_RESCORE_MAX", default=4)
# A prefork child loads and probes the model before it takes tasks: give it time to report alive.
CELERY_WORKER_PROC_ALIVE_TIMEOUT = env.float("CELERY_WORKER_PROC_ALIVE_TIMEOUT", default=180.0)
# Threads torch uses in a worker process: env WORKER_THREADS (default: the CPUs given to it).
CELERY_BEAT_SCHEDULE = {
    "sweep-stale-analyses": {
        "task": "inference.tasks.sweep_analyses",
        "schedule": env.float("ANALYSIS_SWEEP_INTERVAL", default=60.0),
    },
}

# Shared cache (API throttling counters): Redis when REDIS_URL is set, so every web process counts
# the same requests; else memory of the one process.
# A Redis outage makes it answer like an empty cache (melanoma_site.cache), after short timeouts:
# throttling fails open rather than the request failing.
CACHES = {
    "default": {"BACKEND": "melanoma_site.cache.TolerantRedisCache", "LOCATION": REDIS_URL,
                "KEY_PREFIX": "melanoma",
                "OPTIONS": {"socket_connect_timeout": env.float("BROKER_CONNECT_TIMEOUT", default=2.0),
                            "socket_timeout": env.float("CACHE_SOCKET_TIMEOUT", default=2.0)}}
    # Without Redis: this process' memory (the rendered pages' cache is keyed by change stamps, so a
    # cache per process is as correct as a shared one). At most 300 entries: worklist rows ~1 KB,
    # patient pages ~25 KB, API list pages up to a few hundred KB.
    if REDIS_URL else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                       "OPTIONS": {"MAX_ENTRIES": 300}},
}

# Rendered worklist rows and patient pages, cached under the change stamps of the records they show
# (patients.pagecache): never stale, so the lifetime only bounds memory. 0 turns the cache off.
PAGE_CACHE_SECONDS = env.int("PAGE_CACHE_SECONDS", default=3600)
PAGE_CACHE_ALIAS = "default"
# A patient page or API list page missing from the cache is built by one request; the others asking
# for it meanwhile wait up to this many seconds for that value, then build it themselves (0: all build).
PAGE_CACHE_BUILD_WAIT = env.float("PAGE_CACHE_BUILD_WAIT", default=1.0)
# API list pages are cached only for users who see at most this many patients (their key lists them).
PAGE_CACHE_MAX_PATIENTS = env.int("PAGE_CACHE_MAX_PATIENTS", default=2000)
# Loading the WSGI application imports every view and compiles the templates (melanoma_site/warm.py):
# under gunicorn once, in the master, so no worker -- recycled ones too -- pays for it on a request.
WEB_WARM = env.bool("WEB_WARM", default=True)

# ---------------------------------------------------------------------------------- security
# One production switch: HTTPS=true (the site is served over HTTPS, usually behind a proxy that
# terminates TLS) turns on HSTS, the redirect to HTTPS, secure session and CSRF cookies and trust in
# the proxy's X-Forwarded-Proto. `manage.py check --deploy` is clean with DEBUG=false, a real
# SECRET_KEY, ALLOWED_HOSTS and HTTPS=true (README, "Security and production configuration").
HTTPS = env.bool("HTTPS", default=False)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=HTTPS)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=HTTPS)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=HTTPS)
# Only behind a proxy that sets X-Forwarded-Proto itself (and strips the client's): BEHIND_PROXY.
BEHIND_PROXY = env.bool("BEHIND_PROXY", default=HTTPS)
if BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# The client's address, for login lockout and API throttling alike (melanoma_site.security
# .client_address): REMOTE_ADDR, or behind TRUSTED_PROXY_COUNT proxies the address the outermost
# trusted proxy appended to X-Forwarded-For (what a client writes there itself is never trusted).
TRUSTED_PROXY_COUNT = env.int("TRUSTED_PROXY_COUNT", default=1 if BEHIND_PROXY else 0)
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env.bool("SECURE_COOKIES", default=HTTPS)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"

# Content-Security-Policy (melanoma_site/security.py): every script and style sheet is a vendored
# static file of this site; no inline script anywhere. The vendor interfaces (admin, browsable API,
# Swagger UI) also get inline styles, which their templates use.
CONTENT_SECURITY_POLICY = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:", "blob:"],
    "font-src": ["'self'"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}
CSP_INLINE_STYLE_PATHS = ["/admin/", "/api/"]
CSP_REPORT_ONLY = env.bool("CSP_REPORT_ONLY", default=False)

# Login lockout (django-axes): after AXES_FAILURE_LIMIT failed logins for one account, or from one
# address, that account / address is refused for AXES_COOLOFF_MINUTES (the lockout page says so);
# staff unlock it early in the admin (Axes > Access attempts: delete, or `manage.py axes_reset`).
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("AXES_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]  # each on its own
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "melanoma_site.security.lockout_response"
AXES_HTTP_RESPONSE_CODE = 429
AXES_ENABLED = env.bool("AXES_ENABLED", default=True)
AXES_CLIENT_IP_CALLABLE = "melanoma_site.security.client_address"
REST_FRAMEWORK["NUM_PROXIES"] = TRUSTED_PROXY_COUNT

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
}
