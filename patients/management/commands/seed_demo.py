"""Create a demo admin, two demo clinicians on separate care teams and a few demo patients.

Idempotent: running it again creates nothing twice and prints the same credentials. Passwords come
from DEMO_PASSWORD when set; otherwise they are generated once and kept in VAR_DIR (mode 600).
"""
import datetime
import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token

from patients import services
from patients.demo import lesion_image
from patients.models import CareTeam, Patient

DEMO_PATIENTS = [
    # mrn, name, birth date, sex, [(label, site, [(seed, atypical), ...]), ...]
    ("DEMO-0001", "Anna Lindqvist", datetime.date(1961, 3, 14), "female", [
        ("L1 upper back", "Trunk:Posterior trunk", [(11, False), (12, False)]),
        ("L2 left shoulder", "Upper extremity:Shoulder", [(21, False)]),
        ("L3 lower back", "Trunk:Posterior trunk", [(31, False)]),
        ("L4 right scapula", "Trunk:Posterior trunk", [(41, True)]),
    ]),
    ("DEMO-0002", "Marco Bianchi", datetime.date(1978, 9, 2), "male", [
        ("L1 chest", "Trunk:Anterior trunk", [(51, False)]),
        ("L2 left thigh", "Lower extremity:Thigh", [(61, False), (62, False)]),
    ]),
    ("DEMO-0003", "Grace Okafor", datetime.date(1990, 1, 27), "female", [
        ("L1 forearm", "Upper extremity:Forearm", [(71, False)]),
    ]),
]


def _password(name: str) -> str:
    if os.environ.get("DEMO_PASSWORD"):
        return os.environ["DEMO_PASSWORD"]
    path = settings.VAR_DIR / f"demo_password_{name}"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(12))
        path.chmod(0o600)
    return path.read_text().strip()


class Command(BaseCommand):
    help = "Create demo users, care teams and patients with generated images (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--token", action="store_true",
                            help="Only print the demo clinician's API token (for scripts: the README's examples).")

    def handle(self, *args, **options):
        User = get_user_model()
        if options["token"]:
            doctor = User.objects.filter(username="dr.demo").first()
            if doctor is None:
                raise CommandError("No demo clinician yet: run ./run.sh (or manage.py seed_demo) first.")
            self.stdout.write(Token.objects.get_or_create(user=doctor)[0].key)
            return
        creds = []

        def user(username, **extra):
            u, _ = User.objects.get_or_create(username=username, defaults=extra)
            pw = _password(username)
            if not u.check_password(pw):
                u.set_password(pw)
                u.save()
            creds.append((username, pw))
            return u

        user("admin", is_staff=True, is_superuser=True, email="admin@clinic.example")
        doctor = user("dr.demo", first_name="Demo", last_name="Clinician", email="dr.demo@clinic.example")
        other = user("dr.other", first_name="Other", last_name="Clinician", email="dr.other@clinic.example")
        team_a, _ = CareTeam.objects.get_or_create(name="Dermatology A")
        team_a.members.add(doctor)
        team_b, _ = CareTeam.objects.get_or_create(name="Dermatology B")
        team_b.members.add(other)

        for mrn, name, born, sex, lesions in DEMO_PATIENTS:
            if Patient.objects.filter(mrn=mrn).exists():
                continue
            patient = services.create_patient(
                user=doctor, mrn=mrn, name=name, birth_date=born, sex=sex, care_team=team_a
            )
            for label, site, images in lesions:
                lesion = services.create_lesion(user=doctor, patient=patient, label=label, anatomic_site=site)
                for i, (seed, atypical) in enumerate(images):
                    services.upload_images(
                        user=doctor,
                        lesion=lesion,
                        files=[SimpleUploadedFile(f"demo{seed}.jpg", lesion_image(seed=seed, atypical=atypical))],
                        image_type="dermoscopic",
                        acquired_on=datetime.date(2025, 3 + 4 * i, 10),
                    )
            self.stdout.write(f"created demo patient {mrn}")

        token, _ = Token.objects.get_or_create(user=doctor)
        self.stdout.write(self.style.SUCCESS("Demo accounts (passwords kept in %s):" % settings.VAR_DIR))
        for username, pw in creds:
            role = "admin" if username == "admin" else "clinician"
            self.stdout.write(f"  {role:9s}  {username:9s}  password: {pw}")
        self.stdout.write(f"  API token for dr.demo: {token.key}  (header 'Authorization: Token {token.key}')")
