/* Melanoma Records: keyboard shortcuts on every page (vendored, no dependencies).
 *   /            focus the search box (on pages without one: go to the worklist's search)
 *   n / p        next / previous lesion   (links marked data-key-next / data-key-prev)
 *   → / ←        later / earlier image    (data-key-right / data-key-left)
 *   Esc          back                     (data-key-escape)
 * Keys typed into form fields are left alone. */
(function () {
  "use strict";
  var script = document.currentScript;
  var searchUrl = script ? script.getAttribute("data-search-url") : null;

  function follow(selector) {
    var link = document.querySelector(selector);
    if (link && link.href) { window.location.assign(link.href); return true; }
    return false;
  }

  if (window.location.hash === "#search") {
    var box = document.querySelector("[data-search-shortcut]");
    if (box) { box.focus(); }
  }

  document.addEventListener("keydown", function (e) {
    if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey) { return; }
    var t = e.target;
    var typing = t && (/^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName) || t.isContentEditable);
    if (typing) {
      if (e.key === "Escape" && t.blur) { t.blur(); }
      return;
    }
    var done = false;
    if (e.key === "/") {
      var search = document.querySelector("[data-search-shortcut]");
      if (search) { search.focus(); search.select(); done = true; }
      else if (searchUrl) { window.location.assign(searchUrl + "#search"); done = true; }
    } else if (e.key === "n") { done = follow("[data-key-next]"); }
    else if (e.key === "p") { done = follow("[data-key-prev]"); }
    else if (e.key === "ArrowRight") { done = follow("[data-key-right]"); }
    else if (e.key === "ArrowLeft") { done = follow("[data-key-left]"); }
    else if (e.key === "Escape") { done = follow("[data-key-escape]"); }
    if (done) { e.preventDefault(); }
  });
})();
