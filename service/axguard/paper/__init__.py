"""The paper's own experiments on a user's data (offline tools, not served): the Table 1
fine-tuning recipe (finetune.py, models.py) and Figures 2–4, 7, 8 (figures.py)."""

from .figures import write_paper_figures
from .finetune import FinetuneOptions, FinetuneResult, finetune

__all__ = ["FinetuneOptions", "FinetuneResult", "finetune", "write_paper_figures"]
