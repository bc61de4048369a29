"""Clinical vocabularies, taken from the ISIC Archive's own metadata package (isic-metadata)."""
from isic_metadata.anatom_site_hierarchical import AnatomSiteEnum
from isic_metadata.diagnosis_hierarchical import DiagnosisEnum
from isic_metadata.fields import FitzpatrickSkinType

# Stored value = the ISIC hierarchical value ("Trunk:Posterior trunk"); shown as a readable path.
ANATOMIC_SITE_CHOICES = [(e.value, e.value.replace(":", " › ")) for e in AnatomSiteEnum]
DIAGNOSIS_CHOICES = [(e.value, e.value.replace(":", " › ")) for e in DiagnosisEnum]
FITZPATRICK_CHOICES = [(e.value, f"Type {e.value}") for e in FitzpatrickSkinType]

MELANOMA_PREFIX = "Malignant:Malignant melanocytic proliferations (Melanoma)"


def anatomic_region(site: str) -> str:
    """The top level of an ISIC hierarchical site ("Trunk:Posterior trunk" -> "Trunk"); "" if none."""
    return site.split(":", 1)[0] if site else ""


def is_melanoma_diagnosis(diagnosis: str) -> bool:
    return bool(diagnosis) and diagnosis.startswith(MELANOMA_PREFIX)
