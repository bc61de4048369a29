"""Pipeline benchmark: upload -> image score -> final (patient-context) score, with a real worker.

Sets up a scratch site in a temporary folder (SQLite and the embedded file-system broker, or Redis
when REDIS_URL is set: then a private queue on it), installs and activates the bundled model
version, seeds the demo patients, starts a real Celery worker process (prefork, concurrency 1, as
``run.sh``) and waits until it has loaded and probed the model. Then, through the REST API (DRF's
in-process client: the real upload view, validation, storage, signal and queue; no network):

* ``--single`` single-image uploads one after another (the clinic's usual case), and
* one burst of ``--burst`` uploads posted back to back,

and prints, for each, p50/p95 of upload-to-image-score and upload-to-final-score (the times are
taken from the start of the upload request, so the upload's own decoding and storing is included),
with where the time went (upload request, queue wait, decode, inference, context re-score).

    .venv/bin/python bench/pipeline.py [--single 10] [--burst 20] [--threads N] [--keep]

Bounded (``--timeout`` per phase), loopback only; everything it writes is under a temporary folder,
removed at the end (``--keep`` keeps it). The worker is stopped at the end.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pct(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def camera_jpeg(seed: int, w=1600, h=1200) -> bytes:
    """A lesion-like JPEG at a dermatoscope camera's size."""
    import numpy as np
    from PIL import Image

    from patients.demo import lesion_image

    small = Image.open(io.BytesIO(lesion_image(seed=seed, size=512, atypical=seed % 3 == 0)))
    arr = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.int16)
    arr = arr + np.random.default_rng(seed).integers(-6, 7, arr.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--single", type=int, default=10, help="single uploads, one after another")
    ap.add_argument("--burst", type=int, default=20, help="uploads in the burst")
    ap.add_argument("--threads", type=int, default=None, help="WORKER_THREADS for the worker (default: all CPUs)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds allowed per phase")
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "demo-v2" / "model.pt"))
    ap.add_argument("--no-heatmaps", action="store_true", help="switch the Grad-CAM heatmap tasks off")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()

    t_bench = time.perf_counter()
    var = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    queue = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
    env = {
        "DJANGO_SETTINGS_MODULE": "melanoma_site.settings", "VAR_DIR": str(var),
        "DATABASE_URL": f"sqlite:///{var / 'db.sqlite3'}", "MEDIA_ROOT": str(var / "media"),
        "MODEL_ROOT": str(var / "models"), "CELERY_QUEUE": queue, "NO_ALBUMENTATIONS_UPDATE": "1",
        "ANALYSIS_HEATMAPS": "false" if args.no_heatmaps else "true", "PYTHONUNBUFFERED": "1",
        "SECRET_KEY": "bench-pipeline-" + uuid.uuid4().hex, "DEBUG": "false",
    }
    if args.threads:
        env["WORKER_THREADS"] = str(args.threads)
    os.environ.update(env)
    broker = "redis " + os.environ["REDIS_URL"] if os.environ.get("REDIS_URL") else "embedded file-system broker"

    import django

    django.setup()
    from django.core.management import call_command
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.urls import reverse
    from rest_framework.test import APIClient

    from inference import services as inference_services
    from inference.models import Analysis
    from patients import services as patient_services
    from patients.models import Patient

    worker = None
    log_path = var / "worker.log"
    try:
        call_command("migrate", verbosity=0)
        with open(os.devnull, "w") as devnull:
            call_command("seed_demo", stdout=devnull)
        t0 = time.perf_counter()
        version = inference_services.install_model_version(checkpoint_path=args.checkpoint, activate=True)
        print(f"scratch site {var} ({broker}); model version {version.name} installed in "
              f"{time.perf_counter() - t0:.1f}s")

        celery = Path(sys.executable).with_name("celery")
        cmd = [str(celery), "-A", "melanoma_site", "worker", "-Q", queue, "--concurrency", "1", "--pool", "prefork",
               "--loglevel", "INFO", "-n", f"{queue}@%h", "--without-gossip", "--without-mingle",
               "--without-heartbeat"]
        t_worker = time.perf_counter()
        worker = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ}, stdout=open(log_path, "ab"),
                                  stderr=subprocess.STDOUT, start_new_session=True)

        def wait(pred, what):
            end = time.perf_counter() + args.timeout
            while time.perf_counter() < end:
                if worker.poll() is not None:
                    raise SystemExit(f"worker exited ({worker.returncode}):\n{log_path.read_text()[-3000:]}")
                if pred():
                    return
                time.sleep(0.01)
            raise SystemExit(f"timed out after {args.timeout}s waiting for {what}:\n{log_path.read_text()[-3000:]}")

        wait(lambda: "model warm" in log_path.read_text(errors="replace"), "the worker's model warm-up")
        warm_s = time.perf_counter() - t_worker
        version.refresh_from_db()
        chosen = (version.runtime.get("latest") or {}).get("chosen")
        print(f"worker started, model loaded and probed in {warm_s:.1f}s; runtime: {chosen}")
        wait(lambda: not Analysis.objects.exclude(status__in=["done", "failed"]).exists()
             and not Analysis.objects.filter(status="done", final_score__isnull=True).exists(),
             "the demo patients' backlog")
        if not args.no_heatmaps:
            wait(lambda: not Analysis.objects.filter(status="done", heatmap="", heatmap_info={}).exists(),
                 "the backlog's heatmaps")

        doctor = patient_services_user()
        patient = Patient.objects.order_by("pk").first()
        api = APIClient(HTTP_HOST="127.0.0.1")  # in process: no socket
        api.force_authenticate(doctor)

        def upload(seed):
            lesion = patient_services.create_lesion(user=doctor, patient=patient, label=f"bench {seed}",
                                                    anatomic_site="Trunk:Anterior trunk")
            data = camera_jpeg(seed)
            t_start = time.perf_counter()
            resp = api.post(reverse("api:lesion-images", args=[lesion.pk]),
                            {"files": [SimpleUploadedFile(f"b{seed}.jpg", data, content_type="image/jpeg")],
                             "image_type": "dermoscopic", "acquired_on": "2026-01-05"}, format="multipart")
            t_posted = time.perf_counter()
            if resp.status_code != 201:
                raise SystemExit(f"upload refused: {resp.status_code} {resp.content[:300]!r}")
            return {"lesion": lesion.pk, "t0": t_start, "api_s": t_posted - t_start}

        def follow(items, what):
            pending = {it["lesion"]: it for it in items}
            end = time.perf_counter() + args.timeout
            while pending and time.perf_counter() < end:
                now = time.perf_counter()
                rows = Analysis.objects.filter(image__lesion_id__in=list(pending)).values(
                    "image__lesion_id", "status", "probability", "final_score", "timings", "queued_at", "started_at",
                    "finished_at", "context_updated_at", "error")
                for r in rows:
                    it = pending.get(r["image__lesion_id"])
                    if it is None:
                        continue
                    if r["status"] == "failed":
                        raise SystemExit(f"analysis failed: {r['error']}")
                    if r["probability"] is not None and "image_s" not in it:
                        it["image_s"] = now - it["t0"]
                    if r["final_score"] is not None and "image_s" in it:
                        it["final_s"] = now - it["t0"]
                        it["row"] = r
                        del pending[r["image__lesion_id"]]
                time.sleep(0.01)
            if pending:
                raise SystemExit(f"timed out after {args.timeout}s: {len(pending)} of {what} without a final score\n"
                                 f"{log_path.read_text()[-3000:]}")
            return items

        def settle():  # the previous phase's heatmaps must not run during the next measurement
            if not args.no_heatmaps:
                wait(lambda: not Analysis.objects.filter(status="done", heatmap="", heatmap_info={}).exists(),
                     "heatmaps")

        results = {}
        singles = []
        for k in range(args.single):
            settle()
            singles.append(follow([upload(1000 + k)], "the single upload")[0])
        results[f"1 upload (x{args.single}, one after another)"] = singles
        settle()
        burst = [upload(2000 + k) for k in range(args.burst)]
        results[f"burst of {args.burst} uploads"] = follow(burst, "the burst")

        print()
        print(f"{'case':38s} {'to image score p50/p95 s':>25s} {'to final score p50/p95 s':>25s}   target: final p95 < 3 s "
              "(single upload)")
        for name, items in results.items():
            im = [it["image_s"] for it in items]
            fi = [it["final_s"] for it in items]
            print(f"{name:38s} {pct(im, .5):12.2f} / {pct(im, .95):10.2f} {pct(fi, .5):12.2f} / {pct(fi, .95):10.2f}")
        print("\nwhere the time went (medians, ms):")
        print(f"{'case':38s} {'upload req':>10s} {'queue wait':>10s} {'decode':>8s} {'inference':>10s} {'batch':>6s} "
              f"{'score->final':>12s}")
        for name, items in results.items():
            up = [it["api_s"] * 1000 for it in items]
            qw = [(it["row"]["started_at"] - it["row"]["queued_at"]).total_seconds() * 1000 for it in items]
            dec = [it["row"]["timings"].get("load_ms", 0) for it in items]
            inf = [it["row"]["timings"].get("batch_inference_ms", 0) for it in items]
            bs = [it["row"]["timings"].get("batch_size", 1) for it in items]
            ctx = [(it["final_s"] - it["image_s"]) * 1000 for it in items]
            print(f"{name:38s} {statistics.median(up):10.0f} {statistics.median(qw):10.0f} {statistics.median(dec):8.0f} "
                  f"{statistics.median(inf):10.0f} {statistics.median(bs):6.0f} {statistics.median(ctx):12.0f}")
        print("(queue wait: row created -> claimed by the worker; inference: the whole batch's model time; "
              "score->final: seen by the 10 ms poll)")
        print(f"bench total {time.perf_counter() - t_bench:.0f} s")
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
        if os.environ.get("REDIS_URL"):
            try:
                import redis

                r = redis.Redis.from_url(os.environ["REDIS_URL"], socket_connect_timeout=2)
                keys = r.keys(f"{queue}*")
                if keys:
                    r.delete(*keys)
            except Exception:  # noqa: BLE001
                pass
        if args.keep:
            print(f"kept {var}")
        else:
            shutil.rmtree(var, ignore_errors=True)


def patient_services_user():
    from django.contrib.auth import get_user_model

    return get_user_model().objects.get(username="dr.demo")


if __name__ == "__main__":
    main()
