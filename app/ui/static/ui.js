// Draws the dashboard's charts from the JSON next to each canvas. Everything else works
// without JavaScript; the figures behind each chart are also in a table on the page.
(function () {
  "use strict";
  if (typeof Chart === "undefined") return;
  var accent = "#1d4ed8", bad = "#b91c1c";

  function data(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  // Cents, as the tables write them; small amounts (under a dollar) keep up to four decimals,
  // so that the axis of a $0.05 budget does not read $0.05, $0.05, $0.04...
  function money(v) {
    var n = Number(v);
    var digits = n !== 0 && Math.abs(n) < 1 ? 4 : 2;
    return "$" + n.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: digits });
  }

  function options(extra) {
    return Object.assign({
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      plugins: {
        legend: { labels: { usePointStyle: true } },
        tooltip: { callbacks: { label: function (c) { return c.dataset.label + ": " + money(c.parsed.y); } } }
      },
      scales: { y: { beginAtZero: true, grace: "10%", ticks: { callback: function (v) { return money(v); } } } }
    }, extra || {});
  }

  function draw(canvasId, config) {
    var canvas = document.getElementById(canvasId);
    if (!canvas) return;
    new Chart(canvas, config);
    canvas.setAttribute("data-drawn", "true");
  }

  var spend = data("spend-chart-data");
  if (spend) {
    draw("spend-chart", {
      type: "bar",
      data: { labels: spend.labels.map(function (d) { return d.slice(5); }),
              datasets: [{ label: "Spend", data: spend.spend, backgroundColor: accent }] },
      options: (function () { var o = options(); o.plugins.legend = { display: false }; return o; })()
    });
  }

  var history = data("history-chart-data");
  if (history) {
    draw("history-chart", {
      type: "bar",
      data: {
        labels: history.labels,
        datasets: [
          // The limit of each period as a dash across its bar (visible with one period too),
          // joined by a dashed line when there are several.
          { type: "line", label: "Limit", data: history.limit, borderColor: bad, backgroundColor: bad,
            borderDash: [6, 4], borderWidth: 2, pointStyle: "line", pointRadius: 18,
            pointBorderWidth: 3, spanGaps: false },
          { label: "Spend", data: history.spend, backgroundColor: accent, maxBarThickness: 56 }
        ]
      },
      options: options()
    });
  }
})();
