"""The comparison report from MLflow alone: its pages (`pages`), plots (`plots`) and the
merge-against-adapter route comparison (`routes`)."""

from harness.report.pages import quality_chain, write

__all__ = ["quality_chain", "write"]
