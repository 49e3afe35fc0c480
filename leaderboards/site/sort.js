// Sortable leaderboard tables: click a header to sort by that column, click again to reverse.
// Plain script (no modules, no fetch) so the page works from file://.
"use strict";

function sortTable(table, th) {
  var column = th.cellIndex;
  var numeric = th.getAttribute("data-sort") === "number";
  // Numbers start high to low (the best leakage first), text A to Z; a second click reverses.
  var current = th.getAttribute("aria-sort");
  var descending = numeric ? current !== "descending" : current === "ascending";
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  function value(row) {
    var cell = row.cells[column];
    var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent;
    if (!numeric) return raw.trim().toLowerCase();
    var number = parseFloat(raw);
    return isNaN(number) ? null : number;
  }
  rows.sort(function (a, b) {
    var x = value(a), y = value(b);
    if (x === y) return Number(a.getAttribute("data-order")) - Number(b.getAttribute("data-order"));
    if (x === null) return 1;  // missing values last, whichever the direction
    if (y === null) return -1;
    var order = x < y ? -1 : 1;
    return descending ? -order : order;
  });
  rows.forEach(function (row) { body.appendChild(row); });
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell) {
    cell.removeAttribute("aria-sort");
  });
  th.setAttribute("aria-sort", descending ? "descending" : "ascending");
}

document.addEventListener("DOMContentLoaded", function () {
  Array.prototype.forEach.call(document.querySelectorAll("table.board"), function (table) {
    Array.prototype.forEach.call(table.querySelectorAll("th[data-sort]"), function (th) {
      th.addEventListener("click", function () { sortTable(table, th); });
    });
  });
});
