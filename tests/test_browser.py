"""A real browser (Debian's Chromium, driven by Playwright) against the live server.

A clinician logs in, creates a patient and a lesion, uploads three images at once and sees the
three thumbnails load, on the lesion page and on the patient page. Locally the test is skipped only
when Chromium is absent; in CI (CI=true) it always runs.
"""
import os
from pathlib import Path

import pytest

from tests.factories import PASSWORD, CareTeamFactory, UserFactory, image_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

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


@pytest.fixture
def clinician_account(transactional_db):
    """Created before the browser starts: Playwright's sync API runs its own event loop and
    context, and a database connection opened inside it would outlive the test."""
    clinician = UserFactory(username="dr_browser", first_name="Dana", last_name="Browser")
    CareTeamFactory(name="Dermatology browser", members=[clinician])
    return clinician


@pytest.fixture
def browser_page(live_server, monkeypatch):
    # Playwright's sync API runs an event loop in this thread; the live server's ORM calls are fine.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=live_server.url)
            page = context.new_page()
            page.set_default_timeout(15_000)
            page.csp_violations = record_csp_violations(page)
            yield page
        finally:
            browser.close()
    # Every page a browser test opened satisfied the Content-Security-Policy.
    assert page.csp_violations == []


# Chromium reports each blocked inline script/style or foreign source to the console, and the page
# fires a securitypolicyviolation event; the init script (not subject to the page's policy) turns
# the event into a console error too, so neither way of noticing is missed.
CSP_LISTENER = """
document.addEventListener('securitypolicyviolation', e => console.error(
  'CSP violation: ' + e.violatedDirective + ' blocked ' + (e.blockedURI || 'inline') + ' at ' + e.documentURI));
"""


def record_csp_violations(page) -> list[str]:
    violations: list[str] = []
    page.context.add_init_script(CSP_LISTENER)

    def on_console(message):
        if "Content Security Policy" in message.text or message.text.startswith("CSP violation"):
            violations.append(f"{page.url}: {message.text}")

    page.on("console", on_console)
    return violations


def test_clinician_creates_patient_and_lesion_and_uploads_three_images(live_server, clinician_account,
                                                                       browser_page, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    files = []
    for seed in (21, 22, 23):
        path = tmp_path / f"lesion_{seed}.jpg"
        path.write_bytes(image_bytes(seed=seed, width=480, height=360))
        files.append(path)

    # Anonymous: the worklist sends us to the login page.
    page.goto(live_server.url + "/patients/")
    expect(page).to_have_url(live_server.url + "/accounts/login/?next=/patients/")
    page.fill("#id_username", "dr_browser")
    page.fill("#id_password", PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    expect(page.get_by_text("Dana Browser")).to_be_visible()

    # Create a patient from the empty state.
    page.get_by_role("link", name="Add the first patient").click()
    page.fill("#id_mrn", "BR-0001")
    page.fill("#id_name", "Bea Browser")
    page.fill("#id_birth_date", "1972-06-15")
    page.select_option("#id_sex", "female")
    page.get_by_role("button", name="Create patient").click()
    expect(page.get_by_role("heading", name="Bea Browser", level=1)).to_be_visible()

    # Add a lesion.
    page.get_by_role("link", name="Add lesion").first.click()
    page.fill("#id_label", "L1 upper back")
    page.select_option("#id_anatomic_site", "Trunk:Posterior trunk:Upper back")
    page.get_by_role("button", name="Add lesion").click()
    expect(page.get_by_role("heading", name="L1 upper back", level=1)).to_be_visible()

    # The drop zone puts dropped files into the same <input type=file multiple> and lists them
    # (once upload.js, loaded deferred, has set the zone up: it marks it with .dropzone-js).
    expect(page.locator("[data-dropzone].dropzone-js")).to_have_count(1)
    dropped = page.evaluate("""() => {
        const zone = document.querySelector('[data-dropzone]');
        const dt = new DataTransfer();
        dt.items.add(new File(['a'], 'dropped-one.jpg', {type: 'image/jpeg'}));
        dt.items.add(new File(['b'], 'dropped-two.jpg', {type: 'image/jpeg'}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        return Array.from(document.querySelector('#id_files').files).map(f => f.name);
    }""")
    assert dropped == ["dropped-one.jpg", "dropped-two.jpg"]
    expect(page.locator(".file-list li")).to_have_count(2)
    # More files than one upload takes: the list says so before anything is sent.
    page.eval_on_selector("[data-dropzone]", "z => { z.dataset.maxFiles = '1'; }")
    page.dispatch_event("#id_files", "change")
    expect(page.locator(".file-list-warning")).to_contain_text("at most 1 can be uploaded at once")
    page.eval_on_selector("[data-dropzone]", "z => { z.dataset.maxFiles = '20'; }")

    # Upload three images at once through the file picker (replacing the dropped selection).
    page.set_input_files("#id_files", [str(p) for p in files])
    expect(page.locator(".file-list li")).to_have_count(3)
    expect(page.locator(".file-list-warning")).to_have_count(0)
    expect(page.locator(".file-list")).to_contain_text("lesion_21.jpg")
    page.select_option("#id_image_type", "dermoscopic")
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator(".messages")).to_contain_text("3 images uploaded")

    thumbs = page.locator(".image-card img")
    expect(thumbs).to_have_count(3)
    page.wait_for_function(ALL_LOADED, arg=".image-card img")
    widths = thumbs.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == 3 and all(w > 0 for w in widths)
    page.screenshot(path=str(tmp_path / "lesion.png"), full_page=True)

    # The patient page shows the same three thumbnails, loaded.
    page.get_by_role("navigation", name="Breadcrumbs").get_by_role("link", name="Bea Browser").click()
    expect(page.locator(".thumb img")).to_have_count(3)
    page.wait_for_function(ALL_LOADED, arg=".thumb img")
    page.screenshot(path=str(tmp_path / "patient.png"), full_page=True)

    # And the full image behind a thumbnail loads too, in the in-app viewer (served by the
    # access-checked media view).
    page.goto(page.locator(".thumb a").first.get_attribute("href"))  # the lesion page
    page.locator(".image-link").first.click()
    viewer_img = page.locator("[data-zoom-image]")
    page.wait_for_function(ALL_LOADED, arg="[data-zoom-image]")
    full = viewer_img.get_attribute("src")
    response = page.request.get(live_server.url + full)
    assert response.status == 200 and response.headers["content-type"].startswith("image/")
    assert (tmp_path / "lesion.png").stat().st_size > 0 and (tmp_path / "patient.png").stat().st_size > 0

