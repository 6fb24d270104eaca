"use strict";
// The server redirects to /ui?failed=1 after a wrong token.
if (new URLSearchParams(location.search).get("failed") === "1") {
  document.getElementById("failed").hidden = false;
}
