/* Device page: time-series charts (uPlot) of one device, refreshed with the rest of the page. */
(function () {
  "use strict";

  var section = document.getElementById("charts");
  if (!section || !window.uPlot || !window.cloudSync) return;

  var COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706"];
  var HEIGHT = 200;
  // One chart per unit; series names are those of cloud_sync.fleet.SERIES.
  var CHARTS = [
    {id: "latency", title: "Latency (ms)", series: [["latency_p50_ms", "p50"], ["latency_p99_ms", "p99"]]},
    {id: "throughput", title: "Throughput (inferences/s)", series: [["throughput_per_s", "inferences/s"]]},
    {id: "errors", title: "Error and low-confidence rate", series: [["error_rate", "error rate"],
                                                                   ["low_confidence_rate", "low confidence"]]},
    {id: "drift", title: "Drift score (1 = alarm level)", series: [["drift_score", "drift score"]]},
    {id: "cpu", title: "CPU (%)", series: [["cpu_percent", "CPU %"]]},
    {id: "rss", title: "Memory RSS (MB)", series: [["rss_mb", "RSS MB"]]},
    {id: "temperature", title: "Temperature (\u00b0C)", series: [["temperature_c", "\u00b0C"]]},
  ];

  // uPlot wants one shared x array: the union of the series' times, gaps as null.
  function align(series, names) {
    var times = {};
    names.forEach(function (n) { (series[n] || []).forEach(function (pt) { times[pt[0]] = true; }); });
    var xs = Object.keys(times).map(Number).sort(function (a, b) { return a - b; });
    var data = [xs.map(function (t) { return t / 1000; })];
    names.forEach(function (n) {
      var byTime = {};
      (series[n] || []).forEach(function (pt) { byTime[pt[0]] = pt[1]; });
      data.push(xs.map(function (t) { return t in byTime ? byTime[t] : null; }));
    });
    return data;
  }

  function width(box) { return Math.max(280, (box.clientWidth || 600) - 4); }

  var charts = CHARTS.map(function (spec) {
    var box = document.createElement("div");
    box.className = "chart";
    box.id = "chart-" + spec.id;
    var note = document.createElement("p");
    note.className = "muted chart-note";
    note.textContent = "no points yet";
    section.append(box);
    box.append(note);
    var names = spec.series.map(function (s) { return s[0]; });
    var opts = {
      title: spec.title,
      width: width(box),
      height: HEIGHT,
      scales: {x: {time: true}},
      series: [{label: "time (UTC)"}].concat(spec.series.map(function (s, i) {
        return {label: s[1], stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true};
      })),
      axes: [{}, {size: 56}],
      tzDate: function (ts) { return window.uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); },
    };
    var plot = new window.uPlot(opts, align({}, names), box);
    return {spec: spec, names: names, box: box, note: note, plot: plot};
  });

  // For the console and the browser test: each chart's uPlot by id.
  window.cloudSync.charts = {};
  charts.forEach(function (c) { window.cloudSync.charts[c.spec.id] = c.plot; });

  function resize() {
    charts.forEach(function (c) { c.plot.setSize({width: width(c.box), height: HEIGHT}); });
  }

  var pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(resize, 150);
  });

  // Every chart spans the same time range, so that a series with few points lines up with the rest.
  function span(series) {
    var lo = Infinity, hi = -Infinity;
    charts.forEach(function (c) {
      c.names.forEach(function (n) {
        (series[n] || []).forEach(function (pt) { lo = Math.min(lo, pt[0]); hi = Math.max(hi, pt[0]); });
      });
    });
    if (!isFinite(lo)) return null;
    if (hi - lo < 60000) { lo -= 30000; hi += 30000; }
    return {min: lo / 1000, max: hi / 1000};
  }

  window.cloudSync.watch(section.dataset.series, function (data) {
    var series = (data && data.series) || {};
    var range = span(series);
    charts.forEach(function (c) {
      var aligned = align(series, c.names);
      c.note.hidden = aligned[0].length > 0;
      c.plot.setData(aligned);
      if (range) c.plot.setScale("x", range);
    });
  });
  resize();
})();
