
(function () {
  var root = document.documentElement;
  root.className += " js";
  window.addEventListener("beforeprint", function () {
    Array.prototype.forEach.call(document.querySelectorAll("details"), function (d) { d.open = true; });
  });
  function pos(row) { return parseFloat(row.getAttribute("data-pos")); }
  function key(row, col, numeric) {
    var cell = row.cells[col];
    var text = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent;
    if (!numeric) { return text.trim().toLowerCase(); }
    var value = parseFloat(text);
    return isNaN(value) ? null : value;
  }
  function sortBy(table, th) {
    var body = table.tBodies[0], col = th.cellIndex, numeric = th.getAttribute("data-sort") === "num";
    var natural = th.hasAttribute("data-natural");
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    Array.prototype.forEach.call(th.parentNode.cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    table.classList.toggle("flat", !(natural && dir === 1));
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      if (natural) { return dir * (pos(a) - pos(b)); }
      var ga = a.classList.contains("grp") ? 1 : 0, gb = b.classList.contains("grp") ? 1 : 0;
      if (ga || gb) { return ga - gb || pos(a) - pos(b); }
      var ka = key(a, col, numeric), kb = key(b, col, numeric);
      if (ka === kb) { return pos(a) - pos(b); }
      if (ka === null) { return 1; }
      if (kb === null) { return -1; }
      return ka < kb ? -dir : dir;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      if (!th.hasAttribute("data-sort")) { return; }
      th.tabIndex = 0;
      th.title = "sort by this column";
      th.addEventListener("click", function () { sortBy(table, th); });
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(table, th); }
      });
    });
  });
})();
