/*
 * The `python -m middleware serve` page: picks what to look at and drives the reporters' viewer.
 *
 * Data flow: the controls (service, profile type, time range, label) make a *selection*; the page
 * asks the JSON API for the timeline (/api/timeline: totals per time bucket) and the merged
 * profile (/api/profile: the reporters' JSON), draws the timeline as SVG bars and hands the
 * profile to MwFlame (middleware/reporters/flamegraph.js), which draws the flame graph, the
 * sortable table and the sandwich of the selected function. Dragging across the timeline narrows
 * the time range. The Compare tab asks /api/diff for two time ranges or two label values and
 * lists functions by how much their Self share grew.
 *
 * Hooks for tests and tools: body[data-state] is "loading" / "ready" / "error" / "empty";
 * body[data-seq] counts finished loads; window.mwViewer is the MwFlame viewer (window.mwDiffViewer
 * the Compare tab's diff flame graph); timeline bars are
 * rect.tl-bar[data-t][data-value]; diff rows are #diff-table tr[data-function][data-change].
 * The selection is mirrored in location.hash so a reload or a shared link shows the same view.
 *
 * One request: /?span_id=<16 hex> (or /?trace_id=<32 hex>, all the spans of a trace) asks
 * /api/spans where and when the span's samples are, picks its service and window, and every query
 * carries the id, so the flame graph, table and timeline are that request's alone; #span-header
 * (data-span-id, data-cpu-samples, data-cpu-ns, data-wall-ns) says which span, its name, service,
 * time and samples, lists a trace's spans (links to each), and links back to the normal view.
 */
(function () {
  "use strict";

  var PREFERRED_TYPE = "process_cpu:cpu:nanoseconds:cpu:nanoseconds";
  var TIMELINE_HEIGHT = 96;
  var AXIS_HEIGHT = 16;

  function $(id) {
    return document.getElementById(id);
  }

  var state = {
    services: [],
    service: "",
    type: "",
    from: 0, // unix seconds
    until: 0,
    labelName: "",
    labelValue: "",
    seq: 0,
    done: 0,
    viewer: null,
    timeline: null,
    cmp: { a: null, b: null },
    diff: null,
    diffSort: "change",
    hash: parseHash(),
    span: spanFromQuery(), // {param: "span_id"|"trace_id", id, info} on a request's page, else null
  };

  // ---------------------------------------------------------------------------------------------
  // helpers

  function api(path, params) {
    var qs = new URLSearchParams();
    Object.keys(params || {}).forEach(function (k) {
      if (params[k] !== undefined && params[k] !== null && params[k] !== "") qs.set(k, params[k]);
    });
    return fetch(path + "?" + qs.toString(), { credentials: "same-origin" }).then(function (r) {
      return r.json().then(
        function (body) {
          if (!r.ok) throw new Error(body.error || "HTTP " + r.status);
          return body;
        },
        function () {
          throw new Error("HTTP " + r.status + " from " + path);
        }
      );
    });
  }

  function pad(n) {
    return (n < 10 ? "0" : "") + n;
  }

  /* Local time as "YYYY-MM-DD HH:MM:SS". */
  function fmtTime(seconds) {
    var d = new Date(seconds * 1000);
    return (
      d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds())
    );
  }

  /* "YYYY-MM-DD HH:MM[:SS]" (local time, "T" accepted as separator) or unix seconds -> seconds,
     NaN when unreadable. */
  function parseTime(text) {
    text = (text || "").trim();
    if (/^\d+(\.\d+)?$/.test(text)) return Number(text);
    var m = /^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2})(?::(\d{2}))?$/.exec(text);
    if (!m) return NaN;
    var d = new Date(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +(m[6] || 0));
    return isNaN(d.getTime()) ? NaN : d.getTime() / 1000;
  }

  function fmtDuration(seconds) {
    if (seconds >= 86400) return (seconds / 86400).toFixed(seconds % 86400 ? 1 : 0) + " d";
    if (seconds >= 3600) return (seconds / 3600).toFixed(seconds % 3600 ? 1 : 0) + " h";
    if (seconds >= 60) return (seconds / 60).toFixed(seconds % 60 ? 1 : 0) + " min";
    return Math.round(seconds) + " s";
  }

  function quote(value) {
    return '"' + value.replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '"';
  }

  function selector(name, value) {
    return name && value !== "" && value !== null && value !== undefined ? "{" + name + "=" + quote(value) + "}" : "{}";
  }

  function currentSelector() {
    return selector(state.labelName, state.labelValue);
  }

  function unitOf(type) {
    return (type || "").split(":")[2] || "";
  }

  function fmtValue(value, unit) {
    return window.MwFlame ? MwFlame.formatValue(value, unit) : String(value);
  }

  function fmtBytes(n) {
    if (n >= 1 << 30) return (n / (1 << 30)).toFixed(1) + " GiB";
    if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
    return Math.round(n / 1024) + " KiB";
  }

  /* The header's "Data kept" line: the span of the data the collector keeps and its bounds. */
  function loadStorage() {
    return api("/api/stats").then(function (body) {
      var st = body.storage;
      if (!st) return;
      var text = "Data kept: ";
      text += st.profiles ? fmtTime(st.oldest_ns / 1e9) + " – " + fmtTime(st.newest_ns / 1e9) : "none";
      text += " · " + fmtBytes(st.used_bytes) + (st.max_bytes ? " of " + fmtBytes(st.max_bytes) : "");
      text += " · retention " + (st.retention_s ? fmtDuration(st.retention_s) : "off");
      $("kept").textContent = text;
    }, function () {
      $("kept").textContent = "";
    });
  }

  function setStatus(text, kind) {
    var s = $("status");
    s.textContent = text || "";
    s.className = "serve-status" + (kind ? " " + kind : "");
  }

  function setState(name) {
    document.body.setAttribute("data-state", name);
  }

  function fillSelect(select, items, selected) {
    select.textContent = "";
    items.forEach(function (item) {
      var opt = document.createElement("option");
      opt.value = item.value;
      opt.textContent = item.label;
      select.append(opt);
    });
    if (selected !== undefined && items.some(function (i) { return i.value === selected; })) {
      select.value = selected;
    }
  }

  /* The request (span or trace) the page was opened for: /?span_id=... or /?trace_id=... */
  function spanFromQuery() {
    var qs = new URLSearchParams(location.search);
    if (qs.get("span_id")) return { param: "span_id", id: qs.get("span_id"), info: null };
    if (qs.get("trace_id")) return { param: "trace_id", id: qs.get("trace_id"), info: null };
    return null;
  }

  function parseHash() {
    var out = {};
    new URLSearchParams(location.hash.replace(/^#/, "")).forEach(function (v, k) {
      out[k] = v;
    });
    return out;
  }

  function writeHash() {
    var qs = new URLSearchParams();
    qs.set("service", state.service);
    qs.set("type", state.type);
    var preset = $("range-preset").value;
    if (preset === "custom") {
      qs.set("from", String(state.from));
      qs.set("until", String(state.until));
    } else {
      qs.set("range", preset);
    }
    if (state.labelName) qs.set("label", state.labelName);
    if (state.labelName && state.labelValue) qs.set("value", state.labelValue);
    history.replaceState(null, "", "#" + qs.toString());
  }

  function serviceInfo() {
    for (var i = 0; i < state.services.length; i++) {
      if (state.services[i].name === state.service) return state.services[i];
    }
    return null;
  }

  function selectionParams(extra) {
    var p = {
      service: state.service,
      type: state.type,
      from: state.from,
      until: state.until,
      selector: currentSelector(),
    };
    if (state.span) p[state.span.param] = state.span.id;
    Object.keys(extra || {}).forEach(function (k) {
      p[k] = extra[k];
    });
    return p;
  }

  // ---------------------------------------------------------------------------------------------
  // services, types, labels

  function loadServices() {
    setState("loading");
    setStatus("Loading services…");
    return api("/api/services").then(function (body) {
      state.services = body.services;
      if (state.span) {
        loadSpan();
        return;
      }
      if (!state.services.length) {
        showNoData();
        return;
      }
      var wanted = state.hash.service || state.service;
      fillSelect(
        $("service"),
        state.services.map(function (s) {
          return { value: s.name, label: s.name + " (" + s.profiles + ")" };
        }),
        wanted
      );
      onServiceChange(true);
    }, fail);
  }

  function showNoData() {
    var empty = $("empty");
    empty.hidden = false;
    empty.textContent = "";
    var h = document.createElement("h2");
    h.textContent = "No profiles yet";
    var p = document.createElement("p");
    p.textContent =
      "Point an agent at this server (MW_PROFILING_SERVER_URL=" + location.origin +
      "), or start serve with --import DIR to load a local store. This page shows them as they arrive — press Refresh.";
    empty.append(h, p);
    setStatus("");
    setState("empty");
  }

  function onServiceChange(fromHash) {
    state.service = $("service").value;
    var info = serviceInfo();
    var types = (info && info.types) || [];
    var wanted = fromHash && state.hash.type ? state.hash.type : state.type;
    if (types.indexOf(wanted) < 0) wanted = types.indexOf(PREFERRED_TYPE) >= 0 ? PREFERRED_TYPE : types[0];
    fillSelect(
      $("profile-type"),
      types.map(function (t) {
        var parts = t.split(":");
        return { value: t, label: parts[0] + " · " + parts[1] + " (" + parts[2] + ")" };
      }),
      wanted
    );
    state.type = $("profile-type").value;
    if (fromHash && state.hash.from && state.hash.until) {
      $("range-preset").value = "custom";
      setRange(Number(state.hash.from), Number(state.hash.until));
    } else {
      if (fromHash && state.hash.range) $("range-preset").value = state.hash.range;
      applyPreset();
    }
    if (fromHash) {
      state.labelName = state.hash.label || "";
      state.labelValue = state.hash.value || "";
    } else {
      state.labelName = "";
      state.labelValue = "";
    }
    state.cmp = { a: null, b: null };
    loadLabelNames().then(refresh);
  }

  function loadLabelNames() {
    if (!state.service) { /* a trace over several services: no label list of one service */
      fillSelect($("label-name"), [{ value: "", label: "(any)" }], "");
      state.labelName = "";
      return loadLabelValues();
    }
    var params = { service: state.service, type: state.type, from: state.from, until: state.until };
    return api("/api/label_names", params).then(function (body) {
      var names = body.names.filter(function (n) {
        return n !== "service_name";
      });
      if (state.labelName && names.indexOf(state.labelName) < 0) names.push(state.labelName);
      var items = [{ value: "", label: "(any)" }].concat(names.map(function (n) { return { value: n, label: n }; }));
      fillSelect($("label-name"), items, state.labelName);
      fillSelect($("cmp-label-name"), names.map(function (n) { return { value: n, label: n }; }),
        $("cmp-label-name").value || (names.indexOf("endpoint") >= 0 ? "endpoint" : names[0]));
      return Promise.all([loadLabelValues(), loadCompareValues()]);
    }, fail);
  }

  function loadLabelValues() {
    var select = $("label-value");
    if (!state.labelName) {
      fillSelect(select, [{ value: "", label: "(any)" }], "");
      select.disabled = true;
      state.labelValue = "";
      $("selector").textContent = currentSelector();
      return Promise.resolve();
    }
    var params = { service: state.service, name: state.labelName, type: state.type, from: state.from, until: state.until };
    return api("/api/label_values", params).then(function (body) {
      var values = body.values.slice();
      if (state.labelValue && values.indexOf(state.labelValue) < 0) values.push(state.labelValue);
      var items = [{ value: "", label: "(any)" }].concat(values.map(function (v) { return { value: v, label: v }; }));
      fillSelect(select, items, state.labelValue);
      select.disabled = false;
      state.labelValue = select.value;
      $("selector").textContent = currentSelector();
    }, fail);
  }

  function loadCompareValues() {
    var name = $("cmp-label-name").value;
    if (!name) {
      fillSelect($("cmp-value-a"), [], "");
      fillSelect($("cmp-value-b"), [], "");
      return Promise.resolve();
    }
    var params = { service: state.service, name: name, type: state.type, from: state.from, until: state.until };
    return api("/api/label_values", params).then(function (body) {
      var items = body.values.map(function (v) { return { value: v, label: v }; });
      var a = $("cmp-value-a").value, b = $("cmp-value-b").value;
      fillSelect($("cmp-value-a"), items, a || (body.values[0] || ""));
      fillSelect($("cmp-value-b"), items, b || (body.values[1] || body.values[0] || ""));
    }, fail);
  }

  // ---------------------------------------------------------------------------------------------
  // one request (span) or trace

  function uniq(items) {
    return items.filter(function (x, i) { return items.indexOf(x) === i; });
  }

  function loadSpan() {
    setState("loading");
    setStatus("Looking up the " + (state.span.param === "span_id" ? "span" : "trace") + "…");
    var q = {};
    q[state.span.param] = state.span.id;
    return api("/api/spans", q).then(function (body) {
      state.span.info = body;
      if (!body.spans.length) {
        renderSpanHeader(body);
        var empty = $("empty");
        empty.hidden = false;
        empty.textContent = "";
        var h = document.createElement("h2");
        h.textContent = "No samples of this " + (state.span.param === "span_id" ? "span" : "trace");
        var p = document.createElement("p");
        p.textContent = "The collector holds no samples labelled with " + state.span.param + " " + state.span.id +
          ": the request was not sampled (it used less CPU and wall time than the sampling interval), its " +
          "profile has not arrived yet (agents send one every 10 s by default), or it is older than the retention.";
        empty.append(h, p);
        setStatus("");
        setState("empty");
        return;
      }
      var services = uniq(body.spans.map(function (sp) { return sp.service; }));
      var items = services.map(function (name) { return { value: name, label: name }; });
      if (services.length > 1) items.unshift({ value: "", label: "all " + services.length + " services of the trace" });
      fillSelect($("service"), items, services.length > 1 ? "" : services[0]);
      state.service = $("service").value;
      var types = [];
      state.services.forEach(function (info) {
        if (services.indexOf(info.name) >= 0) types = uniq(types.concat(info.types));
      });
      var wanted = state.hash.type && types.indexOf(state.hash.type) >= 0 ? state.hash.type
        : types.indexOf(PREFERRED_TYPE) >= 0 ? PREFERRED_TYPE : types[0];
      fillSelect($("profile-type"), types.map(function (t) {
        var parts = t.split(":");
        return { value: t, label: parts[0] + " · " + parts[1] + " (" + parts[2] + ")" };
      }), wanted);
      state.type = $("profile-type").value;
      renderSpanHeader(body);
      var first = Math.min.apply(null, body.spans.map(function (sp) { return sp.first; }));
      var last = Math.max.apply(null, body.spans.map(function (sp) { return sp.last; }));
      $("range-preset").value = "custom";
      setRange(first, last);
      state.labelName = state.hash.label || "";
      state.labelValue = state.hash.value || "";
      return loadLabelNames().then(refresh);
    }, fail);
  }

  function spanLink(param, id) {
    var a = document.createElement("a");
    a.href = "/?" + param + "=" + encodeURIComponent(id);
    a.textContent = id;
    return a;
  }

  function code(text) {
    var c = document.createElement("code");
    c.textContent = text;
    return c;
  }

  function renderSpanHeader(body) {
    var header = $("span-header");
    header.hidden = false;
    document.querySelector(".serve-tabs").hidden = true;
    var spans = body.spans;
    var title = $("span-title");
    title.textContent = "";
    var sum = { cpu_samples: 0, cpu_ns: 0, wall_ns: 0 };
    spans.forEach(function (sp) {
      sum.cpu_samples += sp.cpu_samples;
      sum.cpu_ns += sp.cpu_ns;
      sum.wall_ns += sp.wall_ns;
    });
    header.setAttribute("data-span-id", state.span.id);
    header.setAttribute("data-spans", String(spans.length));
    header.setAttribute("data-cpu-samples", String(sum.cpu_samples));
    header.setAttribute("data-cpu-ns", String(sum.cpu_ns));
    header.setAttribute("data-wall-ns", String(sum.wall_ns));
    var services = uniq(spans.map(function (sp) { return sp.service; }));
    var facts = [];
    if (state.span.param === "span_id") {
      title.append("Request span ", code(state.span.id));
      if (body.trace_id) title.append(" of trace ", spanLink("trace_id", body.trace_id));
      if (spans.length) {
        var names = uniq(spans.map(function (sp) { return sp.span_name; }).filter(Boolean));
        var pids = uniq(spans.map(function (sp) { return sp.pid; }).filter(Boolean));
        facts.push(names.length ? names.join(", ") : "(no span name)");
        facts.push("service " + services.join(", ") + (pids.length ? " (pid " + pids.join(", ") + ")" : ""));
      }
    } else {
      title.append("Trace ", code(state.span.id));
      if (spans.length) {
        facts.push(spans.length + " span" + (spans.length === 1 ? "" : "s") + " in " + services.length + " service" +
          (services.length === 1 ? "" : "s") + " (" + services.join(", ") + ")");
      }
    }
    if (spans.length) {
      var first = Math.min.apply(null, spans.map(function (sp) { return sp.first; }));
      var last = Math.max.apply(null, spans.map(function (sp) { return sp.last; }));
      facts.push(fmtTime(first) + " → " + fmtTime(last) + " (profile windows)");
      facts.push("CPU: " + sum.cpu_samples + " sample" + (sum.cpu_samples === 1 ? "" : "s") + ", " +
        fmtValue(sum.cpu_ns, "nanoseconds") + " · wall: " + fmtValue(sum.wall_ns, "nanoseconds"));
      var back = new URLSearchParams();
      back.set("service", spans[0].service);
      back.set("type", state.type || PREFERRED_TYPE);
      back.set("from", String(Math.floor(first)));
      back.set("until", String(Math.ceil(last)));
      $("span-back").href = "/#" + back.toString();
    }
    $("span-facts").textContent = facts.join(" · ");
    var table = $("span-table");
    table.hidden = state.span.param !== "trace_id" || !spans.length;
    var tbody = table.tBodies[0];
    tbody.textContent = "";
    spans.forEach(function (sp) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-span-id", sp.span_id);
      var id = document.createElement("td");
      id.className = "serve-text";
      id.append(spanLink("span_id", sp.span_id));
      tr.append(id);
      [
        [sp.span_name, "serve-text"],
        [sp.service, "serve-text"],
        [sp.pid, "serve-text"],
        [fmtTime(sp.first) + " → " + fmtTime(sp.last).slice(11), "serve-text"],
        [String(sp.cpu_samples), "serve-num"],
        [fmtValue(sp.cpu_ns, "nanoseconds"), "serve-num"],
        [fmtValue(sp.wall_ns, "nanoseconds"), "serve-num"],
      ].forEach(function (cell) {
        var td = document.createElement("td");
        td.className = cell[1];
        td.textContent = cell[0];
        tr.append(td);
      });
      tbody.append(tr);
    });
  }

  // ---------------------------------------------------------------------------------------------
  // time range

  function setRange(from, until) {
    state.from = Math.floor(from);
    state.until = Math.ceil(until);
    if (state.until <= state.from) state.until = state.from + 1;
    $("range-from").value = fmtTime(state.from);
    $("range-until").value = fmtTime(state.until);
    $("range-from").classList.remove("invalid");
    $("range-until").classList.remove("invalid");
  }

  /* Relative presets end now — or at the service's last profile when that is older, so that a
     service that stopped sending (or an imported store) still shows its data. */
  function applyPreset() {
    var preset = $("range-preset").value;
    var info = serviceInfo();
    var now = Date.now() / 1000;
    if (preset === "custom") return;
    if (preset === "all") {
      if (info) setRange(info.first, info.last + 1);
      else setRange(now - 3600, now);
      return;
    }
    var span = Number(preset);
    var end = now;
    if (info && info.last < now - span) end = info.last + 1;
    setRange(end - span, end);
  }

  function readRangeInputs() {
    var f = parseTime($("range-from").value), u = parseTime($("range-until").value);
    $("range-from").classList.toggle("invalid", isNaN(f));
    $("range-until").classList.toggle("invalid", isNaN(u) || (!isNaN(f) && u <= f));
    if (isNaN(f) || isNaN(u) || u <= f) {
      setStatus("Bad time range: use YYYY-MM-DD HH:MM:SS (local time), From before Until.", "error");
      return false;
    }
    $("range-preset").value = "custom";
    setRange(f, u);
    return true;
  }

  // ---------------------------------------------------------------------------------------------
  // loading

  function refresh() {
    if ((!state.service && !state.span) || !state.type) return Promise.resolve();
    var seq = ++state.seq;
    setState("loading");
    setStatus("Loading…");
    $("selector").textContent = currentSelector();
    writeHash();
    var params = selectionParams();
    return Promise.all([api("/api/timeline", params), api("/api/profile", params)]).then(
      function (res) {
        if (seq !== state.seq) return; // a newer request superseded this one
        renderTimeline(res[0]);
        renderProfile(res[1]);
        state.done++;
        document.body.setAttribute("data-seq", String(state.done));
        setStatus("");
        setState("ready");
      },
      function (err) {
        if (seq === state.seq) fail(err);
      }
    );
  }

  function fail(err) {
    setStatus("Error: " + (err && err.message ? err.message : err), "error");
    setState("error");
  }

  function renderProfile(body) {
    var unit = body.unit;
    var info = $("profile-info");
    var who = state.span ? state.span.param.replace("_id", "") + " " + state.span.id + " · " : "";
    info.textContent = who +
      (state.service || "all services") + " · " + body.type.split(":").slice(0, 3).join(":") + " · " + fmtTime(body.from) + " → " +
      fmtTime(body.until) + " (" + fmtDuration(body.until - body.from) + ") · " + body.profiles + " profile" +
      (body.profiles === 1 ? "" : "s") + " · total " + fmtValue(body.total, unit) +
      (body.selector !== "{}" ? " · " + body.selector : "");
    var empty = $("empty");
    if (!body.total) {
      empty.hidden = false;
      empty.textContent = state.span
        ? "No samples of this " + state.span.param.replace("_id", "") + " for this profile type, range or label."
        : "No samples in this range for this selection. Widen the time range or pick another label.";
    } else {
      empty.hidden = true;
      empty.textContent = "";
    }
    if (!state.viewer) {
      state.viewer = MwFlame.mount($("viewer"), body.data, {});
      window.mwViewer = state.viewer;
    } else {
      state.viewer.setData(body.data);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // timeline

  var SVG_NS = "http://www.w3.org/2000/svg";

  function svgEl(tag, attrs, text) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) {
      node.setAttribute(k, attrs[k]);
    });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderTimeline(body) {
    if (body) state.timeline = body;
    body = state.timeline;
    var svg = $("timeline");
    if (!body) return;
    var width = Math.max(200, svg.clientWidth || svg.parentNode.clientWidth || 800);
    var height = TIMELINE_HEIGHT;
    var plot = height - AXIS_HEIGHT;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("data-from", body.from);
    svg.setAttribute("data-until", body.until);
    svg.textContent = "";
    var span = body.until - body.from;
    var max = 0;
    body.points.forEach(function (p) {
      if (p.value > max) max = p.value;
    });
    svg.append(svgEl("rect", { x: 0, y: 0, width: width, height: plot, class: "tl-bg" }));
    body.points.forEach(function (p) {
      var x0 = ((p.t - body.from) / span) * width;
      var x1 = ((Math.min(p.t + body.step, body.until) - body.from) / span) * width;
      var h = max ? (p.value / max) * (plot - 4) : 0;
      var bar = svgEl("rect", {
        class: "tl-bar",
        x: x0.toFixed(2),
        y: (plot - h).toFixed(2),
        width: Math.max(0.5, x1 - x0 - 0.5).toFixed(2),
        height: h.toFixed(2),
        "data-t": p.t,
        "data-value": p.value,
      });
      bar.append(svgEl("title", {}, fmtTime(p.t) + " · " + fmtValue(p.value, body.unit) + " · " + p.profiles + " profile(s)"));
      svg.append(bar);
    });
    // axis: about one label per 140 px
    var ticks = Math.max(2, Math.floor(width / 140));
    for (var i = 0; i <= ticks; i++) {
      var t = body.from + (span * i) / ticks;
      var x = (width * i) / ticks;
      var anchor = i === 0 ? "start" : i === ticks ? "end" : "middle";
      svg.append(svgEl("line", { x1: x, x2: x, y1: plot, y2: plot + 3, class: "tl-tick" }));
      svg.append(
        svgEl("text", { x: x, y: height - 3, "text-anchor": anchor, class: "tl-label" },
          span > 86400 ? fmtTime(t).slice(5, 16) : fmtTime(t).slice(11, 19))
      );
    }
    drawCompareOverlays();
    svg.append(svgEl("rect", { id: "timeline-selection", class: "tl-selection", x: 0, y: 0, width: 0, height: plot, visibility: "hidden" }));
    $("timeline-total").textContent =
      "Total " + fmtValue(body.total, body.unit) + " · bucket " + fmtDuration(body.step);
  }

  function drawCompareOverlays() {
    var svg = $("timeline");
    var body = state.timeline;
    if (!body) return;
    svg.querySelectorAll(".tl-cmp").forEach(function (n) {
      n.remove();
    });
    if ($("view-compare").hidden || $("cmp-mode").value !== "time") return;
    var width = Number(svg.getAttribute("width"));
    var plot = TIMELINE_HEIGHT - AXIS_HEIGHT;
    var span = body.until - body.from;
    ["a", "b"].forEach(function (which) {
      var r = state.cmp[which];
      if (!r) return;
      var x0 = Math.max(0, ((r[0] - body.from) / span) * width);
      var x1 = Math.min(width, ((r[1] - body.from) / span) * width);
      if (x1 <= x0) return;
      var sel = svg.querySelector("#timeline-selection");
      var rect = svgEl("rect", { id: "tl-cmp-" + which, class: "tl-cmp tl-cmp-" + which, x: x0, y: 0, width: x1 - x0, height: plot });
      if (sel) svg.insertBefore(rect, sel);
      else svg.append(rect);
    });
  }

  function xToTime(clientX) {
    var svg = $("timeline");
    var box = svg.getBoundingClientRect();
    var body = state.timeline;
    var frac = Math.min(1, Math.max(0, (clientX - box.left) / box.width));
    return body.from + frac * (body.until - body.from);
  }

  function installTimelineDrag() {
    var svg = $("timeline");
    var drag = null;
    svg.addEventListener("mousedown", function (ev) {
      if (!state.timeline || ev.button !== 0) return;
      ev.preventDefault();
      drag = { x0: ev.clientX };
    });
    window.addEventListener("mousemove", function (ev) {
      if (!drag) return;
      var sel = $("timeline-selection");
      if (!sel) return;
      var box = svg.getBoundingClientRect();
      var scale = Number(svg.getAttribute("width")) / box.width;
      var a = Math.max(0, Math.min(drag.x0, ev.clientX) - box.left);
      var b = Math.min(box.width, Math.max(drag.x0, ev.clientX) - box.left);
      sel.setAttribute("x", a * scale);
      sel.setAttribute("width", Math.max(0, b - a) * scale);
      sel.setAttribute("visibility", "visible");
    });
    window.addEventListener("mouseup", function (ev) {
      if (!drag) return;
      var x0 = drag.x0;
      drag = null;
      var sel = $("timeline-selection");
      if (sel) sel.setAttribute("visibility", "hidden");
      if (Math.abs(ev.clientX - x0) < 4) return; // a click, not a drag
      var t0 = xToTime(Math.min(x0, ev.clientX)), t1 = xToTime(Math.max(x0, ev.clientX));
      onTimelineRange(t0, t1);
    });
  }

  function onTimelineRange(t0, t1) {
    if (!$("view-compare").hidden && $("cmp-mode").value === "time") {
      var which = $("cmp-pick-b").checked ? "b" : "a";
      state.cmp[which] = [Math.floor(t0), Math.ceil(t1)];
      writeCompareInputs();
      drawCompareOverlays();
      if (which === "a") $("cmp-pick-b").checked = true;
      return;
    }
    $("range-preset").value = "custom";
    setRange(t0, t1);
    loadLabelNames().then(refresh);
  }

  // ---------------------------------------------------------------------------------------------
  // compare

  function writeCompareInputs() {
    ["a", "b"].forEach(function (which) {
      var r = state.cmp[which];
      $("cmp-" + which + "-from").value = r ? fmtTime(r[0]) : "";
      $("cmp-" + which + "-until").value = r ? fmtTime(r[1]) : "";
    });
  }

  function readCompareInputs() {
    var ok = true;
    ["a", "b"].forEach(function (which) {
      var f = parseTime($("cmp-" + which + "-from").value), u = parseTime($("cmp-" + which + "-until").value);
      var bad = isNaN(f) || isNaN(u) || u <= f;
      $("cmp-" + which + "-from").classList.toggle("invalid", bad);
      $("cmp-" + which + "-until").classList.toggle("invalid", bad);
      if (bad) ok = false;
      else state.cmp[which] = [f, u];
    });
    return ok;
  }

  function defaultCompareRanges() {
    if (!state.cmp.a || !state.cmp.b) {
      var mid = Math.floor((state.from + state.until) / 2);
      state.cmp = { a: [state.from, mid], b: [mid, state.until] };
    }
    writeCompareInputs();
  }

  function showView(name) {
    document.querySelectorAll(".serve-tabs [role=tab]").forEach(function (tab) {
      var on = tab.getAttribute("data-view") === name;
      tab.classList.toggle("active", on);
      tab.setAttribute("aria-selected", on ? "true" : "false");
    });
    $("view-profile").hidden = name !== "profile";
    $("view-compare").hidden = name !== "compare";
    $("view-regressions").hidden = name !== "regressions";
    if (name === "compare") defaultCompareRanges();
    if (name === "regressions") loadRegressions();
    drawCompareOverlays();
    $("timeline-hint").textContent =
      name === "compare" && $("cmp-mode").value === "time"
        ? "Drag across the timeline to set range A or B (the checked one)."
        : "Drag across the timeline to select a time range.";
  }

  function runCompare() {
    var params = { service: state.service, type: state.type };
    var mode = $("cmp-mode").value;
    if (mode === "time") {
      if (!readCompareInputs()) {
        setStatus("Bad comparison ranges: use YYYY-MM-DD HH:MM:SS, From before Until.", "error");
        return Promise.resolve();
      }
      drawCompareOverlays();
      params.from = state.cmp.a[0];
      params.until = state.cmp.a[1];
      params.from2 = state.cmp.b[0];
      params.until2 = state.cmp.b[1];
      params.selector = currentSelector();
    } else {
      var name = $("cmp-label-name").value;
      if (!name) {
        setStatus("This service has no labels to compare.", "error");
        return Promise.resolve();
      }
      params.from = state.from;
      params.until = state.until;
      params.selector = selector(name, $("cmp-value-a").value);
      params.selector2 = selector(name, $("cmp-value-b").value);
      if (state.cmpExtra) { /* a regression opened within one endpoint: both sides in it */
        params.selector = params.selector.replace(/}$/, "," + state.cmpExtra + "}");
        params.selector2 = params.selector2.replace(/}$/, "," + state.cmpExtra + "}");
      }
    }
    setState("loading");
    setStatus("Comparing…");
    return api("/api/diff", params).then(function (body) {
      state.diff = body;
      renderDiff();
      setStatus("");
      setState("ready");
    }, fail);
  }

  /* The regression detector's findings (serve compares each version with the one before it). */
  function loadRegressions() {
    if (!state.service) return Promise.resolve();
    return api("/api/regressions", { service: state.service, type: state.type }).then(renderRegressions, fail);
  }

  /* The version changes where every function got dearer (or, per request, cheaper) alike (the
     machine, the runtime...): each function was judged beyond that common change. */
  function commonNote(body) {
    var notes = [];
    (body.comparisons || []).forEach(function (c) {
      var all = (c.common || {})[""];
      if (all && all !== 1) {
        var v = Math.round((all - 1) * 100);
        notes.push(c.before.version + " → " + c.after.version + ": " + (v >= 0 ? "+" : "") + v + "%");
      }
    });
    return notes.length
      ? " Common change of all functions (the machine, the runtime, or code that changed most functions alike; " +
        "each function is judged beyond it): " + notes.join(", ") + "."
      : "";
  }

  function renderRegressions(body) {
    var rows = [];
    (body.comparisons || []).forEach(function (c) {
      c.findings.forEach(function (f) {
        rows.push({ c: c, f: f });
      });
    });
    var n = (body.comparisons || []).length;
    $("regress-summary").textContent = n
      ? n + " version change" + (n === 1 ? "" : "s") + " compared (label '" + body.label + "'); " + rows.length +
        " finding" + (rows.length === 1 ? "" : "s") + ": functions whose cost (per request where the agents " +
        "count requests, else as a share of the total) grew by more than " +
        Math.round(body.threshold * 100) + "% beyond the sampling noise (" + body.confidence * 100 +
        "% family-wise), and new ones. Click a row to compare the two versions." + commonNote(body)
      : "No two versions of this service to compare yet: agents label profiles with the version they run " +
        "(MW_VCS_COMMIT_SHA, service.version, or the app's git commit).";
    var tbody = $("regress-table").tBodies[0];
    tbody.textContent = "";
    rows.forEach(function (r) {
      var f = r.f, c = r.c;
      var tr = document.createElement("tr");
      tr.className = "grew serve-link";
      tr.setAttribute("data-function", f.function);
      tr.setAttribute("data-endpoint", f.endpoint || "");
      function pct(ratio) {
        var v = Math.round((ratio - 1) * 100);
        return (v >= 0 ? "+" : "") + v + "%";
      }
      var growth = f.kind === "new" ? "new"
        : pct(f.ratio) + " (" + pct(f.ratio_low) + " … " + (f.ratio_high === null ? "∞" : pct(f.ratio_high)) + ")" +
          (f.common !== 1 ? " beyond " + pct(f.common) + " common" : "");
      [
        f.function,
        f.endpoint || "(all)",
        c.before.version + " → " + c.after.version,
        f.basis === "request"
          ? fmtValue(f.share_before, unitOf(body.type)) + " → " + fmtValue(f.share_after, unitOf(body.type)) +
            " per request"
          : (f.share_before * 100).toFixed(2) + "% → " + (f.share_after * 100).toFixed(2) + "%",
        growth,
        fmtTime(f.first_seen)
      ].forEach(function (text, i) {
        var td = document.createElement("td");
        td.textContent = text;
        td.className = i === 0 ? "serve-text serve-fn" : i < 3 ? "serve-text" : "serve-num";
        if (i === 0) td.title = f.file;
        tr.append(td);
      });
      tr.addEventListener("click", function () {
        openRegression(body.label, c, f);
      });
      tbody.append(tr);
    });
  }

  function openRegression(label, c, f) {
    $("range-preset").value = "custom";
    setRange(Math.min(c.before.from, c.after.from), Math.max(c.before.until, c.after.until));
    $("cmp-mode").value = "label";
    $("cmp-time").hidden = true;
    $("cmp-label").hidden = false;
    state.cmpExtra = f.endpoint ? selector("endpoint", f.endpoint).replace(/^{|}$/g, "") : "";
    showView("compare");
    var names = $("cmp-label-name");
    names.value = label;
    if (names.value !== label) { /* not among the names loaded for the current range */
      var opt = document.createElement("option");
      opt.value = opt.textContent = label;
      names.append(opt);
      names.value = label;
    }
    $("cmp-value-a").value = "";
    $("cmp-value-b").value = "";
    return loadCompareValues().then(function () {
      $("cmp-value-a").value = c.before.version;
      $("cmp-value-b").value = c.after.version;
      return runCompare();
    });
  }

  function describeSide(side) {
    var sel = side.selector !== "{}" ? " " + side.selector : "";
    return fmtTime(side.from) + " → " + fmtTime(side.until) + sel + " (" + side.profiles + " profiles, total " +
      fmtValue(side.total, state.diff.unit) + ")";
  }

  function renderDiff() {
    var body = state.diff;
    if (!body) return;
    /* the diff flame graph: frames coloured by the change of their share from A to B */
    if (!state.diffViewer) {
      state.diffViewer = MwFlame.mount($("cmp-flame"), body.flame, {});
      window.mwDiffViewer = state.diffViewer;
    } else if (state.diffViewer.data !== body.flame) { /* not on a re-sort of the table */
      state.diffViewer.setData(body.flame);
    }
    $("cmp-summary").textContent = "A: " + describeSide(body.base) + "   B: " + describeSide(body.comparison) +
      ". Shares are percent of each side's own total; Change is B − A in percentage points.";
    var key = state.diffSort;
    var rows = body.functions.slice();
    rows.sort(function (x, y) {
      if (key === "function") return x.function < y.function ? -1 : x.function > y.function ? 1 : 0;
      return y[key] - x[key] || (x.function < y.function ? -1 : 1);
    });
    var table = $("diff-table");
    table.querySelectorAll("th[data-sort]").forEach(function (th) {
      th.classList.toggle("sorted", th.getAttribute("data-sort") === key);
    });
    var maxAbs = 0;
    rows.forEach(function (r) {
      maxAbs = Math.max(maxAbs, Math.abs(r.change));
    });
    var tbody = table.tBodies[0];
    tbody.textContent = "";
    rows.forEach(function (r) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-function", r.function);
      tr.setAttribute("data-change", r.change.toFixed(4));
      tr.className = r.change > 0 ? "grew" : r.change < 0 ? "shrank" : "";
      var name = document.createElement("td");
      name.className = "serve-fn";
      name.textContent = r.function;
      name.title = r.file;
      var change = document.createElement("td");
      change.className = "serve-num serve-change";
      var bar = document.createElement("span");
      bar.className = "serve-bar " + (r.change >= 0 ? "up" : "down");
      bar.style.width = (maxAbs ? (Math.abs(r.change) / maxAbs) * 60 : 0) + "px";
      var text = document.createElement("span");
      text.textContent = (r.change >= 0 ? "+" : "") + r.change.toFixed(2) + " pp";
      change.append(bar, text);
      tr.append(
        name,
        cell(r.self_share_a.toFixed(2) + "%"),
        cell(r.self_share_b.toFixed(2) + "%"),
        change,
        cell(fmtValue(r.self_a, body.unit)),
        cell(fmtValue(r.self_b, body.unit))
      );
      tbody.append(tr);
    });
    function cell(text) {
      var td = document.createElement("td");
      td.className = "serve-num";
      td.textContent = text;
      return td;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // wiring

  function init() {
    document.querySelectorAll("form").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
      });
    });
    $("service").addEventListener("change", function () {
      if (state.span) { /* one service of the trace, or all of them */
        state.service = $("service").value;
        state.labelName = state.labelValue = "";
        loadLabelNames().then(refresh);
        return;
      }
      onServiceChange(false);
    });
    $("profile-type").addEventListener("change", function () {
      state.type = $("profile-type").value;
      refresh();
    });
    $("range-preset").addEventListener("change", function () {
      applyPreset();
      loadLabelNames().then(refresh);
    });
    $("apply-range").addEventListener("click", function () {
      if (readRangeInputs()) loadLabelNames().then(refresh);
    });
    ["range-from", "range-until"].forEach(function (id) {
      $(id).addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" && readRangeInputs()) loadLabelNames().then(refresh);
      });
    });
    $("zoom-out").addEventListener("click", function () {
      var span = state.until - state.from;
      var end = Math.min(Date.now() / 1000 + span / 2, state.until + span / 2);
      $("range-preset").value = "custom";
      setRange(end - 2 * span, end);
      loadLabelNames().then(refresh);
    });
    $("refresh").addEventListener("click", function () {
      var keep = state.service;
      loadStorage();
      if (state.span) {
        api("/api/services").then(function (body) {
          state.services = body.services;
          $("empty").hidden = true;
          loadSpan();
        }, fail);
        return;
      }
      api("/api/services").then(function (body) {
        state.services = body.services;
        if (!state.services.length) return;
        $("empty").hidden = true;
        fillSelect($("service"), state.services.map(function (s) {
          return { value: s.name, label: s.name + " (" + s.profiles + ")" };
        }), keep);
        if (keep !== $("service").value || !keep) {
          onServiceChange(false);
          return;
        }
        applyPreset();
        loadLabelNames().then(refresh);
      }, fail);
    });
    $("label-name").addEventListener("change", function () {
      state.labelName = $("label-name").value;
      state.labelValue = "";
      loadLabelValues().then(refresh);
    });
    $("label-value").addEventListener("change", function () {
      state.labelValue = $("label-value").value;
      refresh();
    });
    document.querySelectorAll(".serve-tabs [role=tab]").forEach(function (tab) {
      tab.addEventListener("click", function () {
        showView(tab.getAttribute("data-view"));
      });
    });
    $("cmp-mode").addEventListener("change", function () {
      state.cmpExtra = "";
      var time = $("cmp-mode").value === "time";
      $("cmp-time").hidden = !time;
      $("cmp-label").hidden = time;
      showView("compare");
    });
    $("cmp-label-name").addEventListener("change", function () {
      state.cmpExtra = "";
      $("cmp-value-a").value = "";
      $("cmp-value-b").value = "";
      loadCompareValues();
    });
    $("cmp-run").addEventListener("click", runCompare);
    $("diff-table").tHead.addEventListener("click", function (ev) {
      var th = ev.target.closest("th[data-sort]");
      if (!th) return;
      state.diffSort = th.getAttribute("data-sort");
      renderDiff();
    });
    installTimelineDrag();
    var resizeTimer = null;
    window.addEventListener("resize", function () {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(function () {
        renderTimeline();
      }, 100);
    });
    loadServices();
    loadStorage();
  }

  window.mwServe = { state: state, refresh: refresh, parseTime: parseTime, fmtTime: fmtTime };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
