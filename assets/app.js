// Custodian admin pages: small progressive enhancement, the project's own code.
// - Idle warning: the server ends a session after `session.idle_timeout` without use;
//   one minute before, offer "Stay signed in" (a real request that refreshes the server
//   session). The server is the authority: this script only informs, and on expiry goes
//   to the sign-in page.
// - Copy buttons for secrets shown once.
(function () {
  "use strict";
  var body = document.body;

  document.addEventListener("click", function (ev) {
    var target = ev.target;
    if (!(target instanceof HTMLElement)) return;
    var id = target.getAttribute("data-copy");
    if (!id) return;
    var field = document.getElementById(id);
    if (!(field instanceof HTMLInputElement)) return;
    field.select();
    if (navigator.clipboard) {
      navigator.clipboard.writeText(field.value).then(function () { target.textContent = "Copied"; }, function () {});
    }
  });

  if (body.getAttribute("data-signed-in") !== "true") return;
  var idle = parseInt(body.getAttribute("data-idle-seconds") || "0", 10);
  if (!(idle > 0)) return;
  var csrf = body.getAttribute("data-csrf") || "";
  var warning = document.getElementById("idle-warning");
  var seconds = document.getElementById("idle-seconds");
  var stay = document.getElementById("stay-signed-in");
  var deadline = 0;
  var warnAt = 0;

  function restart() {
    var now = Date.now();
    deadline = now + idle * 1000;
    warnAt = deadline - Math.min(60, Math.max(idle - 1, 0)) * 1000;
    if (warning) warning.hidden = true;
  }

  function tick() {
    var now = Date.now();
    if (now >= deadline) {
      window.location.assign("/login?expired=1");
      return;
    }
    if (now >= warnAt && warning) {
      if (warning.hidden && stay) {
        warning.hidden = false;
        stay.focus();
      }
      warning.hidden = false;
      if (seconds) seconds.textContent = String(Math.ceil((deadline - now) / 1000));
    }
  }

  if (stay) {
    stay.addEventListener("click", function () {
      fetch("/admin/keepalive", { method: "POST", headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" })
        .then(function (res) {
          if (res.ok) restart(); else window.location.assign("/login?expired=1");
        }, function () { /* network trouble: keep counting; the server decides */ });
    });
  }

  restart();
  setInterval(tick, 1000);
})();
