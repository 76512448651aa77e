// bucketml console: the few lines of progressive enhancement. Every page works without them.
// Part of bucketml, under its license (LICENSE at the repository's root).
// The upload's follow page: instead of the <noscript> refresh, fetch the page again every
// second and swap in its #follow part, until the upload is served or refused.
(function () {
  "use strict";
  function poll() {
    var follow = document.getElementById("follow");
    if (!follow || !follow.hasAttribute("data-follow")) { return; }
    window.setTimeout(function () {
      fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (response) { return response.text(); })
        .then(function (text) {
          var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("follow");
          if (fresh) { follow.replaceWith(fresh); }
          poll();
        })
        .catch(function () { poll(); });
    }, 1000);
  }
  poll();
})();
