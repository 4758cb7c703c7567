// The console works without this script; it only adds what reading and ticking need.
"use strict";

// Live counts: the flows page fetches itself again and swaps in the fresh main part.
function refresh(seconds) {
  setInterval(async () => {
    if (document.hidden) return;
    const answer = await fetch(location.href, { credentials: "same-origin" });
    if (!answer.ok || answer.redirected) return;
    const fresh = new DOMParser().parseFromString(await answer.text(), "text/html");
    const main = fresh.querySelector("main");
    if (main) document.querySelector("main").replaceWith(main);
  }, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.querySelector("[data-refresh]");
  if (live) refresh(Number(live.dataset.refresh) || 5);

  // "Select all" ticks every box of the list it heads.
  for (const all of document.querySelectorAll("input[data-selects]")) {
    all.addEventListener("change", () => {
      for (const box of all.form.querySelectorAll(`input[name="${all.dataset.selects}"]`)) {
        box.checked = all.checked;
      }
    });
  }

  // A button that acts on many messages asks first.
  for (const button of document.querySelectorAll("button[data-confirm]")) {
    button.addEventListener("click", (event) => {
      if (!confirm(button.dataset.confirm)) event.preventDefault();
    });
  }
});
