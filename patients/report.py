"""The printable record: a PDF of a patient (or one lesion), built server-side with ReportLab.

Identity, each lesion with its images over time (thumbnails from the private media store), the
score of each image with the model version that produced it, that version's validation metrics and
"not validated" statement, and the review decisions and follow-ups. ``services.build_report`` checks
access and writes the audit entry; this module only lays out what it is given.
"""
from __future__ import annotations

import io
from xml.sax.saxutils import escape

from django.utils import timezone
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import (
    Image as PdfImage,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from .models import LesionImage, LesionReview, Patient
from .results import provider

THUMB_MM = 28
NOT_VALIDATED = ("NOT VALIDATED FOR CLINICAL USE: scores are decision support from the named model "
                 "version, not a diagnosis.")


def _styles():
    base = getSampleStyleSheet()
    return {
        "title": ParagraphStyle("t", parent=base["Title"], fontSize=16, spaceAfter=4, alignment=0),
        "h2": ParagraphStyle("h2", parent=base["Heading2"], fontSize=12.5, spaceBefore=10, spaceAfter=4),
        "h3": ParagraphStyle("h3", parent=base["Heading3"], fontSize=11, spaceBefore=8, spaceAfter=3),
        "body": ParagraphStyle("b", parent=base["BodyText"], fontSize=9, leading=11.5),
        "small": ParagraphStyle("s", parent=base["BodyText"], fontSize=7.5, leading=9.5, textColor=colors.HexColor("#56606d")),
        "alert": ParagraphStyle("a", parent=base["BodyText"], fontSize=9, leading=11.5,
                                textColor=colors.HexColor("#a3211b"), fontName="Helvetica-Bold"),
    }


def _p(text, style) -> Paragraph:
    return Paragraph(escape(str(text)), style)


def _pct(value) -> str:
    return "–" if value is None else f"{float(value) * 100:.0f}%"


def _metric(metrics: dict, key: str) -> str | None:
    value = metrics.get(key)
    if isinstance(value, dict):
        value = next((value[k] for k in ("value", "estimate", "mean", "point") if k in value), None)
    if not isinstance(value, (int, float)):
        return None
    ci = metrics.get(f"{key}_ci95") or metrics.get(f"{key}_ci")
    text = f"{value:.3f}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        text += f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})"
    return text


def _thumbnail(image: LesionImage):
    try:
        with image.thumbnail.storage.open(image.thumbnail.name, "rb") as fh:
            data = io.BytesIO(fh.read())
    except (OSError, ValueError):
        return Paragraph("(image file missing)", _styles()["small"])
    picture = PdfImage(data, width=THUMB_MM * mm, height=THUMB_MM * mm, kind="proportional")
    return picture


def _table(rows, widths, header=True):
    table = Table(rows, colWidths=widths, repeatRows=1 if header else 0)
    style = [
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("FONTSIZE", (0, 0), (-1, -1), 8.5),
        ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#d8dde4")),
        ("LEFTPADDING", (0, 0), (-1, -1), 4), ("RIGHTPADDING", (0, 0), (-1, -1), 4),
    ]
    if header:
        style += [("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#f0f2f5")),
                  ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold")]
    table.setStyle(TableStyle(style))
    return table


def render_report(*, patient: Patient, lesions, generated_by, title: str) -> bytes:
    """The PDF bytes for ``patient`` and the given lesions (each with its images and reviews)."""
    s = _styles()
    module = provider()
    lesions = list(lesions)
    images_by_lesion = {lesion.pk: list(lesion.images.order_by("acquired_on", "uploaded_at", "id"))
                        for lesion in lesions}
    all_images = [im for ims in images_by_lesion.values() for im in ims]
    results = module.image_results([im.pk for im in all_images]) if module and all_images else {}
    current = module.lesion_results([lesion.pk for lesion in lesions]) if module and lesions else {}
    reviews_by_lesion = {lesion.pk: list(LesionReview.objects.filter(lesion=lesion)
                                         .select_related("reviewed_by").order_by("created_at", "id"))
                         for lesion in lesions}
    now = timezone.localtime()
    today = timezone.localdate()
    story = [
        _p(title, s["title"]),
        _p(f"Generated {now:%-d %b %Y, %H:%M} by {generated_by.get_full_name() or generated_by.get_username()} "
           "· Melanoma Records", s["small"]),
        _p(NOT_VALIDATED, s["alert"]),
        _p("Patient", s["h2"]),
        _table([
            ["Name", patient.name, "Record number", patient.mrn],
            ["Date of birth", f"{patient.birth_date:%-d %b %Y} ({patient.age_on(today)} years)", "Sex",
             patient.get_sex_display()],
            ["Skin type", patient.get_fitzpatrick_skin_type_display() or "Not recorded", "Care team",
             str(patient.care_team)],
        ], [30 * mm, 55 * mm, 30 * mm, 55 * mm], header=False),
    ]
    versions = {}
    for r in list(results.values()) + list(current.values()):
        versions[r.version.pk] = r.version

    story.append(_p(f"Lesions ({len(lesions)})", s["h2"]))
    if not lesions:
        story.append(_p("No lesions recorded.", s["body"]))
    for lesion in lesions:
        block = [_p(f"{lesion.label} — {lesion.get_anatomic_site_display() or 'site not recorded'}", s["h3"])]
        facts = []
        if lesion.diagnosis:
            facts.append(f"Final diagnosis: {lesion.get_diagnosis_display()}")
        r = current.get(lesion.pk)
        if r is not None:
            facts.append(f"Current score {_pct(r.score)} by model {r.version.name}"
                         + (" — FLAGGED (at or above the operating threshold)" if r.flagged else "")
                         + f"; operating threshold {r.threshold * 100:.1f}%")
        if lesion.notes:
            facts.append(f"Notes: {lesion.notes}")
        block += [_p(f, s["body"]) for f in facts]
        images = images_by_lesion[lesion.pk]
        if images:
            rows = [["Image", "Date", "Type", "Score (model version)", "Image quality"]]
            for im in images:
                ir = results.get(im.pk)
                score = (f"{_pct(ir.score)}{' flagged' if ir.flagged else ''} ({ir.version.name})"
                         if ir is not None else "no result")
                warnings = "; ".join(w["message"] for w in (im.quality or {}).get("warnings", [])) or (
                    "no problems found" if (im.quality or {}).get("version") else "not assessed")
                rows.append([_thumbnail(im), f"{im.acquired_on:%-d %b %Y}", im.get_image_type_display(),
                             _p(score, s["body"]), _p(warnings, s["small"])])
            block.append(Spacer(1, 3))
            block.append(_table(rows, [31 * mm, 22 * mm, 25 * mm, 45 * mm, 47 * mm]))
        else:
            block.append(_p("No images.", s["body"]))
        reviews = reviews_by_lesion[lesion.pk]
        if reviews:
            rows = [["Reviewed", "By", "Decision", "Follow-up due", "Note"]]
            for i, rv in enumerate(reviews):
                status = "" if i == len(reviews) - 1 else " (superseded)"
                rows.append([f"{timezone.localtime(rv.created_at):%-d %b %Y}",
                             _p(rv.reviewed_by.get_full_name() or rv.reviewed_by.get_username(), s["body"]),
                             _p(rv.get_decision_display() + status, s["body"]),
                             f"{rv.follow_up_due:%-d %b %Y}" if rv.follow_up_due else "—",
                             _p(rv.note or "—", s["body"])])
            block.append(Spacer(1, 3))
            block.append(_p("Review decisions (oldest first; the last one is in force)", s["body"]))
            block.append(_table(rows, [22 * mm, 28 * mm, 32 * mm, 24 * mm, 64 * mm]))
        else:
            block.append(_p("Not reviewed yet.", s["body"]))
        story.append(KeepTogether(block[:3]))
        story += block[3:]

    story.append(_p("Model versions", s["h2"]))
    if not versions:
        story.append(_p("No model results in this report.", s["body"]))
    for v in versions.values():
        m = v.metrics or {}
        lines = [f"{v.name}: {v.architecture}, {v.input_size} px input, operating threshold {v.threshold * 100:.1f}%."]
        for key, label in (("roc_auc", "ROC-AUC"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity")):
            text = _metric(m, key)
            if text:
                lines.append(f"{label} {text}")
        if m.get("n"):
            lines.append(f"Evaluated on {m['n']} images ({m.get('n_melanoma', '?')} melanomas).")
        story.append(_p(" · ".join(lines), s["body"]))
        story.append(_p("Validated for clinical use." if v.validated else
                        f"Model {v.name} is NOT VALIDATED FOR CLINICAL USE.", s["alert"] if not v.validated else s["body"]))
    story.append(Spacer(1, 6))
    story.append(_p("Scores are decision support from the named model version; not a diagnosis.", s["small"]))

    buf = io.BytesIO()

    def footer(canvas, doc):
        canvas.saveState()
        canvas.setFont("Helvetica", 7.5)
        canvas.setFillColor(colors.HexColor("#56606d"))
        canvas.drawString(15 * mm, 10 * mm, f"{patient.name} · {patient.mrn} · confidential patient record")
        canvas.drawRightString(A4[0] - 15 * mm, 10 * mm, f"Page {doc.page}")
        canvas.restoreState()

    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm, topMargin=15 * mm,
                            bottomMargin=18 * mm, title=title, author="Melanoma Records",
                            subject=f"Patient {patient.mrn}")
    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    return buf.getvalue()
