"""The charts, drawn with matplotlib (the one chart engine) for ``--plot`` files and the HTML report's SVGs.

``engine`` (figures and their bytes), ``logaxis`` (the log axis with its zero and NaN/Inf strips, series,
threshold bands), ``style`` (colours, labels, the side column), one module per panel (``layers``, ``steps``,
``calls``), the two pictures (``inspect_figure``, ``simulation``) and ``inline_svg`` (an SVG made fit to
sit inside an HTML page)."""
