// Reduction configuration pages: script preview, reset confirmation, version comparison.
// Plain JavaScript, no libraries; every page works without it (the server validates and diffs).
"use strict";

(function () {
  // The summary at the top of the form: a message and one linked line per marked field.
  var summary = document.getElementById("error-summary");

  function clearErrors(form) {
    form.querySelectorAll("[data-errors-for]").forEach(function (list) { list.textContent = ""; });
    form.querySelectorAll(".field.has-error").forEach(function (f) { f.classList.remove("has-error"); });
    if (summary) {
      summary.hidden = true;
      document.getElementById("save-error").textContent = "";
      document.getElementById("error-summary-list").textContent = "";
    }
  }

  function showSummary(message, errors) {
    if (!summary) { return; }
    document.getElementById("save-error").textContent = message;
    var list = document.getElementById("error-summary-list");
    list.textContent = "";
    Object.keys(errors || {}).forEach(function (name) {
      var item = document.createElement("li");
      var field = document.querySelector('[data-field="' + name + '"]');
      var label = field && field.querySelector("label");
      var input = field && field.querySelector("input, textarea, select");
      if (label && input && input.id) {
        var link = document.createElement("a");
        link.href = "#" + input.id;
        link.textContent = label.textContent;
        item.appendChild(link);
        item.appendChild(document.createTextNode(": " + errors[name][0]));
      } else {
        item.textContent = (name === "__all__" ? "" : name + ": ") + errors[name][0];
      }
      list.appendChild(item);
    });
    summary.hidden = false;
  }

  // Focus the first marked field (in page order), else the summary, scrolling it into view.
  function focusFirstError(form) {
    var first = form.querySelector(".field.has-error");
    var input = first && first.querySelector("input:not([type=hidden]), textarea, select");
    if (summary && !summary.hidden) { summary.scrollIntoView({ block: "start" }); }
    if (input) { input.focus({ preventScroll: !!(summary && !summary.hidden) }); }
    else if (summary && !summary.hidden) { summary.focus(); }
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

  // What to say when the answer is not the preview's JSON: the session expired (the login
  // page came back, or the server said 401) or the page's CSRF token is stale (403).
  function failureMessage(response) {
    if (response.status === 401 || (response.redirected && /\/login\/?/.test(response.url))) {
      return "Your session has expired: log in again (reload the page) to preview.";
    }
    if (response.status === 403) {
      return "The page is out of date: reload it to preview (unsaved changes are lost).";
    }
    return "Preview failed: the server answered " + response.status + " " + response.statusText;
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

    // Never leave an old preview next to a failure: it would look like the answer.
    function showFailure(message) {
      section.hidden = false;
      pre.textContent = "";
      sum.textContent = "";
      diffPre.textContent = "";
      changes.hidden = true;
      problem.hidden = false;
      problem.textContent = message;
    }

    button.addEventListener("click", function () {
      button.disabled = true;
      clearErrors(form);
      fetch(form.dataset.previewUrl, {
        method: "POST",
        body: new FormData(form),
        credentials: "same-origin",
        headers: { "X-Requested-With": "fetch", "Accept": "application/json" },
      })
        .then(function (response) {
          var type = response.headers.get("Content-Type") || "";
          if (type.indexOf("application/json") === -1) {
            return { ok: false, error: failureMessage(response) };
          }
          return response.json();
        })
        .then(function (data) {
          section.hidden = false;
          if (data.ok) {
            problem.hidden = true;
            pre.textContent = data.script;
            sum.textContent = "as version " + data.version + ", sha256 " + data.checksum + " (not saved)";
            showDiff(data);
            section.scrollIntoView({ block: "nearest" });
          } else if (data.errors) {
            showFailure("Fix the fields marked in the form to see the script.");
            showErrors(form, data.errors);
            showSummary("Cannot preview: some values are invalid (see the fields marked below).", data.errors);
            focusFirstError(form);
          } else {
            showFailure(data.error || "Preview failed.");
            showSummary(data.error || "Preview failed.", {});
            focusFirstError(form);
          }
        })
        .catch(function (err) {
          showFailure("Preview failed: " + err);
        })
        .finally(function () { button.disabled = false; });
    });
  }

  // After a refused save the server marked the fields: start at the first one.
  function setupFocus() {
    var form = document.getElementById("config-form");
    if (form && summary && !summary.hidden) { focusFirstError(form); }
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
  setupFocus();
  setupConfirm();
  setupCompare();
  setupOnlyChanged();
})();
