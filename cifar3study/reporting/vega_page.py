"""The HTML page `dvc plots show` renders into, with Vega, Vega-Lite and Vega-Embed inlined.

DVC's default page loads them from a CDN, so on an air-gapped box no chart
renders. The JavaScript comes from `vl-convert-python`, maintained by the
Vega project. Vega-Lite 5 because DVC's templates use its `selection` syntax.
"""

from __future__ import annotations

import vl_convert

VEGA_LITE = "5.21"
PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots (offline)</title>
<script type="text/javascript">
%s
</script>
<style>table { border-spacing: 15px; } body { font-family: sans-serif; }</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def offline_page() -> str:
    """A DVC html template (it keeps `{plot_divs}` and `{refresh_tag}`, drops the CDN `{scripts}`)."""
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if "</script" in bundle:  # would end the inline script early
        raise ValueError("the Vega bundle contains '</script'; it cannot be inlined")
    return PAGE % bundle
