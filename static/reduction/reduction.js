// Reduction configuration pages: script preview, reset confirmation, version comparison.
// Plain JavaScript, no libraries; every page works without it (the server validates and diffs).
"use strict";

(function () {
  function clearErrors(form) {
    form.querySelectorAll("[data-errors-for]").forEach(function (list) { list.textContent = ""; });
    form.querySelectorAll(".field.has-error").forEach(function (f) { f.classList.remove("has-error"); });
  }

  function showErrors(form, errors) {
    Object.keys(errors).forEach(function (name) {
      var list = form.querySelector('[data-errors-for="' + name + '"]');
      if (!list) { return; }
      list.closest(".field").classList.add("has-error");
      errors[name].forEach(function (message) {
        var item = document.createElement("li");
        item.textContent = message;
        list.appendChild(item);
      });
    });
  }

  function setupPreview() {
    var form = document.getElementById("config-form");
    var button = document.getElementById("preview-button");
    if (!form || !button) { return; }
    var section = document.getElementById("preview");
    var pre = document.getElementById("preview-script");
    var problem = document.getElementById("preview-error");
    var sum = document.getElementById("preview-checksum");
    var changes = document.getElementById("preview-changes");
    var diffTitle = document.getElementById("preview-diff-title");
    var diffPre = document.getElementById("preview-diff");

    // The preview against the latest saved version: what a save would change in the script.
    function showDiff(data) {
      changes.hidden = data.against === null;
      if (data.against === null) { return; }
      diffPre.textContent = "";
      if (!data.diff.length) {
        diffTitle.textContent = "Identical to version " + data.against;
        return;
      }
      diffTitle.textContent = "Changes against version " + data.against;
      data.diff.forEach(function (line) {
        var span = document.createElement("span");
        span.className = line.kind;
        span.textContent = line.text;
        diffPre.appendChild(span);
      });
    }
    button.addEventListener("click", function () {
      button.disabled = true;
      clearErrors(form);
      fetch(form.dataset.previewUrl, {
        method: "POST",
        body: new FormData(form),
        credentials: "same-origin",
        headers: { "X-Requested-With": "fetch" },
      })
        .then(function (response) { return response.json(); })
        .then(function (data) {
          section.hidden = false;
          if (data.ok) {
            problem.hidden = true;
            pre.textContent = data.script;
            sum.textContent = "as version " + data.version + ", sha256 " + data.checksum + " (not saved)";
            showDiff(data);
          } else {
            pre.textContent = "";
            sum.textContent = "";
            changes.hidden = true;
            problem.hidden = false;
            problem.textContent = data.error || "Fix the fields marked in the form to see the script.";
            if (data.errors) { showErrors(form, data.errors); }
          }
          section.scrollIntoView({ block: "nearest" });
        })
        .catch(function (err) {
          section.hidden = false;
          problem.hidden = false;
          problem.textContent = "Preview failed: " + err;
        })
        .finally(function () { button.disabled = false; });
    });
  }

  function setupConfirm() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); }
      });
    });
  }

  function setupCompare() {
    var form = document.getElementById("compare-form");
    if (!form) { return; }
    var button = document.getElementById("compare-button");
    function update() {
      var a = form.querySelector('input[name="a"]:checked');
      var b = form.querySelector('input[name="b"]:checked');
      button.disabled = !(a && b && a.value !== b.value);
    }
    form.addEventListener("change", update);
    update();
  }

  function setupOnlyChanged() {
    var box = document.getElementById("only-changed");
    var table = document.getElementById("diff-values");
    if (!box || !table) { return; }
    function update() { table.classList.toggle("only-changed", box.checked); }
    box.addEventListener("change", update);
    update();
  }

  setupPreview();
  setupConfirm();
  setupCompare();
  setupOnlyChanged();
})();
