"""factory_boy factories and generated test images (no image is taken from real data here)."""
import datetime
import io

import factory
import numpy as np
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from patients.models import CareTeam, Lesion, Patient

PASSWORD = "correct-horse-battery-staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"clinician{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@clinic.test")
    password = factory.PostGenerationMethodCall("set_password", PASSWORD)

    @factory.post_generation
    def _save(obj, create, extracted, **kwargs):
        if create:
            obj.save()


class StaffFactory(UserFactory):
    is_staff = True
    is_superuser = True


class CareTeamFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = CareTeam
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"Dermatology team {n}")

    @factory.post_generation
    def members(obj, create, extracted, **kwargs):
        if create and extracted:
            obj.members.add(*extracted)


class PatientFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Patient

    mrn = factory.Sequence(lambda n: f"MRN{n:06d}")
    name = factory.Sequence(lambda n: f"Patient Number{n}")
    birth_date = datetime.date(1970, 5, 17)
    sex = Patient.Sex.FEMALE
    care_team = factory.SubFactory(CareTeamFactory)


class LesionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Lesion

    patient = factory.SubFactory(PatientFactory)
    label = factory.Sequence(lambda n: f"L{n}")
    anatomic_site = "Trunk:Posterior trunk"


def lesion_like_array(width=320, height=240, seed=0, hue=(120, 80, 60)) -> np.ndarray:
    """A skin-coloured background with a darker irregular blob: looks like a lesion, made here."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = width * (0.4 + 0.2 * rng.random()), height * (0.4 + 0.2 * rng.random())
    r = min(width, height) * (0.2 + 0.1 * rng.random())
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.15 * np.sin(3 * angle + rng.random() * 6) + 0.08 * np.sin(7 * angle)
    inside = ((xx - cx) ** 2 + (yy - cy) ** 2) < (r * wobble) ** 2
    img = np.empty((height, width, 3), dtype=np.float32)
    img[...] = (215, 170, 150)
    img[inside] = hue
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def image_bytes(fmt="JPEG", width=320, height=240, seed=0, exif=None, **save_kwargs) -> bytes:
    img = Image.fromarray(lesion_like_array(width, height, seed))
    buf = io.BytesIO()
    if exif is not None:
        save_kwargs["exif"] = exif
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def uploaded(data: bytes, name="upload.jpg", content_type="image/jpeg") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type=content_type)
