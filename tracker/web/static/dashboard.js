/* tracker dashboard: draws the campaign page's charts with the vendored Chart.js.
 *
 * The server renders every number and table; this file only adds pictures. Chart
 * specs come from the <script type="application/json" id="chart-data"> block (the
 * CSP allows no inline script), colours from the CSS custom properties, so light
 * and dark themes live in one place (dashboard.css).
 */
(function () {
  "use strict";

  function offerLocalTimeZone() {
    var link = document.getElementById("local-tz");
    if (!link || !window.Intl) return;
    var tz = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (!tz || tz === link.dataset.current) return;
    var url = new URL(window.location.href);
    url.searchParams.set("tz", tz);
    link.href = url.pathname + url.search;
    link.textContent = "Show in " + tz;
    link.hidden = false;
  }

  function countryNames(labels) {
    var names = null;
    try {
      names = new Intl.DisplayNames(["en"], { type: "region" });
    } catch (e) {
      return labels;
    }
    return labels.map(function (code) {
      if (!/^[A-Z]{2}$/.test(code)) return code;
      try {
        var name = names.of(code);
        return name && name !== code ? name + " (" + code + ")" : code;
      } catch (e) {
        return code;
      }
    });
  }

  function drawCharts() {
    var source = document.getElementById("chart-data");
    if (!source || typeof window.Chart === "undefined") return;
    var specs = JSON.parse(source.textContent);
    var css = window.getComputedStyle(document.documentElement);
    var font = window.getComputedStyle(document.body).fontFamily;
    var colour = function (name) {
      return css.getPropertyValue("--" + name).trim() || "#888888";
    };
    var palette = [1, 2, 3, 4, 5, 6].map(function (i) { return colour("palette-" + i); });
    var Chart = window.Chart;

    Chart.defaults.animation = false;  // charts appear at once; nothing moves on a phone
    Chart.defaults.color = colour("muted");
    Chart.defaults.borderColor = colour("grid");
    Chart.defaults.font.family = font;
    Chart.defaults.maintainAspectRatio = false;

    var drawn = 0;
    specs.forEach(function (spec) {
      var canvas = document.getElementById("chart-" + spec.id);
      if (!canvas) return;
      var doughnut = spec.type === "doughnut";
      var line = spec.type === "line";
      var datasets = spec.series.map(function (series) {
        var role = series.role;
        var set = { label: series.label, data: series.values };
        if (role === "palette") {
          set.backgroundColor = series.values.map(function (_, i) { return palette[i % palette.length]; });
          set.borderColor = colour("surface");
          set.borderWidth = 2;
        } else if (line) {
          set.borderColor = colour(role);
          set.backgroundColor = colour(role + "-fill");
          set.fill = true;
          set.tension = 0.25;
          set.pointRadius = 0;
          set.borderWidth = 2;
        } else {
          set.backgroundColor = colour(role);
          set.borderRadius = 3;
          set.maxBarThickness = 28;
        }
        return set;
      });
      var countAxis = { beginAtZero: true, stacked: !!spec.stacked, ticks: { precision: 0 } };
      // Long labels (links, regions) would squeeze the bars to nothing on a phone.
      var longest = Math.max(10, Math.floor(canvas.parentNode.clientWidth / 16));
      var labelAxis = { stacked: !!spec.stacked, grid: { display: false },
                        ticks: { autoSkip: !spec.horizontal, maxRotation: 0, callback: function (value) {
                          var text = String(this.getLabelForValue(value));
                          return text.length > longest ? text.slice(0, longest - 1) + "\u2026" : text;
                        } } };
      var options = {
        responsive: true,
        indexAxis: spec.horizontal ? "y" : "x",
        interaction: { mode: doughnut ? "nearest" : "index", intersect: doughnut },
        plugins: {
          legend: { display: doughnut || datasets.length > 1, position: "bottom",
                    labels: { boxWidth: 12, boxHeight: 12 } }
        }
      };
      if (!doughnut) {
        options.scales = spec.horizontal ? { x: countAxis, y: labelAxis } : { x: labelAxis, y: countAxis };
      } else {
        options.cutout = "60%";
      }
      new Chart(canvas, {
        type: spec.type,
        data: { labels: spec.countries ? countryNames(spec.labels) : spec.labels, datasets: datasets },
        options: options
      });
      drawn += 1;
    });
    document.documentElement.setAttribute("data-charts-drawn", String(drawn));
  }

  offerLocalTimeZone();
  drawCharts();
})();
