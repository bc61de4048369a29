/* Melanoma Records: refresh analysis results without a manual reload (vendored, no dependencies).
 * Every element with data-poll-url is replaced by the HTML that URL returns, until the returned
 * fragment no longer asks to be polled (the analysis is done or failed). A score usually arrives
 * within a second or two of the upload, so the first poll comes after FIRST_MS and the wait grows
 * by half each time up to data-poll-interval milliseconds (default 2000). Safe to include many
 * times: it runs once per page. */
(function () {
  "use strict";
  if (window.melanomaPoll) { return; }
  var TICK_MS = 2000;
  var FIRST_MS = 500;
  var STEP_MS = 250;
  var inFlight = {};
  var lastPoll = {};
  var polls = {};
  var started = Date.now();

  function refresh(el) {
    var url = el.getAttribute("data-poll-url");
    if (!url || inFlight[url]) { return; }
    var every = parseInt(el.getAttribute("data-poll-interval") || TICK_MS, 10);
    var wait = Math.min(every, FIRST_MS * Math.pow(1.5, polls[url] || 0));
    var now = Date.now();
    if (now - (lastPoll[url] || started) < wait - 50) { return; }
    lastPoll[url] = now;
    polls[url] = (polls[url] || 0) + 1;
    inFlight[url] = true;
    fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "XMLHttpRequest" }, cache: "no-store" })
      .then(function (resp) {
        if (resp.status === 404 || resp.status === 403) { el.removeAttribute("data-poll-url"); return null; }
        return resp.ok ? resp.text() : null;
      })
      .then(function (html) {
        if (html === null || html === undefined) { return; }
        var tpl = document.createElement("template");
        tpl.innerHTML = html.trim();
        var fresh = tpl.content.firstElementChild;
        if (fresh && el.parentNode) { el.parentNode.replaceChild(fresh, el); }
      })
      .catch(function () { /* network hiccup: try again on a later tick */ })
      .then(function () { delete inFlight[url]; });
  }

  function tick() {
    var els = document.querySelectorAll("[data-poll-url]");
    for (var i = 0; i < els.length; i++) { refresh(els[i]); }
  }

  window.melanomaPoll = { tick: tick, intervalMs: TICK_MS };
  window.setInterval(tick, STEP_MS);
})();
