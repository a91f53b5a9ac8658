// Custodian admin pages: small progressive enhancement, the project's own code.
// - Idle warning: the server ends a session after `session.idle_timeout` without use;
//   one minute before, offer "Stay signed in" (a real request that refreshes the server
//   session). The server is the authority: this script only informs, and on expiry goes
//   to the sign-in page.
// - Copy buttons for secrets shown once.
// - The patient's printable record: a button that opens the browser's print dialog.
// - Passkeys (WebAuthn): sign in with a passkey alone, a passkey as the second factor,
//   and adding one. The server sends the options with binary fields in base64url; the
//   browser's API wants ArrayBuffers, and the answer goes back in base64url. Every
//   check is the server's: this script only carries the ceremony.
(function () {
  "use strict";

  function toBytes(b64url) {
    var s = b64url.replace(/-/g, "+").replace(/_/g, "/");
    while (s.length % 4) s += "=";
    var bin = atob(s);
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }

  function toB64url(buf) {
    if (!buf) return null;
    var bytes = new Uint8Array(buf);
    var bin = "";
    for (var i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function ids(list) {
    return (list || []).map(function (c) {
      var copy = Object.assign({}, c);
      copy.id = toBytes(c.id);
      return copy;
    });
  }

  function creationOptions(o) {
    var pk = Object.assign({}, o);
    pk.challenge = toBytes(o.challenge);
    pk.user = Object.assign({}, o.user, { id: toBytes(o.user.id) });
    pk.excludeCredentials = ids(o.excludeCredentials);
    return { publicKey: pk };
  }

  function requestOptions(o) {
    var pk = Object.assign({}, o);
    pk.challenge = toBytes(o.challenge);
    pk.allowCredentials = ids(o.allowCredentials);
    return { publicKey: pk };
  }

  function registration(cred) {
    return {
      id: cred.id,
      rawId: toB64url(cred.rawId),
      type: cred.type,
      response: {
        attestationObject: toB64url(cred.response.attestationObject),
        clientDataJSON: toB64url(cred.response.clientDataJSON),
        transports: cred.response.getTransports ? cred.response.getTransports() : []
      },
      extensions: cred.getClientExtensionResults ? cred.getClientExtensionResults() : {}
    };
  }

  function assertion(cred) {
    return {
      id: cred.id,
      rawId: toB64url(cred.rawId),
      type: cred.type,
      response: {
        authenticatorData: toB64url(cred.response.authenticatorData),
        clientDataJSON: toB64url(cred.response.clientDataJSON),
        signature: toB64url(cred.response.signature),
        userHandle: toB64url(cred.response.userHandle)
      },
      extensions: cred.getClientExtensionResults ? cred.getClientExtensionResults() : {}
    };
  }

  function say(el, text) {
    if (el) { el.textContent = text; el.hidden = false; }
  }

  // Browsers refuse passkeys on an IP address (the relying party is a host name).
  var host = window.location.hostname;
  var onAddress = /^[0-9.]+$/.test(host) || host.indexOf(":") >= 0 || host.charAt(0) === "[";
  var supported = !!(window.PublicKeyCredential && navigator.credentials) && !onAddress;
  document.querySelectorAll("[data-passkey]").forEach(function (el) {
    el.hidden = !supported;
  });
  document.querySelectorAll("[data-passkey-unsupported]").forEach(function (el) {
    el.hidden = supported;
  });
  if (!supported) return;

  // Sign in with a passkey alone: a challenge, the browser's prompt, then the form.
  var printButton = document.getElementById("print-page");
  if (printButton) {
    printButton.addEventListener("click", function () { window.print(); });
  }

  var signIn = document.getElementById("passkey-sign-in");
  if (signIn) {
    signIn.addEventListener("click", function () {
      var form = document.getElementById("passkey-form");
      var status = document.getElementById("passkey-status");
      fetch("/api/v1/auth/passkey/challenge", { method: "POST", credentials: "omit" })
        .then(function (res) { if (!res.ok) throw new Error("challenge"); return res.json(); })
        .then(function (c) {
          return navigator.credentials.get(requestOptions(c.publicKey)).then(function (cred) {
            form.elements.ceremony.value = c.ceremony;
            form.elements.credential.value = JSON.stringify(assertion(cred));
            form.submit();
          });
        })
        .catch(function () { say(status, "No passkey was used. Try again, or sign in with your password."); });
    });
  }

  // A passkey as the second factor: the challenge came with the page.
  var second = document.getElementById("passkey-second");
  if (second) {
    second.addEventListener("click", function () {
      var form = second.form;
      var status = document.getElementById("passkey-status");
      if (!form.elements.password.value) { say(status, "Enter your password first."); return; }
      var c = JSON.parse(second.getAttribute("data-challenge"));
      navigator.credentials.get(requestOptions(c.publicKey)).then(function (cred) {
        form.elements.passkey_ceremony.value = c.ceremony;
        form.elements.passkey_credential.value = JSON.stringify(assertion(cred));
        if (form.elements.totp_code) form.elements.totp_code.required = false;
        form.submit();
      }, function () { say(status, "No passkey was used. Try again, or enter a code."); });
    });
  }

  // Adding a passkey: a challenge for this session, the browser's prompt, the form.
  var add = document.getElementById("passkey-add");
  if (add) {
    add.addEventListener("submit", function (ev) {
      if (add.elements.credential.value) return;
      ev.preventDefault();
      var status = document.getElementById("passkey-add-status");
      var body = new URLSearchParams();
      body.set("csrf", add.elements.csrf.value);
      body.set("password", add.elements.password ? add.elements.password.value : "");
      fetch("/admin/passkeys/challenge", { method: "POST", body: body, credentials: "same-origin" })
        .then(function (res) {
          return res.json().then(function (v) { if (!res.ok) throw new Error(v.detail || "refused"); return v; });
        })
        .then(function (c) {
          return navigator.credentials.create(creationOptions(c.publicKey)).then(function (cred) {
            add.elements.ceremony.value = c.ceremony;
            add.elements.credential.value = JSON.stringify(registration(cred));
            if (add.elements.password) add.elements.password.value = "";
            add.submit();
          }, function () { throw new Error("No passkey was made (cancelled, or this authenticator is registered already)."); });
        })
        .catch(function (e) { say(status, e.message); });
    });
  }
})();

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
