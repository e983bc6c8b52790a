/*
 * middleware flame graph viewer: flame graph + function table + sandwich, in plain JavaScript.
 *
 * Used by the static page (`python -m middleware flamegraph`) and by the `serve` web page:
 *
 *     const viewer = MwFlame.mount(containerElement, data, {onSelect: fn});
 *     viewer.setData(newData);          // e.g. after fetching another time range
 *
 * `data` is the JSON built by middleware/reporters/flamegraph.py:profile_to_json (version 1):
 * {value: {name, unit}, total, functions: [{name, file, line, self, total}],
 *  tree: {f: -1, v, s, c: [{f, v, s, c}]}, deep: [[node...]]} where `f` indexes `functions`
 * and a node with `cx` has its children in deep[cx] (keeps the JSON nesting shallow).
 *
 * How it draws: every tree node gets an offset (`start`, in value units) inside its parent, so
 * a node's box spans [start, start + v) of the total. Zooming on a node rescales its subtree to
 * the full width (its ancestors stay as full-width dimmed bars); boxes narrower than
 * MIN_FRACTION of the zoomed width are not drawn. Boxes are absolutely positioned <div>s with
 * widths in percent, so resizing needs no redraw, and their state is plain DOM classes:
 *   .mw-frame[data-function][data-fid][data-depth]   one box (root first, root = depth 0)
 *   .highlighted   frames of the function selected in the table or by a click
 *   .match         frames of functions matching the search box
 * The table rows are tr[data-function][data-fid] (class `selected` on the selected one), and
 * the sandwich lists callers in #mw-callers and callees in #mw-callees.
 */
(function (global) {
  "use strict";

  var ROW_HEIGHT = 18;
  var MIN_FRACTION = 0.0005;
  var MAX_TABLE_ROWS = 2000;
  var TIME_UNITS = { nanoseconds: 1, microseconds: 1e3, milliseconds: 1e6, seconds: 1e9 };

  function formatValue(value, unit) {
    var scale = TIME_UNITS[unit];
    if (scale === undefined) {
      if (unit === "bytes") {
        var units = [[1073741824, "GiB"], [1048576, "MiB"], [1024, "KiB"]];
        for (var i = 0; i < units.length; i++) {
          if (Math.abs(value) >= units[i][0]) return (value / units[i][0]).toFixed(2) + units[i][1];
        }
        return Math.round(value) + "B";
      }
      return String(Math.round(value));
    }
    var ns = value * scale, a = Math.abs(ns);
    if (a >= 1e9) return (ns / 1e9).toFixed(2) + "s";
    if (a >= 1e6) return (ns / 1e6).toFixed(2) + "ms";
    if (a >= 1e3) return (ns / 1e3).toFixed(2) + "us";
    return Math.round(ns) + "ns";
  }

  function percent(value, total) {
    return total ? (100 * value) / total : 0;
  }

  function formatPercent(value, total) {
    return percent(value, total).toFixed(2) + "%";
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        node.setAttribute(k, attrs[k]);
      });
    }
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  /* A stable warm colour per function name (flame graph tradition). */
  function colorFor(name) {
    var h = 0;
    for (var i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) | 0;
    h = Math.abs(h);
    return "hsl(" + (h % 50) + ", " + (60 + (h % 25)) + "%, " + (58 + ((h >> 5) % 14)) + "%)";
  }

  /* Diff mode: how a node's share changed from A to B, in [-1, 1]: (shareB - shareA) divided by
     the larger share; 1 = only in B (new), -1 = only in A (gone). */
  function diffChange(a, b, totalA, totalB) {
    var sa = totalA ? a / totalA : 0, sb = totalB ? b / totalB : 0;
    var big = Math.max(sa, sb);
    return big > 0 ? (sb - sa) / big : 0;
  }

  /* Red for grew, green for shrank, grey for unchanged; the stronger the change, the deeper. */
  function diffColor(change) {
    var k = Math.min(1, Math.abs(change));
    if (k < 0.02) return "hsl(0, 0%, 82%)";
    return "hsl(" + (change > 0 ? 0 : 125) + ", " + Math.round(35 + 40 * k) + "%, " + Math.round(82 - 30 * k) + "%)";
  }

  function Viewer(container, data, options) {
    this.container = container;
    this.options = options || {};
    this.state = { zoom: null, highlighted: null, search: "", matches: [], searchShare: 0, sort: "self" };
    this._build();
    this.setData(data);
  }

  Viewer.prototype._build = function () {
    var self = this;
    var root = this.container;
    root.classList.add("mw-app");
    root.textContent = "";

    var toolbar = el("div", { class: "mw-toolbar" });
    this.searchBox = el("input", {
      id: "mw-search", type: "search", placeholder: "Search functions…", autocomplete: "off",
      "aria-label": "Search functions",
    });
    this.searchShare = el("span", { id: "mw-search-share", class: "mw-search-share" });
    this.resetButton = el("button", { id: "mw-reset", type: "button", title: "Reset zoom (Esc)" }, "Reset zoom");
    this.summary = el("span", { id: "mw-summary", class: "mw-summary" });
    this.legend = el("div", { class: "mw-legend", hidden: "" });
    toolbar.append(this.searchBox, this.searchShare, this.resetButton, this.summary, this.legend);

    var main = el("div", { class: "mw-main" });
    var flamePane = el("section", { class: "mw-flame-pane", "aria-label": "Flame graph" });
    this.breadcrumb = el("div", { id: "mw-zoom-info", class: "mw-zoom-info" });
    this.flame = el("div", { id: "mw-flame", class: "mw-flame", role: "tree" });
    this.tooltip = el("div", { id: "mw-tooltip", class: "mw-tooltip", hidden: "" });
    flamePane.append(this.breadcrumb, this.flame, this.tooltip);

    var side = el("section", { class: "mw-side" });
    var tableWrap = el("div", { class: "mw-table-wrap" });
    this.table = el("table", { id: "mw-table", class: "mw-table" });
    var head = el("tr");
    this.headCells = [];
    [["name", "Function"], ["self", "Self"], ["self", "Self%"], ["total", "Total"], ["total", "Total%"]].forEach(
      function (c) {
        var th = el("th", { "data-sort": c[0], scope: "col", title: "Sort by " + c[0] }, c[1]);
        head.append(th);
        self.headCells.push(th);
      }
    );
    var thead = el("thead");
    thead.append(head);
    this.tbody = el("tbody");
    this.table.append(thead, this.tbody);
    tableWrap.append(this.table);
    this.tableNote = el("div", { class: "mw-note" });
    tableWrap.append(this.tableNote);

    this.sandwich = el("div", { id: "mw-sandwich", class: "mw-sandwich" });
    side.append(tableWrap, this.sandwich);
    main.append(flamePane, side);
    root.append(toolbar, main);

    this.searchBox.addEventListener("input", function () {
      self.search(self.searchBox.value);
    });
    this.resetButton.addEventListener("click", function () {
      self.resetZoom();
    });
    this.flame.addEventListener("click", function (ev) {
      var box = ev.target.closest(".mw-frame");
      if (!box) return;
      var node = self.nodes[Number(box.getAttribute("data-node"))];
      if (node.f < 0 || node === self.zoomNode()) {
        self.resetZoom();
      } else {
        self.zoom(node.id);
      }
      if (node.f >= 0) self.highlightFunction(node.f);
    });
    this.flame.addEventListener("mousemove", function (ev) {
      var box = ev.target.closest(".mw-frame");
      if (!box) {
        self.tooltip.hidden = true;
        return;
      }
      self._showTooltip(self.nodes[Number(box.getAttribute("data-node"))], ev);
    });
    this.flame.addEventListener("mouseleave", function () {
      self.tooltip.hidden = true;
    });
    thead.addEventListener("click", function (ev) {
      var th = ev.target.closest("th[data-sort]");
      if (th) self.sortTable(th.getAttribute("data-sort"));
    });
    this.tbody.addEventListener("click", function (ev) {
      var tr = ev.target.closest("tr[data-fid]");
      if (!tr) return;
      var fid = Number(tr.getAttribute("data-fid"));
      self.highlightFunction(self.state.highlighted === fid ? null : fid);
    });
    this.sandwich.addEventListener("click", function (ev) {
      var tr = ev.target.closest("tr[data-fid]");
      if (tr) self.highlightFunction(Number(tr.getAttribute("data-fid")));
    });
    this._keyHandler = function (ev) {
      if (ev.key === "Escape" && document.activeElement !== self.searchBox) self.resetZoom();
    };
    document.addEventListener("keydown", this._keyHandler);
  };

  /* Replace the profile shown; keeps the search text, drops zoom and selection. */
  Viewer.prototype.setData = function (data) {
    this.data = data;
    this.functions = data.functions || [];
    this.unit = (data.value && data.value.unit) || "";
    this.total = data.total || 0;
    this.diff = data.diff || null;
    this._setDiffChrome();
    this.nodes = [];
    this.maxDepth = 0;
    var byFunction = this.functions.map(function () {
      return [];
    });
    // index the tree without recursion (stacks can be deep)
    var stack = [[data.tree, null, 0, 0]];
    while (stack.length) {
      var item = stack.pop();
      var n = item[0];
      var node = { id: this.nodes.length, f: n.f, v: n.v, s: n.s, a: n.a, b: n.b, parent: item[1], depth: item[2], start: item[3], children: [] };
      this.nodes.push(node);
      if (node.parent) node.parent.children.push(node);
      if (node.f >= 0) byFunction[node.f].push(node);
      if (node.depth > this.maxDepth) this.maxDepth = node.depth;
      var offset = item[3];
      var kids = n.cx !== undefined && data.deep ? data.deep[n.cx] || [] : n.c || [];
      var pending = [];
      for (var i = 0; i < kids.length; i++) {
        pending.push([kids[i], node, item[2] + 1, offset]);
        offset += kids[i].v;
      }
      for (var j = pending.length - 1; j >= 0; j--) stack.push(pending[j]);
    }
    this.byFunction = byFunction;
    this.state.zoom = null;
    this.state.highlighted = null;
    var v = data.value || {};
    this.summary.textContent = this.diff
      ? (v.name || "value") + ": " + this.diff.name_a + " against " + this.diff.name_b + ", " +
        this.functions.length + " functions; a frame's width is its average share of the two"
      : (v.name || "value") + ": total " + formatValue(this.total, this.unit) +
      " in " + (data.samples || 0) + " stacks, " + this.functions.length + " functions" +
      (data.pruned_nodes
        ? " (" + data.pruned_nodes + " call paths under " + formatValue(data.pruned_below, this.unit) +
          " each are not drawn; the table is complete)"
        : "");
    this.renderFlame();
    this.renderTable();
    this.renderSandwich();
    this.search(this.searchBox.value);
  };

  /* Diff mode's legend and table headings (or the plain ones back). */
  Viewer.prototype._setDiffChrome = function () {
    var d = this.diff;
    var titles = d
      ? ["Function", "Self " + d.name_a, "Self " + d.name_b, "Change", "Total " + d.name_b]
      : ["Function", "Self", "Self%", "Total", "Total%"];
    this.headCells.forEach(function (th, i) {
      th.textContent = titles[i];
    });
    this.legend.textContent = "";
    this.legend.hidden = !d;
    this.sandwich.hidden = !!d; /* callers/callees of a diff: not shown (the table says it all) */
    if (!d) return;
    var self = this;
    [["shrank", -1], ["unchanged", 0], ["grew", 1]].forEach(function (item) {
      var sw = el("span", { class: "mw-legend-swatch" });
      sw.style.backgroundColor = diffColor(item[1]);
      self.legend.append(sw, el("span", { class: "mw-legend-text" }, item[0]));
    });
    this.legend.append(
      el("span", { class: "mw-legend-text" },
        "share of " + d.name_a + " (" + formatValue(d.total_a, this.unit) + ") → " + d.name_b +
        " (" + formatValue(d.total_b, this.unit) + ")")
    );
  };

  Viewer.prototype.zoomNode = function () {
    return this.state.zoom === null ? this.nodes[0] : this.nodes[this.state.zoom];
  };

  Viewer.prototype.zoom = function (nodeId) {
    this.state.zoom = nodeId;
    this.renderFlame();
  };

  Viewer.prototype.resetZoom = function () {
    this.state.zoom = null;
    this.renderFlame();
  };

  Viewer.prototype._frameLabel = function (node) {
    if (node.f < 0) return "all";
    return this.functions[node.f].name;
  };

  Viewer.prototype.renderFlame = function () {
    var zoom = this.zoomNode();
    var frag = document.createDocumentFragment();
    var highlighted = this.state.highlighted;
    var matches = this._matchSet || {};
    var self = this;
    var drawn = 0;

    function box(node, left, width, extraClass) {
      var fn = node.f >= 0 ? self.functions[node.f] : null;
      var div = el("div", {
        class: "mw-frame" + (extraClass ? " " + extraClass : ""),
        "data-node": node.id,
        "data-fid": node.f,
        "data-depth": node.depth,
        "data-function": fn ? fn.name : "",
      });
      div.style.left = left * 100 + "%";
      div.style.width = width * 100 + "%";
      div.style.top = node.depth * ROW_HEIGHT + "px";
      if (fn && self.diff) {
        var change = diffChange(node.a || 0, node.b || 0, self.diff.total_a, self.diff.total_b);
        div.setAttribute("data-change", change.toFixed(3));
        div.style.backgroundColor = diffColor(change);
      } else if (fn) {
        div.style.backgroundColor = colorFor(fn.name);
      }
      if (fn) {
        if (node.f === highlighted) div.classList.add("highlighted");
        if (matches[node.f]) div.classList.add("match");
      }
      div.append(el("span", { class: "mw-label" }, self._frameLabel(node)));
      frag.append(div);
      drawn++;
    }

    // ancestors of the zoomed node, full width and dimmed
    var chain = [];
    for (var a = zoom.parent; a; a = a.parent) chain.push(a);
    chain.forEach(function (n) {
      box(n, 0, 1, "mw-ancestor");
    });
    // the zoomed subtree
    var base = zoom.start, scale = zoom.v || 1;
    var todo = [zoom];
    while (todo.length) {
      var n = todo.pop();
      var width = n.v / scale;
      if (width < MIN_FRACTION) continue;
      box(n, (n.start - base) / scale, width, n === zoom && zoom.f >= 0 ? "mw-zoomed" : "");
      for (var i = n.children.length - 1; i >= 0; i--) todo.push(n.children[i]);
    }
    this.flame.textContent = "";
    this.flame.style.height = (this.maxDepth + 1) * ROW_HEIGHT + "px";
    this.flame.append(frag);
    this.flame.setAttribute("data-frames", drawn);
    this.breadcrumb.textContent =
      zoom.f >= 0
        ? "Zoomed on " + this._frameLabel(zoom) + " (" + formatPercent(zoom.v, this.total) + " of total). Click it or press Esc to reset."
        : "Click a frame to zoom in.";
    this.resetButton.disabled = this.state.zoom === null;
  };

  Viewer.prototype._showTooltip = function (node, ev) {
    var t = this.tooltip;
    t.textContent = "";
    var fn = node.f >= 0 ? this.functions[node.f] : null;
    t.append(el("strong", null, fn ? fn.name : "all"));
    if (fn && fn.file) t.append(el("div", { class: "mw-loc" }, fn.file + (fn.line ? ":" + fn.line : "")));
    var d = this.diff;
    if (d) {
      var pa = percent(node.a || 0, d.total_a), pb = percent(node.b || 0, d.total_b);
      t.append(el("div", { class: "mw-tip-a" }, d.name_a + " " + formatValue(node.a || 0, this.unit) + " (" + pa.toFixed(2) + "%)"));
      t.append(el("div", { class: "mw-tip-b" }, d.name_b + " " + formatValue(node.b || 0, this.unit) + " (" + pb.toFixed(2) + "%)"));
      t.append(el("div", { class: "mw-tip-change" }, "change " + (pb - pa >= 0 ? "+" : "") + (pb - pa).toFixed(2) + " points"));
    } else {
      t.append(el("div", null, "Total " + formatValue(node.v, this.unit) + " (" + formatPercent(node.v, this.total) + ")"));
      if (node.s) t.append(el("div", null, "Self " + formatValue(node.s, this.unit) + " (" + formatPercent(node.s, this.total) + ")"));
    }
    t.hidden = false;
    var pane = this.flame.parentNode.getBoundingClientRect();
    var x = ev.clientX - pane.left + 12, y = ev.clientY - pane.top + 12;
    if (x + 260 > pane.width) x = Math.max(0, x - 280);
    t.style.left = x + "px";
    t.style.top = y + "px";
  };

  Viewer.prototype.sortTable = function (key) {
    if (["self", "total", "name"].indexOf(key) < 0) throw new Error("unknown sort key " + key);
    this.state.sort = key;
    this.renderTable();
  };

  Viewer.prototype.renderTable = function () {
    var key = this.state.sort;
    var fns = this.functions;
    var order = fns.map(function (_, i) {
      return i;
    });
    order.sort(function (a, b) {
      var fa = fns[a], fb = fns[b];
      if (key === "name") return fa.name < fb.name ? -1 : fa.name > fb.name ? 1 : a - b;
      var other = key === "self" ? "total" : "self";
      return fb[key] - fa[key] || fb[other] - fa[other] || a - b;
    });
    this.table.querySelectorAll("th[data-sort]").forEach(function (th) {
      var on = th.getAttribute("data-sort") === key;
      th.classList.toggle("sorted", on);
      th.setAttribute("aria-sort", on ? (key === "name" ? "ascending" : "descending") : "none");
    });
    var frag = document.createDocumentFragment();
    var shown = order.slice(0, MAX_TABLE_ROWS);
    var total = this.total, unit = this.unit, selected = this.state.highlighted, d = this.diff;
    var matches = this._matchSet || {};
    shown.forEach(function (i) {
      var fn = fns[i];
      var tr = el("tr", { "data-fid": i, "data-function": fn.name });
      if (i === selected) tr.classList.add("selected");
      if (matches[i]) tr.classList.add("match");
      var name = el("td", { class: "mw-fn", title: fn.file + (fn.line ? ":" + fn.line : "") }, fn.name);
      if (fn.file) name.append(el("span", { class: "mw-loc" }, fn.file.split("/").pop() + (fn.line ? ":" + fn.line : "")));
      if (d) {
        var sa = percent(fn.self_a || 0, d.total_a), sb = percent(fn.self_b || 0, d.total_b);
        tr.append(
          name,
          el("td", { class: "mw-num", "data-value": fn.self_a }, sa.toFixed(2) + "%"),
          el("td", { class: "mw-num", "data-value": fn.self_b }, sb.toFixed(2) + "%"),
          el("td", { class: "mw-num", "data-change": (sb - sa).toFixed(2) }, (sb - sa >= 0 ? "+" : "") + (sb - sa).toFixed(2)),
          el("td", { class: "mw-num", "data-value": fn.total_b }, formatValue(fn.total_b || 0, unit))
        );
      } else {
        tr.append(
          name,
          el("td", { class: "mw-num", "data-value": fn.self }, formatValue(fn.self, unit)),
          el("td", { class: "mw-num" }, formatPercent(fn.self, total)),
          el("td", { class: "mw-num", "data-value": fn.total }, formatValue(fn.total, unit)),
          el("td", { class: "mw-num" }, formatPercent(fn.total, total))
        );
      }
      frag.append(tr);
    });
    this.tbody.textContent = "";
    this.tbody.append(frag);
    this.tableNote.textContent =
      order.length > shown.length ? "Showing " + shown.length + " of " + order.length + " functions." : "";
  };

  /* Select a function (index into data.functions, or null): highlight its frames, select its
     table row, show its sandwich. */
  Viewer.prototype.highlightFunction = function (fid) {
    this.state.highlighted = fid === undefined ? null : fid;
    var hl = this.state.highlighted;
    this.flame.querySelectorAll(".mw-frame").forEach(function (box) {
      box.classList.toggle("highlighted", hl !== null && Number(box.getAttribute("data-fid")) === hl);
    });
    this.tbody.querySelectorAll("tr[data-fid]").forEach(function (tr) {
      tr.classList.toggle("selected", hl !== null && Number(tr.getAttribute("data-fid")) === hl);
    });
    this.renderSandwich();
    if (this.options.onSelect) this.options.onSelect(hl === null ? null : this.functions[hl]);
  };

  /* Callers and callees of function `fid`, with each sample counted once per relative, the
     same rules as middleware/reporters/sandwich.py. A tree node's self value is the weight of
     the samples whose stack is exactly the node's path, so the paths of the nodes with a self
     value are the profile's stacks. */
  Viewer.prototype.sandwichOf = function (fid) {
    var callers = {}, callees = {}, selfV = 0, totalV = 0;
    var path = [];
    var todo = [[this.nodes[0], 0]];
    while (todo.length) {
      var item = todo.pop();
      var node = item[0];
      path.length = item[1];
      if (node.f >= 0) path.push(node.f);
      if (node.s > 0 && path.indexOf(fid) >= 0) {
        var v = node.s, up = {}, down = {};
        totalV += v;
        if (path[path.length - 1] === fid) selfV += v;
        for (var i = 0; i < path.length; i++) {
          if (path[i] !== fid) continue;
          if (i > 0 && path[i - 1] !== fid) up[path[i - 1]] = true;
          if (i + 1 < path.length && path[i + 1] !== fid) down[path[i + 1]] = true;
        }
        Object.keys(up).forEach(function (k) { callers[k] = (callers[k] || 0) + v; });
        Object.keys(down).forEach(function (k) { callees[k] = (callees[k] || 0) + v; });
      }
      for (var c = node.children.length - 1; c >= 0; c--) todo.push([node.children[c], path.length]);
    }
    function list(d) {
      return Object.keys(d)
        .map(function (k) { return { fid: Number(k), value: d[k] }; })
        .sort(function (a, b) { return b.value - a.value || a.fid - b.fid; });
    }
    return { fid: fid, self: selfV, total: totalV, callers: list(callers), callees: list(callees) };
  };

  Viewer.prototype.renderSandwich = function () {
    var box = this.sandwich;
    box.textContent = "";
    var fid = this.state.highlighted;
    if (fid === null) {
      box.append(el("p", { class: "mw-note" }, "Click a function in the table or the flame graph to see its callers and callees."));
      return;
    }
    var fn = this.functions[fid], sw = this.sandwichOf(fid), self = this;
    box.setAttribute("data-function", fn.name);
    box.append(el("h2", { id: "mw-sandwich-title" }, fn.name));
    if (fn.file) box.append(el("div", { class: "mw-loc" }, fn.file + (fn.line ? ":" + fn.line : "")));
    box.append(
      el("div", { id: "mw-sandwich-summary" },
        "Total " + formatValue(sw.total, this.unit) + " (" + formatPercent(sw.total, this.total) + ")  ·  Self " +
        formatValue(sw.self, this.unit) + " (" + formatPercent(sw.self, this.total) + ")")
    );
    function section(title, id, rows, empty) {
      box.append(el("h3", null, title));
      if (!rows.length) {
        box.append(el("p", { id: id, class: "mw-note" }, empty));
        return;
      }
      var table = el("table", { id: id, class: "mw-table mw-relatives" });
      var tbody = el("tbody");
      rows.forEach(function (r) {
        var other = self.functions[r.fid];
        var tr = el("tr", { "data-fid": r.fid, "data-function": other.name, title: "Show " + other.name });
        tr.append(
          el("td", { class: "mw-fn" }, other.name),
          el("td", { class: "mw-num", "data-value": r.value }, formatValue(r.value, self.unit)),
          el("td", { class: "mw-num" }, formatPercent(r.value, sw.total) + " of " + fn.name)
        );
        tbody.append(tr);
      });
      table.append(tbody);
      box.append(table);
    }
    section("Callers", "mw-callers", sw.callers, "No callers: " + fn.name + " is at the root of its stacks.");
    section("Callees", "mw-callees", sw.callees, "No callees: all of its time is Self.");
  };

  /* Highlight functions whose name or file contains `text` (case-insensitive) and show the
     share of the total spent in them (a stack is counted once however many matches it has). */
  Viewer.prototype.search = function (text) {
    text = (text || "").trim();
    this.state.search = text;
    var set = {}, ids = [];
    if (text) {
      var needle = text.toLowerCase();
      this.functions.forEach(function (fn, i) {
        if (fn.name.toLowerCase().indexOf(needle) >= 0 || (fn.file || "").toLowerCase().indexOf(needle) >= 0) {
          set[i] = true;
          ids.push(i);
        }
      });
    }
    this._matchSet = set;
    this.state.matches = ids;
    var share = 0;
    if (ids.length) {
      var todo = [this.nodes[0]];
      while (todo.length) {
        var n = todo.pop();
        if (n.f >= 0 && set[n.f]) {
          share += n.v;
          continue;
        }
        for (var i = 0; i < n.children.length; i++) todo.push(n.children[i]);
      }
    }
    this.state.searchShare = share;
    this.flame.querySelectorAll(".mw-frame").forEach(function (box) {
      box.classList.toggle("match", !!set[Number(box.getAttribute("data-fid"))]);
    });
    this.tbody.querySelectorAll("tr[data-fid]").forEach(function (tr) {
      tr.classList.toggle("match", !!set[Number(tr.getAttribute("data-fid"))]);
    });
    this.searchShare.setAttribute("data-share", text ? percent(share, this.total).toFixed(2) : "");
    this.searchShare.textContent = text
      ? ids.length + " matching function" + (ids.length === 1 ? "" : "s") + ": " +
        formatPercent(share, this.total) + " of total (" + formatValue(share, this.unit) + ")"
      : "";
    if (this.searchBox.value.trim() !== text) this.searchBox.value = text;
  };

  /* Drawn frames, for tests and tools: [{function, file, depth, left, width, highlighted, match}]
     with left/width as fractions of the flame graph's width. */
  Viewer.prototype.frames = function () {
    var fns = this.functions;
    return Array.prototype.map.call(this.flame.querySelectorAll(".mw-frame"), function (box) {
      var fid = Number(box.getAttribute("data-fid"));
      return {
        function: fid >= 0 ? fns[fid].name : "all",
        file: fid >= 0 ? fns[fid].file : "",
        depth: Number(box.getAttribute("data-depth")),
        left: parseFloat(box.style.left) / 100,
        width: parseFloat(box.style.width) / 100,
        highlighted: box.classList.contains("highlighted"),
        match: box.classList.contains("match"),
        change: box.hasAttribute("data-change") ? Number(box.getAttribute("data-change")) : null,
      };
    });
  };

  Viewer.prototype.destroy = function () {
    document.removeEventListener("keydown", this._keyHandler);
    this.container.textContent = "";
  };

  global.MwFlame = {
    mount: function (container, data, options) {
      return new Viewer(container, data, options);
    },
    Viewer: Viewer,
    formatValue: formatValue,
    formatPercent: formatPercent,
  };
})(window);
