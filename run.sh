#!/usr/bin/env bash
# README command 1: set up and run Melanoma Records on this machine.
#   - .venv with requirements (Python 3.11), database migrations, static files
#   - demo admin + demo clinicians (credentials printed) and demo patients with generated images
#   - the bundled demo model installed and activated
#   - a Celery worker (Redis when REDIS_URL is set, else an embedded file-system broker)
#   - the web server (gunicorn + WhiteNoise) on http://127.0.0.1:${PORT:-8000}/
# Embedded default: SQLite and media under ./var. Set DATABASE_URL, REDIS_URL, SECRET_KEY,
# ALLOWED_HOSTS, ... in the environment (or a .env file) for a real deployment.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
export NO_ALBUMENTATIONS_UPDATE=1
py=.venv/bin/python
PORT=${PORT:-8000}

$py manage.py migrate --noinput
$py manage.py collectstatic --noinput -v0
$py manage.py seed_demo
# The ensemble version is the active one. The first demo model is no longer bundled (models/ stays
# under 80 MB); where it was installed before it stays installed and selectable in the admin, and
# restored from git history (README) it is installed here too.
if [ -f models/demo/model.pt ]; then
  $py manage.py install_model models/demo/model.pt --name demo-se_resnet50 --skip-if-installed
fi
$py manage.py install_model models/demo-v2/model.pt --name demo-v2-ensemble --activate-if-new --skip-if-installed

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

.venv/bin/celery -A melanoma_site worker -B -Q "${CELERY_QUEUE:-melanoma}" --concurrency 1 \
  --loglevel INFO --schedule-filename "${VAR_DIR:-var}/celerybeat-schedule" &
pids+=($!)

echo
echo "Melanoma Records is running: http://127.0.0.1:${PORT}/  (Ctrl-C stops web server and worker)"
echo
.venv/bin/gunicorn melanoma_site.wsgi -c deploy/gunicorn.conf.py --bind "127.0.0.1:${PORT}" \
  --access-logfile - &
pids+=($!)
wait -n "${pids[@]}"
