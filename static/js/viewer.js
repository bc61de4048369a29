/* Melanoma Records: zoom and pan for image viewports (vendored, no dependencies).
 * Every [data-zoom-viewport] holds one <img data-zoom-image>. Viewports with the same
 * data-zoom-group share one view (scale and offset, as fractions of the viewport), so two visits
 * side by side zoom and pan together. Wheel or +/- zooms at the pointer or centre, dragging pans,
 * 0 or the "Fit" button resets. The transform is set through the CSSOM (no inline style markup). */
(function () {
  "use strict";
  var MIN = 1, MAX = 16, STEP = 1.5;
  var groups = {};

  function group(name) {
    if (!groups[name]) { groups[name] = { scale: 1, x: 0, y: 0, viewports: [] }; }
    return groups[name];
  }

  function clamp(g) {
    g.scale = Math.min(MAX, Math.max(MIN, g.scale));
    // Keep the image covering the viewport: offsets (fractions) within [1 - scale, 0].
    g.x = Math.min(0, Math.max(1 - g.scale, g.x));
    g.y = Math.min(0, Math.max(1 - g.scale, g.y));
  }

  function render(name) {
    var g = group(name);
    clamp(g);
    g.viewports.forEach(function (vp) {
      var w = vp.clientWidth, h = vp.clientHeight;
      var t = "translate(" + (g.x * w) + "px," + (g.y * h) + "px) scale(" + g.scale + ")";
      // The image and its heatmap overlay (same proportions) move together.
      vp.querySelectorAll("[data-zoom-image]").forEach(function (img) { img.style.transform = t; });
      vp.setAttribute("data-zoom-scale", g.scale.toFixed(3));
    });
    document.querySelectorAll('[data-zoom-level][data-zoom-group="' + name + '"]').forEach(function (el) {
      el.textContent = Math.round(g.scale * 100) + "%";
    });
  }

  function zoomAt(name, factor, fx, fy) {
    var g = group(name);
    var next = Math.min(MAX, Math.max(MIN, g.scale * factor));
    var k = next / g.scale;
    // The point under (fx, fy) (fractions of the viewport) stays put.
    g.x = fx - (fx - g.x) * k;
    g.y = fy - (fy - g.y) * k;
    g.scale = next;
    render(name);
  }

  function reset(name) {
    var g = group(name);
    g.scale = 1; g.x = 0; g.y = 0;
    render(name);
  }

  function setup(vp) {
    var name = vp.getAttribute("data-zoom-group") || "default";
    var g = group(name);
    g.viewports.push(vp);
    vp.classList.add("zoom-ready");
    vp.addEventListener("wheel", function (e) {
      e.preventDefault();
      var r = vp.getBoundingClientRect();
      zoomAt(name, e.deltaY < 0 ? 1.2 : 1 / 1.2, (e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height);
    }, { passive: false });
    var drag = null;
    vp.addEventListener("pointerdown", function (e) {
      drag = { x: e.clientX, y: e.clientY, gx: g.x, gy: g.y };
      vp.setPointerCapture(e.pointerId);
      vp.classList.add("zoom-dragging");
    });
    vp.addEventListener("pointermove", function (e) {
      if (!drag) { return; }
      g.x = drag.gx + (e.clientX - drag.x) / vp.clientWidth;
      g.y = drag.gy + (e.clientY - drag.y) / vp.clientHeight;
      render(name);
    });
    function end() { drag = null; vp.classList.remove("zoom-dragging"); }
    vp.addEventListener("pointerup", end);
    vp.addEventListener("pointercancel", end);
    vp.addEventListener("dblclick", function (e) {
      var r = vp.getBoundingClientRect();
      zoomAt(name, 2, (e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height);
    });
  }

  document.querySelectorAll("[data-zoom-viewport]").forEach(setup);
  document.querySelectorAll("[data-zoom-action]").forEach(function (btn) {
    btn.addEventListener("click", function () {
      var name = btn.getAttribute("data-zoom-group") || "default";
      var action = btn.getAttribute("data-zoom-action");
      if (action === "in") { zoomAt(name, STEP, 0.5, 0.5); }
      else if (action === "out") { zoomAt(name, 1 / STEP, 0.5, 0.5); }
      else { reset(name); }
    });
  });
  function toggleHeatmaps(btn) {
    var on = btn.getAttribute("aria-pressed") !== "true";
    var name = btn.getAttribute("data-zoom-group") || "default";
    group(name).viewports.forEach(function (vp) {
      vp.querySelectorAll("[data-heatmap]").forEach(function (img) { img.hidden = !on; });
    });
    btn.setAttribute("aria-pressed", on ? "true" : "false");
    btn.textContent = on ? "Hide heatmap" : "Show heatmap";
  }
  document.querySelectorAll("[data-heatmap-toggle]").forEach(function (btn) {
    btn.addEventListener("click", function () { toggleHeatmaps(btn); });
  });

  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey || (t && (/^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName) || t.isContentEditable))) { return; }
    var names = Object.keys(groups);
    if (!names.length) { return; }
    if (e.key === "+" || e.key === "=") { names.forEach(function (n) { zoomAt(n, STEP, 0.5, 0.5); }); e.preventDefault(); }
    else if (e.key === "-" || e.key === "_") { names.forEach(function (n) { zoomAt(n, 1 / STEP, 0.5, 0.5); }); e.preventDefault(); }
    else if (e.key === "0") { names.forEach(reset); e.preventDefault(); }
    else if (e.key === "h") {
      document.querySelectorAll("[data-heatmap-toggle]").forEach(toggleHeatmaps);
      e.preventDefault();
    }
  });
  window.addEventListener("resize", function () { Object.keys(groups).forEach(render); });
  Object.keys(groups).forEach(render);
  window.melanomaViewer = { groups: groups, zoomAt: zoomAt, reset: reset };
})();
