"""Layout for narrow windows: the sidebar folds away, paired charts stack, labels wrap.

Streamlit's own `initial_sidebar_state="auto"` folds the sidebar only up to 767 px (its `md`
breakpoint); at 800 px the sidebar still took 300 of them. `narrow_window_layout()` (called once per
script run by app.py) adds:

- CSS (drawn in the event container: it takes no room): widget labels wrap instead of being cut
  with an ellipsis; the columns of a container whose key starts with `stack_` wrap onto separate
  lines when each would be narrower than STACK_MIN_PX.
- Once per browser tab: when the window is at most NARROW_PX wide, a click on the sidebar's
  collapse button (the user can open it again, and a reload does not fold it again).
"""

from __future__ import annotations

import streamlit as st

NARROW_PX = 1000          # at or below this width the sidebar starts folded
STACK_MIN_PX = 440        # a stacked column's minimum width: two side by side need about 900 px
TAB_FLAG = "quantlab-sidebar-folded-once"

CSS = f"""
<style>
[data-testid="stWidgetLabel"] .stMarkdownEllipsis,
[data-testid="stWidgetLabel"] .stMarkdownEllipsis p {{
  white-space: normal; overflow: visible; text-overflow: clip;
}}
[class*="st-key-stack_"] [data-testid="stHorizontalBlock"] {{ flex-wrap: wrap; }}
[class*="st-key-stack_"] [data-testid="stColumn"] {{ min-width: min(100%, {STACK_MIN_PX}px); }}
</style>
"""

FOLD_SIDEBAR = f"""
<script>
(() => {{
  if (window.innerWidth > {NARROW_PX} || sessionStorage.getItem("{TAB_FLAG}")) return;
  sessionStorage.setItem("{TAB_FLAG}", "1");
  let tries = 0;
  const fold = () => {{
    const sidebar = document.querySelector('[data-testid="stSidebar"]');
    const button = document.querySelector('[data-testid="stSidebarCollapseButton"] button');
    if (sidebar && button && sidebar.getAttribute("data-collapsed") !== "true") {{ button.click(); return; }}
    if (++tries < 50) setTimeout(fold, 100);
  }};
  fold();
}})();
</script>
"""


def sideways_scroll(key: str, min_width_px: int):
    """A container whose content keeps at least `min_width_px` (a chart drawn to that width) and
    scrolls sideways in a narrower window, instead of being squeezed until its labels collide."""
    st.html(f"<style>.st-key-{key} {{ overflow-x: auto; }} .st-key-{key} > div {{ min-width: {int(min_width_px)}px; }}"
            f"</style>")
    return st.container(key=key)


def scroll_to(key: str, fraction: float | None) -> None:
    """Scroll a `sideways_scroll` container so that the point `fraction` (0 left, 1 right) of its
    content is in the middle of the window, once the content is drawn; nothing when it fits."""
    if fraction is None:
        return
    st.html(f"""<script>
(() => {{
  let tries = 0;
  const scroll = () => {{
    const box = document.querySelector(".st-key-{key}");
    if (box && box.scrollWidth > box.clientWidth) {{
      box.scrollLeft = {float(fraction):.4f} * box.scrollWidth - box.clientWidth / 2;
      return;
    }}
    if (++tries < 50) setTimeout(scroll, 100);
  }};
  scroll();
}})();
</script>""", unsafe_allow_javascript=True, width=1)


def narrow_window_layout() -> None:
    st.html(CSS)
    if not st.session_state.get("layout_fold_checked"):
        st.session_state["layout_fold_checked"] = True
        st.html(FOLD_SIDEBAR, unsafe_allow_javascript=True, width=1)
