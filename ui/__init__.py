"""Small Streamlit helpers shared by the pages (the engine in quantlab/ never imports Streamlit)."""
