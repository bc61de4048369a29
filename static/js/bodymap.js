/* Melanoma Records: place a lesion on the body map by clicking (vendored, no dependencies).
 * The map (svg[data-body-map-input]) holds one invisible rect per region, each naming its ISIC
 * site (data-site), rendered by the server from patients.bodymap. A click sets the x/y inputs (as
 * fractions of the map), moves the marker and suggests the site under the click: it fills the
 * anatomic-site select when that is empty, else offers "Use this site". */
(function () {
  "use strict";
  document.querySelectorAll("svg[data-body-map-input]").forEach(function (svg) {
    var xInput = document.getElementById(svg.getAttribute("data-x-input"));
    var yInput = document.getElementById(svg.getAttribute("data-y-input"));
    var select = document.getElementById(svg.getAttribute("data-site-select"));
    var marker = svg.querySelector("[data-body-map-marker]");
    var box = svg.viewBox.baseVal;
    var form = svg.closest("form");
    var suggestion = form ? form.querySelector("[data-site-suggestion]") : null;
    var useSite = form ? form.querySelector("[data-use-site]") : null;
    var clear = form ? form.querySelector("[data-clear-position]") : null;
    var suggested = null;

    function regionAt(x, y) {
      var rects = svg.querySelectorAll("rect[data-site]");
      for (var i = 0; i < rects.length; i++) {
        var r = rects[i];
        var rx = r.x.baseVal.value, ry = r.y.baseVal.value;
        if (x >= rx && x <= rx + r.width.baseVal.value && y >= ry && y <= ry + r.height.baseVal.value) { return r; }
      }
      return null;
    }

    function labelOf(value) {
      if (!select) { return value.split(":").join(" › "); }
      for (var i = 0; i < select.options.length; i++) {
        if (select.options[i].value === value) { return select.options[i].textContent; }
      }
      return value.split(":").join(" › ");
    }

    function chooseSite(value) {
      if (!select) { return; }
      select.value = value;
      select.dispatchEvent(new Event("change", { bubbles: true }));
    }

    svg.addEventListener("click", function (e) {
      var pt = svg.createSVGPoint();
      pt.x = e.clientX; pt.y = e.clientY;
      var p = pt.matrixTransform(svg.getScreenCTM().inverse());
      var fx = Math.min(1, Math.max(0, p.x / box.width)), fy = Math.min(1, Math.max(0, p.y / box.height));
      if (xInput) { xInput.value = fx.toFixed(3); }
      if (yInput) { yInput.value = fy.toFixed(3); }
      if (marker) { marker.setAttribute("cx", p.x.toFixed(2)); marker.setAttribute("cy", p.y.toFixed(2)); marker.removeAttribute("hidden"); }
      var region = regionAt(p.x, p.y);
      suggested = region ? region.getAttribute("data-site") : null;
      var view = region ? region.getAttribute("data-view") : (fx < 0.5 ? "front" : "back");
      if (suggestion) {
        suggestion.textContent = suggested
          ? "Suggested site (" + view + "): " + labelOf(suggested)
          : "Placed on the " + view + " view, outside the outline: choose the site yourself.";
      }
      if (suggested && select && !select.value) { chooseSite(suggested); }
      if (useSite) { useSite.hidden = !(suggested && select && select.value !== suggested); }
    });
    if (useSite) {
      useSite.addEventListener("click", function () {
        if (suggested) { chooseSite(suggested); useSite.hidden = true; }
      });
    }
    if (clear) {
      clear.addEventListener("click", function () {
        if (xInput) { xInput.value = ""; }
        if (yInput) { yInput.value = ""; }
        if (marker) { marker.setAttribute("hidden", ""); }
        if (suggestion) { suggestion.textContent = ""; }
        if (useSite) { useSite.hidden = true; }
      });
    }
  });
})();
