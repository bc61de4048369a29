"""The clinician's day in a real browser (Debian's Chromium, driven by Playwright).

A clinician sees the worklist's score column, works the To-review queue, records a decision with a
follow-up, finds it in the follow-ups list, compares two visits with synchronised zoom, steps
through images with the keyboard, downloads the PDF report, uploads a small image and sees the
quality warning, and checks the phone layout. Screenshots go to $SHOTS_DIR when it is set (the
developer looks at them), else to the test's temporary folder.
"""
import datetime
import io
import os
import subprocess
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.utils import timezone
from PIL import Image, ImageFilter

from tests.factories import PASSWORD, CareTeamFactory, LesionFactory, PatientFactory, UserFactory, lesion_like_array
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, IN_CI, browser_page  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not IN_CI and not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]

ALL_LOADED = """
sel => {
  const imgs = Array.from(document.querySelectorAll(sel));
  return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
}
"""


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _stored_image(lesion, *, day, seed, probability, version, shift=0, blur=0):
    """An image stored through the upload validation (quality measured), with a finished analysis."""
    from inference.models import Analysis
    from patients.models import LesionImage
    from patients.uploads import process_upload

    arr = lesion_like_array(720, 540, seed=seed)
    img = Image.fromarray(arr)
    if shift:  # the "later visit": the lesion grew a little
        img = img.resize((720 + shift, 540 + shift)).crop((shift // 2, shift // 2, 720 + shift // 2, 540 + shift // 2))
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    p = process_upload(_jpeg(img))
    image = LesionImage(lesion=lesion, sha256=p.sha256, upload_sha256=p.upload_sha256, width=p.width,
                        height=p.height, size_bytes=len(p.content), format=p.format,
                        original_format=p.original_format, acquired_on=day, quality=p.quality)
    image.file.save("i.jpg", ContentFile(p.content), save=False)
    image.thumbnail.save("t.jpg", ContentFile(p.thumbnail), save=False)
    image.save()
    Analysis.objects.create(image=image, model_version=version, status="done", probability=probability,
                            final_score=probability, final_score_source="image", finished_at=timezone.now())
    return image


@pytest.fixture
def day_records(transactional_db):
    from inference.models import ModelVersion
    from patients import services
    from patients.models import LesionReview

    clinician = UserFactory(username="dr_day", first_name="Dana", last_name="Day")
    team = CareTeamFactory(name="Dermatology day", members=[clinician])
    other = CareTeamFactory(name="Other team", members=[UserFactory(username="dr_other")])
    from django.conf import settings

    from inference.tasks import make_heatmap
    from tests.worker_utils import register_version

    # The bundled ensemble version, so the heatmaps below are what the worker would make with it.
    v = register_version(
        Path(settings.BASE_DIR) / "models" / "demo-v2" / "model.pt", name="demo-2026-11",
        metrics={"roc_auc": 0.76, "roc_auc_ci95": [0.741, 0.778], "sensitivity": 0.9, "specificity": 0.455,
                 "n": 3775, "n_melanoma": 613}, threshold=0.408)
    ada = PatientFactory(mrn="DAY-001", name="Ada Lovelace", care_team=team, birth_date=datetime.date(1961, 12, 10))
    back = LesionFactory(patient=ada, label="L1 upper back", anatomic_site="Trunk:Posterior trunk:Upper back",
                         body_map_x=0.77, body_map_y=0.24)
    calf = LesionFactory(patient=ada, label="L2 left calf", anatomic_site="Lower extremity",
                         body_map_x=0.79, body_map_y=0.83)
    first = _stored_image(back, day=datetime.date(2025, 3, 4), seed=31, probability=0.22, version=v)
    second = _stored_image(back, day=datetime.date(2026, 5, 19), seed=31, probability=0.71, version=v, shift=60)
    _stored_image(calf, day=datetime.date(2026, 5, 19), seed=32, probability=0.12, version=v)
    for image in (first, second):  # what the worker does after each score
        assert make_heatmap(image.analyses.get().pk)
    bob = PatientFactory(mrn="DAY-002", name="Bob Babbage", care_team=team)
    arm = LesionFactory(patient=bob, label="L1 right forearm", anatomic_site="Upper extremity")
    _stored_image(arm, day=datetime.date(2026, 6, 2), seed=33, probability=0.33, version=v, blur=6)
    # A follow-up that is already overdue (reviewed months ago).
    old = LesionFactory(patient=bob, label="L2 scalp", anatomic_site="Head & neck:Scalp")
    review = services.record_review(user=clinician, lesion=old, decision="monitor", follow_up_months=3,
                                    note="Short-term dermoscopic follow-up")
    LesionReview.objects.filter(pk=review.pk).update(follow_up_due=timezone.localdate() - datetime.timedelta(days=9))
    foreign = PatientFactory(mrn="OTHER-1", name="Not Mine", care_team=other)
    _stored_image(LesionFactory(patient=foreign, label="foreign"), day=datetime.date(2026, 1, 1), seed=34,
                  probability=0.99, version=v)
    return {"ada": ada, "back": back, "calf": calf, "first": first, "second": second, "bob": bob}


def _shots(tmp_path) -> Path:
    folder = Path(os.environ.get("SHOTS_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _login(page, url):
    page.goto(url + "/accounts/login/")
    page.fill("#id_username", "dr_day")
    page.fill("#id_password", PASSWORD)
    page.get_by_role("button", name="Log in").click()


def test_clinicians_day_queue_review_compare_report(live_server, day_records, browser_page, tmp_path):
    from playwright.sync_api import expect

    page, url, shots = browser_page, live_server.url, _shots(tmp_path)
    page.set_default_timeout(40_000)  # the machine may be busy (model training shares the CPUs)
    _login(page, url)

    # Worklist: highest current score (with its model version), flag and unreviewed count per patient.
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    ada_row = page.locator("tr", has_text="Ada Lovelace")
    expect(ada_row).to_contain_text("71%")
    expect(ada_row).to_contain_text("Flagged")
    expect(ada_row).to_contain_text("model demo-2026-11")
    expect(ada_row).to_contain_text("2 new")
    expect(page.locator("tr", has_text="Bob Babbage")).to_contain_text("33%")
    expect(page.locator("body")).not_to_contain_text("Not Mine")
    page.screenshot(path=str(shots / "worklist.png"), full_page=True)

    # "/" focuses the search box.
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "id_q"
    page.keyboard.press("Escape")

    # The queue: flagged first, then by score.
    page.get_by_role("link", name="To review", exact=True).click()
    expect(page.get_by_role("heading", name="To review", level=1)).to_be_visible()
    rows = page.locator("table.queue tbody tr")
    expect(rows).to_have_count(3)
    labels = [t.strip() for t in rows.locator(".row-link").all_inner_texts()]
    assert labels == ["L1 upper back", "L1 right forearm", "L2 left calf"], labels
    expect(rows.first).to_contain_text("Flagged")
    expect(rows.first).to_contain_text("not validated")
    page.wait_for_function(ALL_LOADED, arg=".queue-thumb")
    page.screenshot(path=str(shots / "queue.png"), full_page=True)

    # Review the flagged lesion: monitor, 3-month follow-up.
    rows.first.get_by_role("link", name="Review").click()
    expect(page.locator("#review")).to_contain_text("New result to review")
    page.select_option("#id_decision", "monitor")
    page.select_option("#id_follow_up_months", "3")
    page.fill("#id_note", "Asymmetric growth since March 2025; dermoscopy again in 3 months.")
    page.get_by_role("button", name="Record review").click()
    expect(page.locator(".messages")).to_contain_text("Review recorded: Monitor. Follow-up due")
    expect(page.locator("#review")).not_to_contain_text("New result to review")
    expect(page.locator(".review-list li")).to_have_count(1)
    page.goto(url + "/patients/review/")
    expect(page.locator("table.queue tbody tr")).to_have_count(2)

    # Follow-ups: the overdue one; with a year's horizon, the new one too.
    page.get_by_role("link", name="Follow-ups", exact=True).click()
    expect(page.locator("table.follow-ups tbody tr")).to_have_count(1)
    expect(page.locator("table.follow-ups")).to_contain_text("9 days overdue")
    page.select_option("#id_within", "365")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("table.follow-ups tbody tr")).to_have_count(2)
    expect(page.locator("table.follow-ups tbody tr").nth(1)).to_contain_text("L1 upper back")

    # Lesion page: p / n step between the patient's lesions (in the patient page's order: by site).
    back, calf = day_records["back"], day_records["calf"]
    page.goto(f"{url}/patients/lesions/{back.pk}/")
    page.keyboard.press("p")
    expect(page.get_by_role("heading", name="L2 left calf", level=1)).to_be_visible()
    page.keyboard.press("n")
    expect(page.get_by_role("heading", name="L1 upper back", level=1)).to_be_visible()

    # Compare the two visits: dates, time between, score change; zoom and pan move both images.
    page.get_by_role("link", name="Compare over time").click()
    expect(page.locator("[data-compare-span]")).to_have_text("1 year 2 months (441 days)")
    expect(page.locator("[data-compare-change]")).to_contain_text("22% → 71% (+49 points)")
    page.wait_for_function(ALL_LOADED, arg="[data-zoom-image]")
    page.get_by_role("button", name="Zoom in").click()
    page.get_by_role("button", name="Zoom in").click()
    scales = page.locator("[data-zoom-viewport]").evaluate_all("vs => vs.map(v => v.dataset.zoomScale)")
    assert scales == ["2.250", "2.250"], scales
    vp = page.locator("[data-zoom-viewport]").first
    box = vp.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 - 80, box["y"] + box["height"] / 2 - 40, steps=5)
    page.mouse.up()
    transforms = page.locator("[data-zoom-image]").evaluate_all("is => is.map(i => i.style.transform)")
    assert transforms[0] == transforms[1] and "translate(" in transforms[0] and "scale(2.25)" in transforms[0]
    assert transforms[0] != "translate(0px, 0px) scale(2.25)"  # it did pan
    page.mouse.move(box["x"] + 100, box["y"] + 100)
    page.mouse.wheel(0, -200)
    page.wait_for_function("() => document.querySelectorAll('[data-zoom-scale=\"2.700\"]').length === 2")
    page.keyboard.press("0")
    page.keyboard.press("+")
    # The Grad-CAM overlays: off until asked for, then on both images, zoomed with them.
    expect(page.locator("[data-heatmap]")).to_have_count(2)
    assert page.locator("[data-heatmap]").evaluate_all("hs => hs.map(h => h.hidden)") == [True, True]
    toggle = page.get_by_role("button", name="Show heatmap")
    toggle.click()
    expect(page.get_by_role("button", name="Hide heatmap")).to_have_attribute("aria-pressed", "true")
    page.wait_for_function(ALL_LOADED, arg="[data-heatmap]")
    overlay = page.locator("[data-heatmap]").evaluate_all("hs => hs.map(h => [h.hidden, h.style.transform])")
    assert all(not hidden and "scale(1.5)" in t for hidden, t in overlay), overlay
    expect(page.locator(".heatmap-note")).to_contain_text("Grad-CAM of model demo-2026-11")
    page.screenshot(path=str(shots / "compare.png"), full_page=True)
    page.keyboard.press("h")
    assert page.locator("[data-heatmap]").evaluate_all("hs => hs.map(h => h.hidden)") == [True, True]
    page.keyboard.press("Escape")
    expect(page.get_by_role("heading", name="L1 upper back", level=1)).to_be_visible()

    # The in-app viewer: arrows between images, Esc back.
    first, second = day_records["first"], day_records["second"]
    page.locator(f"#image-{first.pk} .image-link").click()
    expect(page).to_have_url(f"{url}/patients/images/{first.pk}/view/")
    page.wait_for_function(ALL_LOADED, arg="[data-zoom-image]")
    page.keyboard.press("ArrowRight")
    expect(page).to_have_url(f"{url}/patients/images/{second.pk}/view/")
    page.keyboard.press("ArrowLeft")
    expect(page).to_have_url(f"{url}/patients/images/{first.pk}/view/")
    page.keyboard.press("Escape")
    expect(page.get_by_role("heading", name="L1 upper back", level=1)).to_be_visible()

    # The PDF report of the patient, from the patient page.
    ada = day_records["ada"]
    page.goto(f"{url}/patients/{ada.pk}/")
    href = page.get_by_role("link", name="PDF report").get_attribute("href")
    response = page.request.get(url + href)
    assert response.status == 200 and response.headers["content-type"] == "application/pdf"
    pdf_path = shots / "report.pdf"
    pdf_path.write_bytes(response.body())
    from pypdf import PdfReader

    text = " ".join(p.extract_text() for p in PdfReader(str(pdf_path)).pages).replace("\n", " ")
    for expected in ("Ada Lovelace", "DAY-001", "L1 upper back", "71%", "demo-2026-11", "NOT VALIDATED",
                     "Monitor", "Asymmetric growth"):
        assert expected in text, expected
    if Path("/usr/bin/pdftoppm").exists():
        subprocess.run(["pdftoppm", "-png", "-r", "80", "-f", "1", "-l", "1", "-singlefile", str(pdf_path),
                        str(shots / "report-page1")], check=True, timeout=60)
        assert (shots / "report-page1.png").stat().st_size > 0

    # Upload a small image: stored, with a quality warning that stays beside it.
    small = tmp_path / "small.jpg"
    small.write_bytes(_jpeg(Image.fromarray(lesion_like_array(180, 180, seed=40))))
    page.goto(f"{url}/patients/lesions/{calf.pk}/")
    expect(page.locator("[data-dropzone].dropzone-js")).to_have_count(1)
    page.set_input_files("#id_files", [str(small)])
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator(".messages")).to_contain_text("1 image uploaded")
    expect(page.locator(".messages")).to_contain_text("small.jpg: small image (180×180 px")
    expect(page.locator('[data-quality="small"]')).to_have_count(1)

    # Body map: place a new lesion by clicking the back outline; the site is suggested and filled in;
    # the diagnosis picker is searchable. On the patient page, dots are coloured by flag.
    page.goto(f"{url}/patients/{ada.pk}/lesions/new/")
    page.fill("#id_label", "L3 right upper back")
    svg = page.locator("svg[data-body-map-input]")
    box = svg.bounding_box()
    page.mouse.click(box["x"] + 0.70 * box["width"], box["y"] + 0.25 * box["height"])
    expect(page.locator("[data-site-suggestion]")).to_contain_text("Suggested site (back): Trunk › Posterior trunk › Upper back")
    assert page.input_value("#id_anatomic_site") == "Trunk:Posterior trunk:Upper back"
    assert abs(float(page.input_value("#id_body_map_x")) - 0.70) < 0.01
    assert abs(float(page.input_value("#id_body_map_y")) - 0.25) < 0.01
    page.locator('[data-picker-for="id_diagnosis"]').fill("melanoma in situ")
    expect(page.locator("#id_diagnosis + .picker-count, .picker-count").last).to_contain_text("match")
    assert "in situ" in page.input_value("#id_diagnosis").lower()
    page.locator('[data-picker-for="id_anatomic_site"]').fill("posterior calf")
    assert page.input_value("#id_anatomic_site") == "Lower extremity:Lower leg:Calf:Posterior calf"
    box = svg.bounding_box()  # the pickers' match counts moved the map down
    page.mouse.click(box["x"] + 0.70 * box["width"], box["y"] + 0.25 * box["height"])
    page.get_by_role("button", name="Use this site").click()
    assert page.input_value("#id_anatomic_site") == "Trunk:Posterior trunk:Upper back"
    expect(page.get_by_role("button", name="Use this site")).to_be_hidden()
    assert page.input_value('[data-picker-for="id_anatomic_site"]') == ""  # the site search no longer applies
    page.screenshot(path=str(shots / "bodymap-form.png"), full_page=True)
    page.get_by_role("button", name="Add lesion").click()
    expect(page.get_by_role("heading", name="L3 right upper back", level=1)).to_be_visible()
    page.goto(f"{url}/patients/{ada.pk}/")
    dots = page.locator(".body-map-card .body-map-dot")
    expect(dots).to_have_count(3)
    assert page.locator(f'.body-map-card [data-lesion="{back.pk}"]').get_attribute("class") == \
        "body-map-dot dot-high dot-flagged"
    page.locator(".body-map-card").screenshot(path=str(shots / "bodymap.png"))
    page.locator(f'.body-map-card [data-lesion="{calf.pk}"]').click()
    expect(page.get_by_role("heading", name="L2 left calf", level=1)).to_be_visible()

    # Favicon, and the docs for a logged-out visitor.
    icon = page.request.get(url + "/favicon.ico")
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/")
    anonymous = page.context.browser.new_context(base_url=url)
    try:
        anon_page = anonymous.new_page()
        anon_page.goto(url + "/api/v1/docs/")
        expect(anon_page).to_have_url(url + "/accounts/login/?next=/api/v1/docs/")
    finally:
        anonymous.close()

    # A 390 px phone: no page-wide horizontal scrolling; wide tables scroll inside their frame.
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/patients/", "/patients/review/", "/patients/follow-ups/", f"/patients/{ada.pk}/",
                 f"/patients/lesions/{back.pk}/", f"/patients/lesions/{back.pk}/compare/"):
        page.goto(url + path)
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        wide = page.evaluate("""() => Array.from(document.querySelectorAll('body *'))
            .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1
                         && !(e.parentElement && e.parentElement.getBoundingClientRect().right > document.documentElement.clientWidth + 1))
            .slice(0, 8).map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))""")
        assert overflow <= 0, (path, overflow, wide)
    page.goto(url + f"/patients/{ada.pk}/")
    page.screenshot(path=str(shots / "phone-patient.png"), full_page=True)
    page.goto(url + "/patients/")
    page.screenshot(path=str(shots / "phone-worklist.png"), full_page=True)



@pytest.fixture
def csp_records(transactional_db):
    """A patient with two lesions, analysed images and a staff account (no heatmaps: quick)."""
    from django.conf import settings

    from tests.factories import StaffFactory
    from tests.worker_utils import register_version

    clinician = UserFactory(username="dr_day", first_name="Dana", last_name="Day")
    team = CareTeamFactory(name="Dermatology CSP", members=[clinician])
    StaffFactory(username="admin_day")
    v = register_version(Path(settings.BASE_DIR) / "models" / "demo-v2" / "model.pt", name="demo-csp",
                         threshold=0.408)
    ada = PatientFactory(mrn="CSP-001", name="Ada Lovelace", care_team=team, birth_date=datetime.date(1961, 12, 10))
    back = LesionFactory(patient=ada, label="L1 upper back", anatomic_site="Trunk:Posterior trunk:Upper back",
                         body_map_x=0.77, body_map_y=0.24)
    calf = LesionFactory(patient=ada, label="L2 left calf", anatomic_site="Lower extremity",
                         body_map_x=0.79, body_map_y=0.83)
    _stored_image(back, day=datetime.date(2025, 3, 4), seed=31, probability=0.22, version=v)
    second = _stored_image(back, day=datetime.date(2026, 5, 19), seed=31, probability=0.71, version=v, shift=60)
    _stored_image(calf, day=datetime.date(2026, 5, 19), seed=32, probability=0.12, version=v)
    return {"ada": ada, "back": back, "second": second, "version": v}


def test_main_pages_report_no_content_security_policy_violation(live_server, csp_records, browser_page):
    """The pages (the site's, the admin, the browsable API, Swagger UI, the lockout page) load their
    scripts and styles under the Content-Security-Policy without one violation. The fixture records
    every violation the browser reports and fails the test if there is any."""
    from playwright.sync_api import expect

    page, url = browser_page, live_server.url
    ada, back, second, version = (csp_records[k] for k in ("ada", "back", "second", "version"))
    assert "script-src 'self'" in page.request.get(url + "/accounts/login/").headers["content-security-policy"]
    _login(page, url)
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    for path in ("/patients/", "/patients/review/", "/patients/follow-ups/", "/patients/new/",
                 f"/patients/{ada.pk}/", f"/patients/{ada.pk}/edit/", f"/patients/{ada.pk}/lesions/new/",
                 f"/patients/lesions/{back.pk}/", f"/patients/lesions/{back.pk}/edit/",
                 f"/patients/lesions/{back.pk}/compare/", f"/patients/images/{second.pk}/view/",
                 "/analyses/models/", f"/analyses/models/{version.pk}/"):
        page.goto(url + path)
        page.wait_for_load_state("networkidle")
    # The styled analysis result and the context chart render from the style sheet alone.
    page.goto(f"{url}/patients/lesions/{back.pk}/")
    score = page.locator(".analysis-result .score").first
    assert score.evaluate("e => getComputedStyle(e).borderTopLeftRadius") == "4px"
    page.goto(url + "/api/v1/docs/")
    expect(page.locator(".swagger-ui .info")).to_be_visible()
    page.goto(url + "/api/v1/patients/?format=api")
    expect(page.locator(".response-info")).to_be_visible()
    page.context.clear_cookies()

    page.goto(url + "/admin/login/")
    page.fill("#id_username", "admin_day")
    page.fill("#id_password", PASSWORD)
    page.locator("input[type=submit]").click()
    expect(page.locator("#site-name")).to_be_visible()
    for path in ("/admin/", "/admin/patients/lesionimage/", f"/admin/patients/lesionimage/{second.pk}/change/",
                 f"/admin/patients/lesion/{back.pk}/change/", "/admin/auth/user/", "/admin/axes/accessattempt/"):
        page.goto(url + path)
        page.wait_for_load_state("networkidle")
    thumb = page.goto(url + f"/admin/patients/lesionimage/{second.pk}/change/") and page.locator("img.admin-thumb").first
    assert thumb.evaluate("e => getComputedStyle(e).maxWidth") == "256px"
    page.context.clear_cookies()

    # Last (it locks this address): five wrong passwords, then the lockout page.
    page.goto(url + "/accounts/login/")
    for _ in range(5):
        page.fill("#id_username", "dr_day")
        page.fill("#id_password", "wrong password")
        page.get_by_role("button", name="Log in").click()
        page.wait_for_load_state()
    expect(page.get_by_role("heading", name="Login temporarily locked")).to_be_visible()
