// Live counts: the server sends every add-in's device counts as a server-sent event
// whenever one changes; each cell marked data-addin/data-count takes its new value.
(function () {
  "use strict";
  var src = document.body.getAttribute("data-events");
  var live = document.getElementById("live");
  if (!src || !window.EventSource) return;
  var stream = new EventSource(src);
  stream.addEventListener("counts", function (ev) {
    var data = JSON.parse(ev.data);
    var cells = document.querySelectorAll("[data-addin][data-count]");
    for (var i = 0; i < cells.length; i++) {
      var el = cells[i];
      var c = data.counts[el.getAttribute("data-addin")];
      if (!c) continue;
      var v = String(c[el.getAttribute("data-count")]);
      if (el.textContent !== v) {
        el.textContent = v;
        el.classList.add("changed");
        setTimeout(el.classList.remove.bind(el.classList, "changed"), 1500);
      }
    }
    var rings = document.querySelectorAll("[data-ring]");
    for (var j = 0; j < rings.length; j++) {
      var n = data.rings ? data.rings[rings[j].getAttribute("data-ring")] : undefined;
      if (n !== undefined && rings[j].textContent !== String(n)) {
        rings[j].textContent = String(n);
        rings[j].classList.add("changed");
      }
    }
        document.body.setAttribute("data-events-version", String(data.version));
    if (live) live.textContent = "live · updated " + new Date(data.at * 1000).toLocaleTimeString();
  });
  stream.onerror = function () {
    if (live) live.textContent = "reconnecting…";
  };
})();
