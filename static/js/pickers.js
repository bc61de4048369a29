/* Melanoma Records: a search box for long selects (select[data-searchable]; vendored, no
 * dependencies). Typing keeps the options whose label contains every typed word (case and accents
 * ignored), hides empty groups, and selects the first match so Enter/Tab keeps it. */
(function () {
  "use strict";
  function fold(s) { return s.normalize("NFD").replace(/[\u0300-\u036f]/g, "").toLowerCase(); }

  document.querySelectorAll("select[data-searchable]").forEach(function (select) {
    var label = select.id ? document.querySelector('label[for="' + select.id + '"]') : null;
    var input = document.createElement("input");
    input.type = "search";
    input.className = "picker-search";
    input.placeholder = "Type to search…";
    input.autocomplete = "off";
    input.setAttribute("aria-label", "Search " + (label ? label.textContent.replace("(optional)", "").trim() : "options"));
    input.setAttribute("aria-controls", select.id);
    input.setAttribute("data-picker-for", select.id);
    var count = document.createElement("p");
    count.className = "picker-count muted small";
    count.setAttribute("aria-live", "polite");
    select.parentNode.insertBefore(input, select);
    select.parentNode.insertBefore(count, select.nextSibling);
    var options = Array.prototype.slice.call(select.options);
    var folded = options.map(function (o) { return fold(o.textContent + " " + o.value); });

    var picking = false;
    function showAll() {
      options.forEach(function (o) { o.hidden = false; });
      select.querySelectorAll("optgroup").forEach(function (g) { g.hidden = false; });
      input.value = "";
      count.textContent = "";
    }
    // Chosen some other way (the list itself, the body map): the search no longer applies.
    select.addEventListener("change", function () { if (!picking) { showAll(); } });

    input.addEventListener("input", function () {
      var words = fold(input.value).split(/\s+/).filter(Boolean);
      var shown = 0, first = null;
      options.forEach(function (o, i) {
        var match = !o.value || words.every(function (w) { return folded[i].indexOf(w) !== -1; });
        o.hidden = !match;
        if (match && o.value) { shown++; if (!first) { first = o; } }
      });
      select.querySelectorAll("optgroup").forEach(function (g) {
        g.hidden = !Array.prototype.some.call(g.children, function (o) { return !o.hidden; });
      });
      if (!words.length) { count.textContent = ""; return; }
      count.textContent = shown ? shown + " match" + (shown === 1 ? "" : "es") : "No match";
      if (first) {
        select.value = first.value;
        picking = true;
        select.dispatchEvent(new Event("change", { bubbles: true }));
        picking = false;
      }
    });
    input.addEventListener("keydown", function (e) {
      if (e.key === "Enter") { e.preventDefault(); select.focus(); }
    });
  });
})();
