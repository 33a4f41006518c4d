/* cloud-sync dashboard: refreshes what the server rendered by polling the JSON API, and sends the
   actions (acknowledge, review, approve or reject a rollout) with the token the user saved. No framework. Text that devices sent
   is only ever written with textContent. Cell rendering mirrors templates/macros.html and
   cloud_sync.web.format_value: keep the three in step. */
(function () {
  "use strict";

  var body = document.body;
  var API = body.dataset.api;
  var ROOT = body.dataset.root || "";
  var POLL_MS = Math.max(200, Number(body.dataset.pollMs) || 5000);
  var EMPTY = "\u2013";
  var TOKEN_KEY = "cloud-sync.token";
  var BY_KEY = "cloud-sync.by";
  var DEVICE_METRICS = ["p99_latency_ms", "error_rate", "offline_minutes", "low_confidence_rate", "cpu_percent",
                        "temperature_c"];
  var BADGES = /^[a-z_]{1,32}$/;

  // Content-Security-Policy violations, for the end-to-end test and for whoever opens the console.
  window.cloudSyncCspViolations = [];
  document.addEventListener("securitypolicyviolation", function (e) {
    window.cloudSyncCspViolations.push(e.violatedDirective + " " + e.blockedURI);
  });

  // -- formatting ------------------------------------------------------------------------------------

  function lookup(row, key) {
    var v = row;
    var parts = key.split(".");
    for (var i = 0; i < parts.length; i++) {
      if (v === null || typeof v !== "object" || Array.isArray(v)) return null;
      v = Object.prototype.hasOwnProperty.call(v, parts[i]) ? v[parts[i]] : null;
    }
    return v === undefined ? null : v;
  }

  function finite(v) { return typeof v === "number" && isFinite(v); }

  function models(value, row) {
    var names = (Array.isArray(value) ? value : []).map(function (m) { return m.model + "@" + m.version; });
    if (!names.length) {
      names = (Array.isArray(row.models) ? row.models : []).map(function (m) { return m.name + "@" + m.version; });
    }
    return names.length ? names.join(", ") : EMPTY;
  }

  // A gate value: at most three decimals, no trailing zeros (web.py: _short()).
  function short(v) {
    if (!finite(v)) return v === null || v === undefined ? "?" : String(v);
    return v.toFixed(3).replace(/\.?0+$/, "");
  }

  function cohorts(v) {
    if (!v || typeof v !== "object" || Array.isArray(v)) return EMPTY;
    var parts = Object.keys(v).filter(function (k) { return v[k]; }).map(function (k) { return k + " " + v[k]; });
    return parts.length ? parts.join(", ") : EMPTY;
  }

  function gates(v) {
    var list = (Array.isArray(v) ? v : []).filter(function (g) { return g && typeof g === "object"; });
    if (!list.length) return EMPTY;
    return list.map(function (g) {
      return g.name + " " + short(g.value) + " " + g.op + " " + short(g.limit) + ": " + g.status;
    }).join("; ");
  }

  function format(fmt, v, row) {
    if (fmt === "models") return models(v, row || {});
    if (fmt === "cohorts") return cohorts(v);
    if (fmt === "gates") return gates(v);
    if (fmt === "approval") return "";
    if (fmt === "alarm") return v ? "ALARM" : (v === false ? "no" : EMPTY);
    if (v === null || v === undefined || v === "") return EMPTY;
    if ((fmt === "int" || fmt === "num1" || fmt === "num2" || fmt === "pct") && !finite(v)) return String(v);
    switch (fmt) {
      case "int": return Math.round(v).toLocaleString("en-US");
      case "num1": return v.toFixed(1);
      case "num2": return v.toFixed(2);
      case "pct": return (v * 100).toFixed(1) + "%";
      case "time": return finite(v) ? new Date(v).toISOString().slice(0, 19).replace("T", " ") : String(v);
      case "list": return Array.isArray(v) && v.length ? v.map(String).join(", ") : EMPTY;
      default: return typeof v === "string" ? v : JSON.stringify(v);
    }
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function deviceLink(id) {
    return el("a", {href: ROOT + "/devices/" + encodeURIComponent(id)}, id);
  }

  function badge(v) {
    return el("span", {"class": "badge badge-" + (BADGES.test(String(v)) ? v : "other")}, String(v));
  }

  // Fill a cell (or a field) with what the templates render for the same format.
  function fill(target, fmt, v, row) {
    target.replaceChildren();
    var empty = v === null || v === undefined || v === "";
    if (fmt === "device") {
      target.append(empty ? EMPTY : deviceLink(String(v)));
    } else if (fmt === "state" || fmt === "severity") {
      target.append(empty ? EMPTY : badge(v));
    } else if (fmt === "alarm" && v) {
      target.append(el("span", {"class": "badge badge-alarm"}, "ALARM"));
    } else if (fmt === "subject") {
      target.append(!empty && DEVICE_METRICS.indexOf(row.metric) >= 0 ? deviceLink(String(v)) : format("text", v));
    } else if (fmt === "ack") {
      if (row.state === "firing") {
        target.append(el("button", {type: "button", "class": "act", "data-action": "ack", "data-id": v},
                          "Acknowledge"));
      }
    } else if (fmt === "approval") {
      if (row.state === "waiting_approval") {
        var choice = el("span", {"class": "review-actions"});
        choice.append(
          el("button", {type: "button", "class": "act", "data-action": "approve", "data-id": v}, "Approve"), " ",
          el("button", {type: "button", "class": "act", "data-action": "reject", "data-id": v}, "Reject"));
        target.append(choice);
      }
    } else if (fmt === "review") {
      if (row.state === "pending") {
        var label = JSON.stringify(lookup(row, "payload.label"));
        var span = el("span", {"class": "review-actions"});
        span.append(
          el("button", {type: "button", "class": "act", "data-action": "confirm", "data-id": v, "data-label": label},
             "Confirm"), " ",
          el("input", {type: "text", "class": "label-input", size: "8", maxlength: "128",
                       "aria-label": "correct label", placeholder: "label"}), " ",
          el("button", {type: "button", "class": "act", "data-action": "correct", "data-id": v, "data-label": label},
             "Correct"));
        target.append(span);
      }
    } else {
      target.textContent = format(fmt, v, row);
    }
  }

  // -- refreshing ------------------------------------------------------------------------------------

  function rowsOf(data) {
    if (Array.isArray(data)) return data.filter(function (r) { return r && typeof r === "object"; });
    if (data && typeof data === "object") {
      return Object.keys(data).map(function (k) { return Object.assign({name: k}, data[k]); });
    }
    return [];
  }

  function busy(table) {
    // Someone is typing a label: leave the table alone until they are done.
    var inputs = table.querySelectorAll("input");
    for (var i = 0; i < inputs.length; i++) {
      if (inputs[i] === document.activeElement || inputs[i].value) return true;
    }
    return false;
  }

  function refreshTable(table, data) {
    if (busy(table)) return;
    var cols = Array.prototype.map.call(table.tHead.rows[0].cells, function (th) {
      return {key: th.dataset.key, fmt: th.dataset.fmt, numeric: /^(int|num1|num2|pct)$/.test(th.dataset.fmt)};
    });
    var rows = rowsOf(table.dataset.path ? lookup(data, table.dataset.path) : data);
    if (table.dataset.reverse) rows = rows.slice().reverse();
    var tbody = document.createElement("tbody");
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      cols.forEach(function (c) {
        var td = document.createElement("td");
        if (c.numeric) td.className = "num";
        fill(td, c.fmt, lookup(row, c.key), row);
        tr.append(td);
      });
      tbody.append(tr);
    });
    if (!rows.length) {
      var tr = el("tr", {"class": "empty"});
      tr.append(el("td", {colspan: String(cols.length)}, table.dataset.empty || "nothing yet"));
      tbody.append(tr);
    }
    table.replaceChild(tbody, table.tBodies[0]);
  }

  var extra = {};   // source -> [callback(data)], registered by page scripts (device.js)

  function fetchJSON(path) {
    return fetch(API + "/" + path, {headers: {Accept: "application/json"}, cache: "no-store"}).then(function (r) {
      return r.json().catch(function () { return null; }).then(function (data) {
        if (!r.ok) throw new Error((data && data.message) || (r.status + " " + r.statusText));
        return data;
      });
    });
  }

  var timer = null;

  function refresh() {
    clearTimeout(timer);
    var sources = {};
    document.querySelectorAll("[data-source]").forEach(function (node) {
      (sources[node.dataset.source] = sources[node.dataset.source] || []).push(node);
    });
    Object.keys(extra).forEach(function (s) { sources[s] = sources[s] || []; });
    var jobs = Object.keys(sources).map(function (source) {
      return fetchJSON(source).then(function (data) {
        sources[source].forEach(function (node) {
          if (node.tagName === "TABLE") refreshTable(node, data);
          else if (node.dataset.key) fill(node, node.dataset.fmt || "text", lookup(data, node.dataset.key), data);
        });
        (extra[source] || []).forEach(function (cb) { cb(data); });
      });
    });
    return Promise.allSettled(jobs).then(function (results) {
      var failed = results.filter(function (r) { return r.status === "rejected"; });
      var stamp = document.getElementById("refreshed");
      if (stamp) {
        stamp.textContent = failed.length ? "refresh failed: " + failed[0].reason.message
                                          : "updated " + new Date().toLocaleTimeString();
        stamp.classList.toggle("stale", failed.length > 0);
      }
      timer = setTimeout(tick, POLL_MS);
    });
  }

  function tick() {
    if (document.hidden) { timer = setTimeout(tick, POLL_MS); return; }
    refresh();
  }

  document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); });

  // -- actions ---------------------------------------------------------------------------------------

  function flash(text, ok) {
    var f = document.getElementById("flash");
    f.textContent = text;
    f.className = "flash " + (ok ? "ok" : "bad");
    f.hidden = false;
  }

  function post(path, payload) {
    var headers = {"Content-Type": "application/json", Accept: "application/json"};
    var token = localStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    return fetch(API + "/" + path, {method: "POST", headers: headers, body: JSON.stringify(payload),
                                    credentials: "same-origin"}).then(function (r) {
      return r.json().catch(function () { return null; }).then(function (data) {
        if (!r.ok) {
          var err = new Error((data && data.message) || (r.status + " " + r.statusText));
          err.status = r.status;
          throw err;
        }
        return data;
      });
    });
  }

  function by() { return localStorage.getItem(BY_KEY) || "dashboard"; }

  function labelFrom(text, predicted) {
    // A class index typed as text goes back as a number when the model predicts numbers.
    if (typeof predicted === "number" && /^-?\d+$/.test(text)) return Number(text);
    return text;
  }

  document.addEventListener("click", function (e) {
    var button = e.target.closest("button[data-action]");
    if (!button) return;
    var id = button.dataset.id;
    var request;
    var action = button.dataset.action;
    if (action === "ack") {
      request = post("alerts/" + encodeURIComponent(id) + "/ack", {by: by()}).then(function () {
        return "acknowledged " + id;
      });
    } else if (action === "approve" || action === "reject") {
      request = post("rollouts/" + encodeURIComponent(id) + "/" + action, {by: by()}).then(function (r) {
        return (action === "approve" ? "approved " : "rejected ") + id + ": now " + r.state + " at " + r.stage;
      });
    } else {
      var predicted = JSON.parse(button.dataset.label || "null");
      var label = predicted;
      if (button.dataset.action === "correct") {
        var input = button.parentNode.querySelector("input.label-input");
        var text = input.value.trim();
        if (!text) { flash("type the correct label first", false); input.focus(); return; }
        label = labelFrom(text, predicted);
      }
      request = post("review/" + encodeURIComponent(id), {label: label, by: by()}).then(function (item) {
        return item.state + " " + id;
      });
    }
    button.disabled = true;
    request.then(function (text) {
      var row = button.closest("tr");
      if (row) row.querySelectorAll("input").forEach(function (i) { i.value = ""; });
      flash(text, true);
      return refresh();
    }, function (err) {
      button.disabled = false;
      flash(err.message, false);
      if (err.status === 401 || err.status === 403) document.getElementById("auth-token").focus();
    });
  });

  function showAuth() {
    var token = localStorage.getItem(TOKEN_KEY);
    document.getElementById("auth-state").textContent = token ? "token saved" : "no token";
    document.getElementById("auth-by").value = localStorage.getItem(BY_KEY) || "";
    document.getElementById("auth-token").value = "";
  }

  document.getElementById("auth-save").addEventListener("click", function () {
    var token = document.getElementById("auth-token").value.trim();
    var name = document.getElementById("auth-by").value.trim();
    if (token) localStorage.setItem(TOKEN_KEY, token);
    if (name) localStorage.setItem(BY_KEY, name); else localStorage.removeItem(BY_KEY);
    showAuth();
  });
  document.getElementById("auth-forget").addEventListener("click", function () {
    localStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(BY_KEY);
    showAuth();
  });
  showAuth();

  window.cloudSync = {
    api: API,
    lookup: lookup,
    format: format,
    refresh: refresh,
    fetchJSON: fetchJSON,
    // Call back with every refresh of an API path (relative to /api/v1/).
    watch: function (source, callback) { (extra[source] = extra[source] || []).push(callback); },
  };

  // Page scripts load after this one and register first; then the first refresh runs.
  document.addEventListener("DOMContentLoaded", refresh);
})();
