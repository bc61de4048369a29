"""The body map: a front and a back outline side by side, and which ISIC site a point on it is.

A lesion's ``body_map_x``/``body_map_y`` are fractions of the whole map (front figure on the left
half, back figure on the right half). The regions below are the ONE definition of "where on the
map is which site": pages render them as clickable areas (the click's area names the suggested
site), and :func:`suggest_site` answers the same question on the server.
"""
from __future__ import annotations

from dataclasses import dataclass

WIDTH, HEIGHT = 200, 200  # SVG user units; each figure is 100 wide, front at x 0-100, back at 100-200
FRONT, BACK = "front", "back"

# Figure-local rectangles (x0, y0, x1, y1) in a 100 x 200 box, and the site on the front / back.
_ARM_L, _ARM_R = (16, 32), (68, 84)
_REGIONS = [
    # head and neck
    ((36, 3, 64, 31), "Head and neck:Head:Face", "Head and neck:Head:Scalp"),
    ((42, 31, 58, 36), "Head and neck:Neck:Front of neck", "Head and neck:Neck:Nape of neck"),
    # trunk
    ((33, 34, 67, 60), "Trunk:Anterior trunk:Anterior chest", "Trunk:Posterior trunk:Upper back"),
    ((33, 60, 67, 80), "Trunk:Anterior trunk:Anterior abdomen", "Trunk:Posterior trunk:Mid back"),
    ((33, 80, 67, 96), "Trunk:Anterior trunk:Anterior abdomen:Lower anterior abdomen",
     "Trunk:Posterior trunk:Lower back"),
    ((33, 96, 67, 106), "Anogenital region:Genital region", "Lower extremity:Buttock"),
    # legs (both sides)
    ((34, 106, 66, 140), "Lower extremity:Thigh:Anterior thigh", "Lower extremity:Thigh:Posterior thigh"),
    ((34, 140, 66, 150), "Lower extremity:Knee:Patellar region", "Lower extremity:Knee:Popliteal fossa"),
    ((34, 150, 66, 182), "Lower extremity:Lower leg:Shin", "Lower extremity:Lower leg:Calf"),
    ((34, 182, 66, 188), "Lower extremity:Ankle:Anterior ankle", "Lower extremity:Ankle:Achilles region"),
    ((34, 188, 66, 196), "Lower extremity:Foot:Dorsum of foot", "Lower extremity:Foot:Sole of foot:Heel"),
]
for x0, x1 in (_ARM_L, _ARM_R):
    _REGIONS += [
        ((x0, 34, x1, 44), "Upper extremity:Shoulder:Anterior shoulder", "Upper extremity:Shoulder:Posterior shoulder"),
        ((x0, 44, x1, 66), "Upper extremity:Upper arm:Anterior upper arm", "Upper extremity:Upper arm:Posterior upper arm"),
        ((x0, 66, x1, 72), "Upper extremity:Elbow:Antecubital fossa", "Upper extremity:Elbow:Elbow tip"),
        ((x0, 72, x1, 90), "Upper extremity:Forearm:Volar forearm", "Upper extremity:Forearm:Dorsal forearm"),
        ((x0, 90, x1, 104), "Upper extremity:Hand:Palm of hand", "Upper extremity:Hand:Dorsum of hand"),
    ]


@dataclass(frozen=True)
class Region:
    view: str
    site: str
    x: float  # map units
    y: float
    width: float
    height: float

    @property
    def label(self) -> str:
        return f"{'Front' if self.view == FRONT else 'Back'}: {self.site.replace(':', ' › ')}"


REGIONS = [Region(view, site, x0 + offset, y0, x1 - x0, y1 - y0)
           for offset, view in ((0, FRONT), (100, BACK))
           for (x0, y0, x1, y1), front_site, back_site in _REGIONS
           for site in [front_site if view == FRONT else back_site]]


def suggest_site(x: float | None, y: float | None) -> tuple[str, str] | None:
    """(ISIC site, "front"/"back") for a point given as fractions of the map; None off the body."""
    if x is None or y is None:
        return None
    px, py = float(x) * WIDTH, float(y) * HEIGHT
    for r in REGIONS:
        if r.x <= px <= r.x + r.width and r.y <= py <= r.y + r.height:
            return r.site, r.view
    return None


def view_of(x: float | None) -> str | None:
    return None if x is None else (FRONT if float(x) < 0.5 else BACK)


def dot(lesion, result=None, *, url: str = "") -> dict | None:
    """A lesion's dot on the map (None if it has no position), coloured by its current result."""
    if lesion.body_map_x is None or lesion.body_map_y is None:
        return None
    level = result.level if result is not None else "none"
    score = f", {result.score * 100:.0f}% by model {result.version.name}" if result is not None else ", no result yet"
    flag = " (flagged)" if result is not None and result.flagged else ""
    return {"x": round(float(lesion.body_map_x) * WIDTH, 2), "y": round(float(lesion.body_map_y) * HEIGHT, 2),
            "level": level, "flagged": bool(result is not None and result.flagged), "url": url,
            "label": f"{lesion.label}{score}{flag}", "lesion": lesion.pk}
