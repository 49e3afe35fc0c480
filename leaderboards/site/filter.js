// The threat-model filter: choosing a SoK letter keeps the entries whose attack's letter it
// admits (each option lists them in data-admits) and hides the rest, and the tables left empty.
// Plain script (no modules, no fetch) so the page works from file://.
"use strict";

function filterByThreatModel(select) {
  var option = select.options[select.selectedIndex];
  var admits = option.value ? option.getAttribute("data-admits").split(" ") : null;
  var shown = 0, total = 0;
  Array.prototype.forEach.call(document.querySelectorAll("table.board"), function (table) {
    var kept = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      var keep = admits === null || admits.indexOf(row.getAttribute("data-threat-model")) >= 0;
      row.classList.toggle("hidden", !keep);
      kept += keep ? 1 : 0;
    });
    table.closest(".part").classList.toggle("hidden", kept === 0);
    shown += kept;
    total += table.tBodies[0].rows.length;
  });
  document.getElementById("threat-count").textContent =
    admits === null ? "" : shown + " of " + total + " entries shown.";
}

document.addEventListener("DOMContentLoaded", function () {
  var select = document.getElementById("threat-model");
  select.addEventListener("change", function () { filterByThreatModel(select); });
  filterByThreatModel(select);  // a choice the browser kept across a reload applies at once
});
