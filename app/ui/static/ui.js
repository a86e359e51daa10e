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

  function money(v) {
    return "$" + Number(v).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  }

  var common = {
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    plugins: { tooltip: { callbacks: { label: function (c) { return c.dataset.label + ": " + money(c.parsed.y); } } } },
    scales: { y: { beginAtZero: true, ticks: { callback: function (v) { return money(v); } } } }
  };

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
      options: Object.assign({}, common, { plugins: Object.assign({}, common.plugins, { legend: { display: false } }) })
    });
  }

  var history = data("history-chart-data");
  if (history) {
    draw("history-chart", {
      type: "bar",
      data: {
        labels: history.labels,
        datasets: [
          { type: "line", label: "Limit", data: history.limit, borderColor: bad, backgroundColor: bad,
            borderDash: [6, 4], pointRadius: 2, stepped: "middle", spanGaps: false },
          { label: "Spend", data: history.spend, backgroundColor: accent }
        ]
      },
      options: common
    });
  }
})();
