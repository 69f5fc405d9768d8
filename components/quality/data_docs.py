"""Great Expectations Data Docs that show every value as text, never as HTML.

GX escapes the parameters of its string templates, but it places plain values (the cells of its
tables, the items of its lists, unexpected values, index rows, observed values) into the page as
they are. File and class names come from the source, which is not trusted: a class folder named
`<img src=x onerror=...>` would run script in the browser of whoever opens the report. The views
below escape every plain value before GX's templates place it; GX's own blocks (string templates,
whose parameters GX escapes itself) are rendered by GX unchanged.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from great_expectations.render.components import RenderedComponentContent
from great_expectations.render.view.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import pass_context


def _is_block(value: Any) -> bool:
    """A GX content block (rendered by its own template), as opposed to a plain value."""
    return isinstance(value, RenderedComponentContent) or (isinstance(value, dict) and "content_block_type" in value)


def as_text(value: Any) -> Any:
    """A plain value escaped for HTML; GX blocks, numbers and None as they are (nothing to escape)."""
    if value is None or isinstance(value, (bool, int, float)) or _is_block(value):
        return value
    if isinstance(value, list):
        return [as_text(item) for item in value]
    return html.escape(str(value))


class _EscapingView:
    """Mixin for a GX page view: plain values pass through `as_text` before GX renders them."""

    @pass_context
    def render_content_block(
        self,
        jinja_context: Any,
        content_block: Any,
        index: Any = None,
        content_block_id: Any = None,
        render_to_markdown: bool = False,
    ) -> Any:
        return super().render_content_block(  # type: ignore[misc]
            jinja_context, as_text(content_block), index, content_block_id, render_to_markdown
        )


class EscapingPageView(_EscapingView, DefaultJinjaPageView):
    """Validation-result and suite pages."""


class EscapingIndexPageView(_EscapingView, DefaultJinjaIndexPageView):
    """The site's index page."""


def _view(class_name: str) -> dict[str, str]:
    return {"module_name": __name__, "class_name": class_name}


def site_config(docs_dir: Path) -> dict[str, Any]:
    """A Data Docs site in docs_dir whose every page escapes the values it shows."""
    page = {"view": _view(EscapingPageView.__name__)}
    return {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "view": _view(EscapingIndexPageView.__name__)},
        "site_section_builders": {"expectations": page, "validations": page, "profiling": page},
    }
